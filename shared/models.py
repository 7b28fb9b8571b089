"""Network registry over MONAI: one name -> one 2D single-channel binary classifier (or a U-Net).

Every response backbone takes a batch of slices ``(B, 1, S, S)`` and returns one logit per slice
``(B, 1)``; the sigmoid of it is the deep-learning signature. ``*_tiny`` variants are the same
architectures at a fraction of the width, for CPU demos and tests.

    >>> from shared.models import build_model, available_models
    >>> net = build_model("densenet121", slice_size=256)
    >>> build_model("densenet12")
    Traceback (most recent call last):
    ...
    KeyError: "unknown network 'densenet12'; available: densenet121, densenet_tiny, ..."
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from monai.networks import nets
from torch import nn

from shared.config import RectalFLConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str  # "classification" | "segmentation"
    description: str
    factory: Callable[[int], nn.Module]


def _densenet121(size: int) -> nn.Module:
    return nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=1)


def _densenet_tiny(size: int) -> nn.Module:
    return nets.DenseNet(spatial_dims=2, in_channels=1, out_channels=1, init_features=8, growth_rate=8,
                         block_config=(2, 2, 2), bn_size=2)


def _resnet(depth: int) -> Callable[[int], nn.Module]:
    def make(size: int) -> nn.Module:
        factory = {18: nets.resnet18, 34: nets.resnet34, 50: nets.resnet50}[depth]
        return factory(spatial_dims=2, n_input_channels=1, num_classes=1)

    return make


def _resnet_tiny(size: int) -> nn.Module:
    return nets.ResNet(block="basic", layers=(1, 1, 1, 1), block_inplanes=(8, 16, 32, 64), spatial_dims=2,
                       n_input_channels=1, num_classes=1)


class _ViTClassifier(nn.Module):
    """MONAI ViT whose classification head returns raw logits ``(B, 1)``."""

    def __init__(self, size: int, hidden: int, mlp: int, layers: int, heads: int, patch: int) -> None:
        super().__init__()
        if size % patch:
            raise ValueError(f"slice_size ({size}) must be a multiple of the ViT patch size ({patch})")
        self.vit = nets.ViT(in_channels=1, img_size=(size, size), patch_size=(patch, patch), hidden_size=hidden,
                            mlp_dim=mlp, num_layers=layers, num_heads=heads, classification=True, num_classes=1,
                            spatial_dims=2, post_activation=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.vit(x)
        return out


def _unet(size: int) -> nn.Module:
    return nets.UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                     num_res_units=2)


_REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("densenet121", "classification", "MONAI DenseNet121 (the published backbone)", _densenet121),
        ModelSpec("densenet_tiny", "classification", "DenseNet, 3 blocks of 2 layers, growth 8 (CPU demo)",
                  _densenet_tiny),
        ModelSpec("resnet18", "classification", "MONAI ResNet-18", _resnet(18)),
        ModelSpec("resnet34", "classification", "MONAI ResNet-34", _resnet(34)),
        ModelSpec("resnet50", "classification", "MONAI ResNet-50", _resnet(50)),
        ModelSpec("resnet_tiny", "classification", "ResNet, 1 basic block per stage, widths 8-64 (CPU demo)",
                  _resnet_tiny),
        ModelSpec("vit", "classification", "MONAI ViT-B/16 (768 hidden, 12 layers, 12 heads)",
                  lambda s: _ViTClassifier(s, 768, 3072, 12, 12, 16)),
        ModelSpec("vit_tiny", "classification", "ViT, 64 hidden, 2 layers, 4 heads, patch 8 (CPU demo)",
                  lambda s: _ViTClassifier(s, 64, 128, 2, 4, 8)),
        ModelSpec("unet", "segmentation", "MONAI residual U-Net, 4 levels (tumour segmentation)", _unet),
    ]
}


def available_models(task: str | None = None) -> list[str]:
    """Names in the registry, optionally only those of one ``task``."""
    return [n for n, s in _REGISTRY.items() if task is None or s.task == task]


def build_model(name: str, slice_size: int = 64, *, seed: int | None = None) -> nn.Module:
    """Instantiate a registered network.

    Parameters
    ----------
    name : str
        Registry name, see :func:`available_models`.
    slice_size : int
        Side of the square input slices (needed by the ViT's patch grid).
    seed : int, optional
        Seeds the initial weights so every site and the server can start from the same model.

    Raises
    ------
    KeyError
        For an unknown name, listing the valid ones.
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        raise KeyError(f"unknown network {name!r}; available: {', '.join(_REGISTRY)}")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return spec.factory(slice_size)
    return spec.factory(slice_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
    """The same seeded initial weights for every backbone, on any machine (server and sites agree)."""
    return {
        key: OrderedDict(run_network(cfg, seed=stable_seed(training_seed(cfg), "init", key)).state_dict())
        for key in signature_keys(cfg)
    }


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
