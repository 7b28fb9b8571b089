"""Network registry over MONAI: one name -> one 2D single-channel binary classifier (or a U-Net).

Every response backbone takes a batch of slices ``(B, 1, S, S)`` and returns one logit per slice
``(B, 1)``; the sigmoid of it is the deep-learning signature. Each full-size architecture has a
CPU-sized variant (:attr:`ModelSpec.cpu_variant`): the same architecture at a fraction of the
width and depth, for CPU demos and tests. Nothing is downloaded: MONAI's ``pretrained`` switches
stay off, and ``pretrained=`` (``train.pretrained_path``) loads a local state-dict file.

    >>> from shared.models import build_model, available_models
    >>> net = build_model("densenet121", slice_size=256)
    >>> build_model("densenet12")
    Traceback (most recent call last):
    ...
    KeyError: "unknown network 'densenet12'; available: densenet121, densenet_tiny, ..."

The registry also says how to explain each network (:attr:`ModelSpec.cam_layer`,
:attr:`ModelSpec.cam_method`): the layer whose activations Grad-CAM weighs (the last convolutional
feature map, or the last Swin stage), or ``"rollout"`` (attention rollout) for the ViT.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks import nets
from monai.networks.layers import DropPath
from torch import nn

from shared.config import RectalFLConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    Attributes
    ----------
    name : str
        Registry name (``train.backbone``).
    task : {"classification", "segmentation"}
    description : str
    factory : callable ``slice_size -> nn.Module``
    family : str
        Architecture family shown in tables (``DenseNet-121``, ``Swin-T``...).
    kind : {"cnn", "transformer"}
    cam_layer : str or None
        Module name (``model.named_modules()``) whose output Grad-CAM weighs; ``None`` for rollout.
    cam_method : {"gradcam", "rollout", "none"}
    cpu_variant : str or None
        Name of the CPU-sized variant of a full-size network.
    full_size : str or None
        For a CPU-sized variant, the full-size network it shrinks.
    reference : str
        Where the architecture comes from.
    """

    name: str
    task: str  # "classification" | "segmentation"
    description: str
    factory: Callable[[int], nn.Module]
    family: str = ""
    kind: str = "cnn"
    cam_layer: str | None = None
    cam_method: str = "gradcam"
    cpu_variant: str | None = None
    full_size: str | None = None
    reference: str = ""


# --------------------------------------------------------------------------- MONAI CNNs


def _densenet121(size: int) -> nn.Module:
    return nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=1)


def _densenet169(size: int) -> nn.Module:
    return nets.DenseNet169(spatial_dims=2, in_channels=1, out_channels=1)


def _densenet_small(blocks: tuple[int, ...]) -> Callable[[int], nn.Module]:
    def make(size: int) -> nn.Module:
        return nets.DenseNet(spatial_dims=2, in_channels=1, out_channels=1, init_features=8, growth_rate=8,
                             block_config=blocks, bn_size=2)

    return make


def _resnet(depth: int) -> Callable[[int], nn.Module]:
    def make(size: int) -> nn.Module:
        factory = {18: nets.resnet18, 34: nets.resnet34, 50: nets.resnet50}[depth]
        # He et al.'s stem: 7x7 convolution with stride 2, then max-pooling. MONAI's default first stride
        # is 1, which keeps 4x the activations in every stage: ResNet-50 trained at 0.7 img/s with 17.5 GB
        # resident at 256x256, batch 32 on 2 CPU cores, against 5.7 img/s for SE-ResNet-50 (stride 2).
        return factory(spatial_dims=2, n_input_channels=1, num_classes=1, conv1_t_stride=2)

    return make


def _resnet_small(block: str, layers: tuple[int, int, int, int]) -> Callable[[int], nn.Module]:
    def make(size: int) -> nn.Module:
        return nets.ResNet(block=block, layers=layers, block_inplanes=(8, 16, 32, 64), spatial_dims=2,
                           n_input_channels=1, num_classes=1)

    return make


def _seresnet50(size: int) -> nn.Module:
    return nets.SEResNet50(spatial_dims=2, in_channels=1, num_classes=1, pretrained=False)


def _seresnext50(size: int) -> nn.Module:
    return nets.SEResNext50(spatial_dims=2, in_channels=1, num_classes=1, pretrained=False)


class _SENetSmall(nets.SENet):
    """MONAI's SENet with narrow stages (MONAI fixes the stage widths at 64-512; this sets them)."""

    def __init__(self, block: str, groups: int, widths: tuple[int, int, int, int] = (16, 32, 64, 128)) -> None:
        super().__init__(spatial_dims=2, in_channels=1, block=block, layers=(1, 1, 1, 1), groups=groups, reduction=4,
                         dropout_prob=None, inplanes=16, downsample_kernel_size=1, input_3x3=False, num_classes=1)
        unit = type(self.layer1[0])
        self.inplanes = 16
        for i, planes in enumerate(widths):
            setattr(self, f"layer{i + 1}", self._make_layer(unit, planes=planes, blocks=1, groups=groups, reduction=4,
                                                           stride=1 if i == 0 else 2, downsample_kernel_size=1))
        self.last_linear = nn.Linear(widths[-1] * unit.expansion, 1)
        for m in self.modules():  # SENet's own initialisation, for the new layers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)


# EfficientNet-B0's stages (Tan & Le 2019, Table 1), in MONAI's block-string notation; built with
# nets.EfficientNet rather than EfficientNetBN so that the "same" padding is computed for the actual
# slice size (EfficientNetBN fixes it for 224 x 224).
_EFFICIENTNET_B0 = [
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
]


def _efficientnet(width: float, depth: float, dropout: float, drop_connect: float) -> Callable[[int], nn.Module]:
    def make(size: int) -> nn.Module:
        return nets.EfficientNet(_EFFICIENTNET_B0, spatial_dims=2, in_channels=1, num_classes=1,
                                 width_coefficient=width, depth_coefficient=depth, dropout_rate=dropout,
                                 image_size=size, drop_connect_rate=drop_connect)

    return make


# --------------------------------------------------------------------------- ConvNeXt (not in MONAI)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` tensor (ConvNeXt's ``channels_first`` norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """depthwise 7x7 conv -> LayerNorm -> 1x1 (4x) -> GELU -> 1x1 -> layer scale -> stochastic depth + residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C): the 1x1 convs as Linear layers
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + self.drop_path((self.gamma * y).permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """ConvNeXt for one-channel 2D slices and one logit (Liu et al., "A ConvNet for the 2020s", CVPR 2022,
    arXiv:2201.03545; the architecture of the paper's Fig. 2 / Sec. 2 and its released ``convnext.py``).

    Patchify stem (k = s = ``stem``) + LayerNorm; four stages of :class:`ConvNeXtBlock`, separated by
    LayerNorm + 2x2 stride-2 convolutions; global average pooling, LayerNorm and a linear head.
    Weights: truncated normal (std 0.02), zero biases, layer scale 1e-6. ConvNeXt-T is
    ``depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)``, stochastic depth 0.1.

    Parameters
    ----------
    depths, dims : sequences of 4 ints
        Blocks and channels per stage.
    drop_path : float
        Largest stochastic-depth rate (linearly increasing over the blocks).
    stem : int
        Patch size of the stem (4 in the paper).
    in_channels, num_classes : int
    """

    def __init__(self, depths: tuple[int, ...] = (3, 3, 9, 3), dims: tuple[int, ...] = (96, 192, 384, 768),
                 drop_path: float = 0.1, stem: int = 4, in_channels: int = 1, num_classes: int = 1) -> None:
        super().__init__()
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"depths ({list(depths)}) and dims ({list(dims)}) must have the same, non-zero length")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.downsample = nn.ModuleList([nn.Sequential(nn.Conv2d(in_channels, dims[0], kernel_size=stem, stride=stem),
                                                       LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(1, len(dims)):
            self.downsample.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6),
                                                 nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2)))
        rates = np.linspace(0.0, drop_path, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        start = 0
        for depth, dim in zip(depths, dims, strict=True):
            self.stages.append(nn.Sequential(*[ConvNeXtBlock(dim, rates[start + j]) for j in range(depth)]))
            start += depth
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample, self.stages, strict=True):
            x = stage(down(x))
        return self.head(self.norm(x.mean(dim=(-2, -1))))


# --------------------------------------------------------------------------- transformers


class _ViTClassifier(nn.Module):
    """MONAI ViT whose classification head returns raw logits ``(B, 1)``."""

    def __init__(self, size: int, hidden: int, mlp: int, layers: int, heads: int, patch: int) -> None:
        super().__init__()
        if size % patch:
            raise ValueError(f"slice_size ({size}) must be a multiple of the ViT patch size ({patch})")
        self.vit = nets.ViT(in_channels=1, img_size=(size, size), patch_size=(patch, patch), hidden_size=hidden,
                            mlp_dim=mlp, num_layers=layers, num_heads=heads, classification=True, num_classes=1,
                            spatial_dims=2, post_activation=None)
        self.grid = size // patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.vit(x)
        return out


class SwinClassifier(nn.Module):
    """Swin Transformer (Liu et al. 2021, arXiv:2103.14030) for 2D slices: MONAI's ``SwinTransformer`` (the
    SwinUNETR encoder) with a classification head.

    MONAI's encoder merges patches after every stage, the last included; the classifier drops that
    last merge, so the stages run at 1/4, 1/8, 1/16 and 1/32 of the slice with ``C, 2C, 4C, 8C``
    channels as in the paper, followed by LayerNorm, global average pooling and a linear head.
    Swin-T: ``embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7, patch=4``.
    """

    def __init__(self, size: int, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
                 heads: tuple[int, ...] = (3, 6, 12, 24), window: int = 7, patch: int = 4,
                 drop_path: float = 0.2) -> None:
        super().__init__()
        if len(depths) != 4 or len(heads) != 4:
            raise ValueError(f"Swin needs 4 stages: got depths {list(depths)}, heads {list(heads)}")
        if size % (patch * 8):
            raise ValueError(f"slice_size ({size}) must be a multiple of {patch * 8} for Swin (patch {patch}, 3 merges)")
        from monai.networks.nets.swin_unetr import SwinTransformer

        self.swin = SwinTransformer(in_chans=1, embed_dim=embed_dim, window_size=(window, window),
                                    patch_size=(patch, patch), depths=depths, num_heads=heads,
                                    drop_path_rate=drop_path, patch_norm=True, spatial_dims=2)
        self.swin.layers4[0].downsample = None  # the paper's last stage has no patch merging
        dim = embed_dim * 8
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage feature map ``(B, 8C, S/32, S/32)`` (``patch=4``)."""
        s = self.swin
        x = s.pos_drop(s.patch_embed(x))
        for layer in (s.layers1, s.layers2, s.layers3, s.layers4):
            x = layer[0](x.contiguous())
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x).mean(dim=(-2, -1))))


def _unet(size: int) -> nn.Module:
    return nets.UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                     num_res_units=2)


# --------------------------------------------------------------------------- the registry

_DENSE_CAM = "class_layers.relu"  # after the last dense block's norm: the last feature map
_REF_DENSENET = "Huang et al. 2017, arXiv:1608.06993 (MONAI DenseNet)"
_REF_RESNET = "He et al. 2016, arXiv:1512.03385 (MONAI ResNet)"
_REF_SE = "Hu et al. 2018, arXiv:1709.01507 (MONAI SENet)"
_REF_EFF = "Tan & Le 2019, arXiv:1905.11946 (MONAI EfficientNet)"
_REF_CONVNEXT = "Liu et al. 2022, arXiv:2201.03545 (in-house, rectalfl.shared.models.ConvNeXt)"
_REF_VIT = "Dosovitskiy et al. 2021, arXiv:2010.11929 (MONAI ViT)"
_REF_SWIN = "Liu et al. 2021, arXiv:2103.14030 (MONAI SwinTransformer + head)"


def _pair(full: ModelSpec, small: ModelSpec) -> list[ModelSpec]:
    from dataclasses import replace

    return [replace(full, cpu_variant=small.name), replace(small, full_size=full.name, family=full.family,
                                                           kind=full.kind, reference=full.reference)]


_SPECS: list[ModelSpec] = [
    *_pair(ModelSpec("densenet121", "classification", "MONAI DenseNet121 (the published backbone)", _densenet121,
                     "DenseNet-121", "cnn", _DENSE_CAM, reference=_REF_DENSENET),
           ModelSpec("densenet_tiny", "classification", "DenseNet, 3 blocks of 2 layers, growth 8 (CPU demo)",
                     _densenet_small((2, 2, 2)), cam_layer=_DENSE_CAM)),
    *_pair(ModelSpec("densenet169", "classification", "MONAI DenseNet169", _densenet169, "DenseNet-169", "cnn",
                     _DENSE_CAM, reference=_REF_DENSENET),
           ModelSpec("densenet169_tiny", "classification", "DenseNet, 4 blocks of 1-2-4-4 layers, growth 8 (CPU)",
                     _densenet_small((1, 2, 4, 4)), cam_layer=_DENSE_CAM)),
    *_pair(ModelSpec("resnet18", "classification", "MONAI ResNet-18", _resnet(18), "ResNet-18", "cnn", "layer4",
                     reference=_REF_RESNET),
           ModelSpec("resnet_tiny", "classification", "ResNet, 1 basic block per stage, widths 8-64 (CPU demo)",
                     _resnet_small("basic", (1, 1, 1, 1)), cam_layer="layer4")),
    *_pair(ModelSpec("resnet34", "classification", "MONAI ResNet-34", _resnet(34), "ResNet-34", "cnn", "layer4",
                     reference=_REF_RESNET),
           ModelSpec("resnet34_tiny", "classification", "ResNet, 1-2-3-1 basic blocks, widths 8-64 (CPU)",
                     _resnet_small("basic", (1, 2, 3, 1)), cam_layer="layer4")),
    *_pair(ModelSpec("resnet50", "classification", "MONAI ResNet-50", _resnet(50), "ResNet-50", "cnn", "layer4",
                     reference=_REF_RESNET),
           ModelSpec("resnet50_tiny", "classification", "ResNet, 1 bottleneck block per stage, widths 8-64 (CPU)",
                     _resnet_small("bottleneck", (1, 1, 1, 1)), cam_layer="layer4")),
    *_pair(ModelSpec("seresnet50", "classification", "MONAI SE-ResNet-50", _seresnet50, "SE-ResNet-50", "cnn",
                     "layer4", reference=_REF_SE),
           ModelSpec("seresnet50_tiny", "classification", "SE-ResNet, 1 SE bottleneck per stage, widths 8-64 (CPU)",
                     lambda s: _SENetSmall("se_resnet_bottleneck", groups=1, widths=(8, 16, 32, 64)), cam_layer="layer4")),
    *_pair(ModelSpec("seresnext50", "classification", "MONAI SE-ResNeXt-50 (32x4d)", _seresnext50, "SE-ResNeXt-50",
                     "cnn", "layer4", reference=_REF_SE + "; Xie et al. 2017, arXiv:1611.05431"),
           ModelSpec("seresnext50_tiny", "classification", "SE-ResNeXt, 1 block per stage, 4 groups (CPU)",
                     lambda s: _SENetSmall("se_resnetxt_bottleneck", groups=4), cam_layer="layer4")),
    *_pair(ModelSpec("efficientnet_b0", "classification", "MONAI EfficientNet-B0 (no pretrained weights)",
                     _efficientnet(1.0, 1.0, 0.2, 0.2), "EfficientNet-B0", "cnn", "_bn1", reference=_REF_EFF),
           ModelSpec("efficientnet_b0_tiny", "classification", "EfficientNet-B0 at width 0.25, depth 0.5 (CPU)",
                     _efficientnet(0.25, 0.5, 0.0, 0.0), cam_layer="_bn1")),
    *_pair(ModelSpec("convnext_t", "classification", "ConvNeXt-T (in-house; 3-3-9-3 blocks, 96-768 channels)",
                     lambda s: ConvNeXt(), "ConvNeXt-T", "cnn", "stages.3", reference=_REF_CONVNEXT),
           ModelSpec("convnext_t_tiny", "classification", "ConvNeXt, 1 block per stage, 8-64 channels, stem 2 (CPU)",
                     lambda s: ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), drop_path=0.0, stem=2),
                     cam_layer="stages.3")),
    *_pair(ModelSpec("vit", "classification", "MONAI ViT-B/16 (768 hidden, 12 layers, 12 heads)",
                     lambda s: _ViTClassifier(s, 768, 3072, 12, 12, 16), "ViT-B/16", "transformer", None, "rollout",
                     reference=_REF_VIT),
           ModelSpec("vit_tiny", "classification", "ViT, 64 hidden, 2 layers, 4 heads, patch 8 (CPU demo)",
                     lambda s: _ViTClassifier(s, 64, 128, 2, 4, 8), cam_method="rollout")),
    *_pair(ModelSpec("swin_t", "classification", "Swin-T on MONAI's SwinTransformer (96, 2-2-6-2, window 7)",
                     lambda s: SwinClassifier(s), "Swin-T", "transformer", "swin.layers4.0", reference=_REF_SWIN),
           ModelSpec("swin_t_tiny", "classification", "Swin, embed 16, 1 block per stage, window 4, patch 2 (CPU)",
                     lambda s: SwinClassifier(s, 16, (1, 1, 1, 1), (1, 2, 4, 8), window=4, patch=2, drop_path=0.0),
                     cam_layer="swin.layers4.0")),
    ModelSpec("unet", "segmentation", "MONAI residual U-Net, 4 levels (tumour segmentation)", _unet, "U-Net",
              cam_method="none"),
]
_REGISTRY: dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def available_models(task: str | None = None) -> list[str]:
    """Names in the registry, optionally only those of one ``task``."""
    return [n for n, s in _REGISTRY.items() if task is None or s.task == task]


def full_size_models() -> list[str]:
    """The full-size response backbones (each has a CPU-sized variant)."""
    return [n for n, s in _REGISTRY.items() if s.task == "classification" and s.full_size is None]


def cpu_models() -> list[str]:
    """The CPU-sized response backbones."""
    return [n for n, s in _REGISTRY.items() if s.full_size is not None]


def model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``.

    Raises
    ------
    KeyError
        For an unknown name, listing the valid ones.
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        raise KeyError(f"unknown network {name!r}; available: {', '.join(_REGISTRY)}")
    return spec


def build_model(name: str, slice_size: int = 64, *, seed: int | None = None,
                pretrained: str | Path | None = None) -> nn.Module:
    """Instantiate a registered network.

    Parameters
    ----------
    name : str
        Registry name, see :func:`available_models`.
    slice_size : int
        Side of the square input slices (needed by the transformers' patch grids and EfficientNet's padding).
    seed : int, optional
        Seeds the initial weights so every site and the server can start from the same model.
    pretrained : path, optional
        A local state-dict file (see :func:`load_pretrained`) loaded over the initial weights.

    Raises
    ------
    KeyError
        For an unknown name, listing the valid ones.
    ValueError
        When ``pretrained`` does not fit the network.
    """
    spec = model_spec(name)
    if slice_size < 16:
        raise ValueError(f"slice_size must be at least 16, got {slice_size}")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.factory(slice_size)
    else:
        model = spec.factory(slice_size)
    if pretrained is not None:
        load_pretrained(model, read_state_file(pretrained), source=str(pretrained), network=name,
                        slice_size=slice_size)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- local pretrained weights


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local weights file: a torch state dict (``.pt``/``.pth``, possibly under a ``state_dict`` or
    ``model`` key, ``module.`` prefixes removed) or an ``.npz`` of arrays (e.g. a run's ``models/final.npz``).

    Nothing is downloaded; torch files are read with ``weights_only=True`` (no code runs).

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        When it holds no mapping of tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {p} (train.pretrained_path); give a local "
                                "state-dict file, nothing is downloaded")
    if p.suffix == ".npz":
        with np.load(p) as z:
            return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-tensor payloads
        raise ValueError(f"{p}: not a readable torch state dict ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{p}: expected a mapping of parameter names to tensors (a state dict)")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def load_pretrained(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "<weights>",
                    network: str = "?", slice_size: int | None = None) -> nn.Module:
    """Load ``state`` into ``model`` after checking that every name and shape fits (BatchNorm counters aside).

    Raises
    ------
    ValueError
        Naming the file, the network, and the first missing, unexpected and mis-shaped parameters.
    """
    from shared.records import is_local_only

    own = model.state_dict()
    missing = [k for k in own if k not in state and not is_local_only(k)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{name} {items[:4]}{' ...' if len(items) > 4 else ''} ({len(items)})"
                 for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                 if items]
        size = f" at slice_size {slice_size}" if slice_size is not None else ""
        raise ValueError(f"pretrained weights {source} do not fit network {network!r}{size}: " + "; ".join(parts)
                         + ". The file must be a state dict of this registry network (1 input channel, 1 logit); "
                           "adapt ImageNet checkpoints (first convolution, head) before loading them")
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return model


# --------------------------------------------------------------------------- what both sides know about a run's networks


def signature_keys(cfg: RectalFLConfig) -> list[str]:
    """The backbones a run trains: every configured timepoint x sequence, e.g. ``pre_t2w``."""
    return [f"{tp}_{seq}" for tp in cfg.data.timepoints for seq in cfg.data.sequences]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def training_seed(cfg: RectalFLConfig) -> int:
    """``train.seed`` if set, else the run's ``seed``."""
    return cfg.train.seed if cfg.train.seed is not None else cfg.seed


def initial_states(cfg: RectalFLConfig) -> dict[str, OrderedDict[str, torch.Tensor]]:
    """The same seeded initial weights for every backbone, on any machine (server and sites agree).

    With ``train.pretrained_path``, every backbone starts from that file's weights instead: a plain
    state dict serves every backbone; a file with backbone-prefixed names (``pre_t2w/<param>``, as a
    run's ``models/final.npz``) gives each backbone its own. The weights are loaded into the network
    as built, before ``privacy.dp`` makes it DP-compatible (:func:`run_network`).
    """
    pretrained = None
    if cfg.train.pretrained_path is not None:
        pretrained = read_state_file(cfg.train.pretrained_path)
    states = {}
    for key in signature_keys(cfg):
        model = build_model(cfg.train.backbone, cfg.preprocess.slice_size,
                            seed=stable_seed(training_seed(cfg), "init", key))
        if pretrained is not None:
            own = {n.partition("/")[2]: t for n, t in pretrained.items() if n.startswith(f"{key}/")}
            load_pretrained(model, own or pretrained, source=f"{cfg.train.pretrained_path} ({key})",
                            network=cfg.train.backbone, slice_size=cfg.preprocess.slice_size)
        if cfg.privacy.dp:
            model = dp_compatible(model)[0]
        states[key] = OrderedDict(model.state_dict())
    return states


def models_from_states(cfg: RectalFLConfig, states: dict[str, OrderedDict[str, torch.Tensor]]) -> dict[str, nn.Module]:
    """One network per backbone key, loaded with ``states`` (site-local buffers may be absent)."""
    from shared.records import is_local_only

    models = {}
    for key, sd in states.items():
        m = run_network(cfg)
        missing, unexpected = m.load_state_dict(sd, strict=False)
        bad = [k for k in missing if not is_local_only(k)] + list(unexpected)
        if bad:
            raise ValueError(f"weights for {key} do not fit network {cfg.train.backbone!r}: "
                             f"missing/unexpected {bad[:5]}{'...' if len(bad) > 5 else ''}")
        models[key] = m
    return models


# --------------------------------------------------------------------------- differential privacy (issue 16)


def run_network(cfg: RectalFLConfig, *, seed: int | None = None) -> nn.Module:
    """The run's backbone network: :func:`build_model`, made DP-compatible when ``privacy.dp`` is on.

    Server and sites call this (through :func:`initial_states` / :func:`models_from_states`), so
    every side agrees on the architecture: with DP, Opacus' ``ModuleValidator.fix`` replaces
    BatchNorm by GroupNorm deterministically (see :func:`dp_compatible`).
    """
    model = build_model(cfg.train.backbone, cfg.preprocess.slice_size, seed=seed)
    return dp_compatible(model)[0] if cfg.privacy.dp else model


def dp_compatible(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Opacus' standard conversion of a network for DP-SGD, and what it changed.

    ``ModuleValidator.fix`` replaces every BatchNorm by a GroupNorm (``gcd(32, channels)`` groups;
    BatchNorm mixes the patients of a batch, so per-sample gradients would not be per sample) and
    drops running statistics of InstanceNorm; then the result is validated.

    Returns
    -------
    model : nn.Module
        A converted copy (the input is left as it was).
    changes : list of str
        ``"<layer>: BatchNorm2d(16) -> GroupNorm(16, 16)"`` per replaced layer.

    Raises
    ------
    ValueError
        When the converted network still has layers Opacus cannot train privately (named).
    """
    from opacus.validators import ModuleValidator
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    quiet = [logging.getLogger(n) for n in ("opacus.validators.module_validator", "opacus.validators.batch_norm")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        before = dict(model.named_modules())
        was_training = model.training
        fixed = ModuleValidator.fix(model.train())
        model.train(was_training)
        problems = [f"{type(e).__name__}: {e}" for e in ModuleValidator.validate(fixed.train(), strict=False)]
    finally:
        for q, lv in zip(quiet, levels, strict=True):
            q.setLevel(lv)
    for name, m in fixed.named_modules():
        # Opacus fixes exact types only: a subclass of BatchNorm (or a norm keeping running statistics) is left
        if isinstance(m, _BatchNorm) or (isinstance(m, _InstanceNorm) and m.track_running_stats):
            problems.append(f"layer {name or '<root>'} ({type(m).__name__}) normalises over the batch and Opacus "
                            "has no replacement for it")
    if problems:
        raise ValueError("Opacus cannot make this network differentially private: " + "; ".join(problems[:5]))
    changes = [f"{name}: {_short(before[name])} -> {_short(m)}" for name, m in fixed.named_modules()
               if name in before and type(before[name]) is not type(m)]
    return fixed, changes


def _short(m: nn.Module) -> str:
    if isinstance(m, nn.GroupNorm):
        return f"GroupNorm({m.num_groups} groups, {m.num_channels} channels)"
    n = getattr(m, "num_features", None)
    return f"{type(m).__name__}({n})" if n is not None else type(m).__name__


@lru_cache(maxsize=16)
def dp_network_changes(name: str, slice_size: int) -> tuple[str, ...]:
    """The layers :func:`dp_compatible` changes in network ``name`` (built once per process).

    Raises
    ------
    ValueError
        Naming the network, when it is unknown or Opacus cannot make it DP-compatible.
    """
    try:
        model = build_model(name, slice_size)
    except KeyError as exc:
        raise ValueError(str(exc).strip('"')) from None
    try:
        return tuple(dp_compatible(model)[1])
    except ValueError as exc:
        raise ValueError(f"network {name!r} cannot be trained with privacy.dp: {exc}; choose another "
                         f"train.backbone or set privacy.dp: false") from None
