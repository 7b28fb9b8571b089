"""Local training of the response backbones: plain functions, testable without Flower.

One backbone per signature key ``<timepoint>_<sequence>`` (``pre_t2w``, ``post_dwi``, ...), each
trained on the preprocessed largest-tumour slices of the site's training split:

- input: the cached uint8 slice scaled to [0, 1], shape ``(B, 1, S, S)``;
- augmentation: random resized crop (scale 0.8-1.0, ratio 0.9-1.1) back to ``S x S`` and a
  horizontal flip, per sample, from a seeded generator;
- loss: binary cross-entropy on one logit, optionally class-weighted (``pos_weight = n_neg / n_pos``),
  plus the FedProx proximal term ``mu/2 * ||w - w_global||^2`` when ``mu > 0``;
- optimiser: SGD (lr 0.01, momentum 0.9, batch 32 by default).

Everything is deterministic given the seed on CPU: the seed of a local update is derived from
(run seed, site, backbone, round), so a resumed run replays the same updates.

With differential privacy (``privacy.dp``; pass a :class:`DPSGD` from the site's privacy ledger,
:mod:`client.privacy_ledger`) the same loop runs DP-SGD with Opacus: Poisson sampling of each batch
(Opacus' ``UniformWithReplacementSampler``), per-sample gradients (Opacus' ``GradSampleModule``, or
``torch.func`` for networks whose forward Opacus' hooks cannot follow), per-sample clipping and
Gaussian noise (Opacus' ``DPOptimizer``), each step recorded by the site's Opacus accountant. The
sampling and the noise are drawn from a secret only the site holds, never from the run's seed.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from shared.config import TrainConfig
from shared.models import (  # noqa: F401 - re-exported: the site's training code uses these names
    build_model,
    initial_states,
    models_from_states,
    signature_keys,
    stable_seed,
    training_seed,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but CUDA is not available on this machine; use 'auto' or 'cpu'")
    return dev


@dataclass(frozen=True)
class Precision:
    """What mixed precision a training loop uses on its device (see :func:`resolve_precision`)."""

    dtype: torch.dtype | None  # autocast dtype; None = fp32, no autocast
    scaler: bool  # a GradScaler (fp16 only)
    channels_last: bool
    compile: bool = False  # train through torch.compile (CUDA only)
    deterministic: bool = True  # CUDA: deterministic cuDNN kernels; False = autotuned (cudnn.benchmark)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def resolve_precision(precision: str, channels_last: bool, device: torch.device,
                      bf16_supported: bool | None = None, *, compile: bool = False,
                      deterministic: bool = True) -> Precision:
    """``train.precision`` / ``channels_last`` / ``compile`` / ``deterministic`` on ``device``: every
    switch is off except on CUDA (CPU training is fp32, eager and deterministic).

    ``auto`` is bf16 where the GPU supports it (``torch.cuda.is_bf16_supported``), else fp16.
    """
    if device.type != "cuda":
        if precision not in ("fp32", "auto") or channels_last or compile:
            logger.info("train.precision=%s / channels_last=%s / compile=%s apply on CUDA only; training in "
                        "fp32, eager, on %s", precision, channels_last, compile, device)
        return Precision(None, False, False)
    if precision == "auto":
        if bf16_supported is None:
            bf16_supported = bool(torch.cuda.is_bf16_supported())
        precision = "bf16" if bf16_supported else "fp16"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Precision(dtype, dtype is torch.float16, bool(channels_last), bool(compile), bool(deterministic))


def training_network(model: nn.Module, prec: Precision, device: torch.device) -> nn.Module:
    """The module a training loop calls: ``model`` itself, or ``torch.compile(model)`` (same parameters)
    when ``prec.compile``; on CUDA also sets cuDNN's deterministic / autotuning mode from ``prec``."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = prec.deterministic
        torch.backends.cudnn.benchmark = not prec.deterministic
    if prec.compile:
        return torch.compile(model)  # type: ignore[return-value]
    return model


# --------------------------------------------------------------------------- splits


def assign_splits(labels: pd.Series, scheme: str = "8:1:1", seed: int = 42, site: str = "") -> pd.Series:
    """Patient-level stratified split, seeded per site.

    Parameters
    ----------
    labels : Series of shape (n_patients,)
        0/1 outcome indexed by patient_id.
    scheme : {"8:1:1", "7:3"}
        train/val/test or train/test fractions.

    Returns
    -------
    Series of shape (n_patients,)
        ``"train"``, ``"val"`` or ``"test"`` per patient_id (same index as ``labels``).
    """
    fractions = {"8:1:1": (0.8, 0.1, 0.1), "7:3": (0.7, 0.0, 0.3)}.get(scheme)
    if fractions is None:
        raise ValueError(f"unknown split scheme {scheme!r}; use '8:1:1' or '7:3'")
    rng = np.random.default_rng(stable_seed(seed, "split", site))
    out = pd.Series("train", index=labels.index, dtype=object)
    for cls in sorted(labels.dropna().unique()):
        ids = np.array(sorted(labels.index[labels == cls]))
        rng.shuffle(ids)
        n = len(ids)
        n_test = int(round(n * fractions[2]))
        n_val = int(round(n * fractions[1]))
        if n >= 3 and fractions[2] > 0:
            n_test = max(n_test, 1)
        if n >= 5 and fractions[1] > 0:
            n_val = max(n_val, 1)
        out.loc[ids[:n_test]] = "test"
        out.loc[ids[n_test:n_test + n_val]] = "val"
    return out


# --------------------------------------------------------------------------- data


@dataclass
class SliceSet:
    """The slices of one backbone at one site.

    Attributes
    ----------
    x : ndarray of shape (n, 1, S, S), float32 in [0, 1]
    y : ndarray of shape (n,), float32 0/1
    patient_ids : list of str, length n
    split : ndarray of shape (n,), the split of each patient
    """

    key: str
    x: np.ndarray
    y: np.ndarray
    patient_ids: list[str]
    split: np.ndarray

    def subset(self, splits: Iterable[str]) -> SliceSet:
        m = np.isin(self.split, list(splits))
        return SliceSet(self.key, self.x[m], self.y[m], [p for p, k in zip(self.patient_ids, m, strict=True) if k],
                        self.split[m])

    def __len__(self) -> int:
        return len(self.y)


def load_slice_sets(cache_dir: Path, labels: pd.Series, splits: pd.Series, keys: list[str]) -> dict[str, SliceSet]:
    """Read the preprocessed slices of every backbone from a site's cache.

    Volumes whose manifest status is not ``ok`` (``excluded`` included), patients the exclusion rule
    removed (``exclusions.csv``) and patients without a label are left out here (the manifest and
    the site check already record why); the counts are logged.
    """
    from client.preprocess import excluded_patients, load_manifest, load_slice

    manifest = load_manifest(cache_dir)
    manifest = manifest[~manifest["patient_id"].astype(str).isin(excluded_patients(cache_dir))]
    sets: dict[str, SliceSet] = {}
    for key in keys:
        tp, seq = key.split("_", 1)
        rows = manifest[(manifest["timepoint"] == tp) & (manifest["sequence"] == seq)]
        ok = rows[rows["status"] == "ok"]
        xs, ys, ids, sp = [], [], [], []
        for pid in sorted(ok["patient_id"].astype(str)):
            if pid not in labels.index or pd.isna(labels.loc[pid]):
                continue
            img, _ = load_slice(cache_dir, pid, tp, seq)
            xs.append(img.astype(np.float32)[None] / 255.0)
            ys.append(float(labels.loc[pid]))
            ids.append(pid)
            sp.append(splits.loc[pid])
        skipped = len(rows) - len(ok)
        if skipped:
            logger.info("%s: %d volume(s) not usable in the cache (status != ok)", key, skipped)
        size = _slice_size(manifest, cache_dir)
        sets[key] = SliceSet(
            key,
            np.stack(xs).astype(np.float32) if xs else np.zeros((0, 1, size, size), np.float32),
            np.asarray(ys, np.float32),
            ids,
            np.asarray(sp, dtype=object),
        )
    return sets


def _slice_size(manifest: pd.DataFrame, cache_dir: Path) -> int:
    from client.preprocess import load_slice

    ok = manifest[manifest["status"] == "ok"]
    if ok.empty:
        return 1
    r = ok.iloc[0]
    img, _ = load_slice(cache_dir, str(r["patient_id"]), r["timepoint"], r["sequence"])
    return int(img.shape[0])


# --------------------------------------------------------------------------- augmentation


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                        gen: torch.Generator) -> torch.Tensor:
    """Per-sample random resized crop back to the input size.

    Parameters
    ----------
    x : Tensor of shape (B, C, H, W)
    scale : (min, max) fraction of the image area kept
    ratio : (min, max) aspect ratio (w / h) of the crop
    """
    b, _, h, w = x.shape
    out = torch.empty_like(x)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(b):
        for _ in range(10):
            area = h * w * float(torch.empty(1).uniform_(scale[0], scale[1], generator=gen))
            r = math.exp(float(torch.empty(1).uniform_(log_r[0], log_r[1], generator=gen)))
            cw, ch = round(math.sqrt(area * r)), round(math.sqrt(area / r))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            cw, ch = w, h
        top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = x[i: i + 1, :, top: top + ch, left: left + cw]
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
    return out


def augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    x = random_resized_crop(x, cfg.crop_scale, cfg.crop_ratio, gen)
    if cfg.hflip:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], torch.flip(x, dims=[3]), x)
    return x


# --------------------------------------------------------------------------- training


@dataclass
class TrainStats:
    n_examples: int
    steps: int
    loss_first_epoch: float
    loss_last_epoch: float
    seconds: float
    epoch_losses: list[float] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = None  # the SGD state after training (train.keep_optimizer_state)


def train_backbone(model: nn.Module, data: SliceSet, cfg: TrainConfig, *, epochs: int, seed: int,
                   device: torch.device | None = None, global_state: dict[str, torch.Tensor] | None = None,
                   proximal_mu: float = 0.0, dp: DPSGD | None = None, max_steps: int | None = None,
                   optimizer_state: dict[str, Any] | None = None) -> TrainStats:
    """Train ``model`` in place on ``data`` for ``epochs`` local epochs (or ``max_steps`` SGD steps).

    Parameters
    ----------
    global_state : dict, optional
        The round's global weights; with ``proximal_mu > 0`` adds the FedProx term.
    dp : DPSGD, optional
        Train with DP-SGD (see :func:`train_backbone_dp`); ``model`` must be DP-compatible
        (``shared.models.run_network`` with ``privacy.dp``).
    max_steps : int, optional
        Local work in optimiser steps (``train.local_steps``): epochs over fresh shuffles until this many
        steps are done, ``epochs`` ignored.
    optimizer_state : dict, optional
        An SGD ``state_dict`` to continue from (the site's momentum of its previous round,
        ``train.keep_optimizer_state``); the state after training is returned in ``TrainStats``.
    """
    if dp is not None:
        return train_backbone_dp(model, data, cfg, epochs=epochs, seed=seed, dp=dp, device=device,
                                 global_state=global_state, proximal_mu=proximal_mu)
    device = device or torch.device("cpu")
    prec = resolve_precision(cfg.precision, cfg.channels_last, device, compile=cfg.compile,
                             deterministic=cfg.deterministic)
    t0 = time.perf_counter()
    n = len(data)
    if n == 0:
        return TrainStats(0, 0, float("nan"), float("nan"), 0.0)
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    fmt = torch.channels_last if prec.channels_last and data.x.ndim == 4 else None
    if fmt is not None:
        model.to(memory_format=fmt)
    net = training_network(model, prec, device)
    scaler = torch.amp.GradScaler("cuda") if prec.scaler else None
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
        for group in opt.param_groups:  # the configured hyper-parameters, not the stored ones
            group.update(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    pos = float(data.y.sum())
    neg = n - pos
    pos_weight = torch.tensor([neg / pos if (cfg.class_weighting and pos > 0 and neg > 0) else 1.0], device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    anchors = None
    if proximal_mu > 0 and global_state is not None:
        anchors = {k: v.detach().to(device) for k, v in global_state.items()}
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y)
    cuda = device.type == "cuda"
    if cuda:  # page-locked host memory: asynchronous copies to the GPU
        x_all, y_all = x_all.pin_memory(), y_all.pin_memory()
    losses: list[float] = []
    steps = 0
    bs = cfg.batch_size
    epoch = 0
    while (epoch < epochs) if max_steps is None else (steps < max_steps):
        epoch += 1
        perm = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for start in range(0, n, bs):
            idx = perm[start: start + bs]
            if len(idx) < 2 and n >= 2:  # BatchNorm needs 2 samples; fold a lone sample into the epoch end
                continue
            if max_steps is not None and steps >= max_steps:
                break
            xb = augment(x_all[idx], cfg, gen).to(device, non_blocking=cuda)
            if fmt is not None:
                xb = xb.contiguous(memory_format=fmt)
            yb = y_all[idx].to(device, non_blocking=cuda)
            with torch.autocast(device.type, dtype=prec.dtype, enabled=prec.dtype is not None):
                logits = net(xb).reshape(-1)
            loss = loss_fn(logits.float(), yb)
            if anchors is not None:
                prox = sum(((p - anchors[name]) ** 2).sum() for name, p in model.named_parameters())
                loss = loss + 0.5 * proximal_mu * prox
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            steps += 1
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / max(count, 1))
        if count == 0:  # nothing trainable in an epoch (one sample): more epochs would not add steps
            break
    model.to("cpu")
    if fmt is not None:
        model.to(memory_format=torch.contiguous_format)
    state = None
    if optimizer_state is not None or cfg.keep_optimizer_state:
        state = opt.state_dict()
        for st in state["state"].values():
            for k, v in st.items():
                if torch.is_tensor(v):
                    st[k] = v.detach().to("cpu").clone()
    return TrainStats(n, steps, losses[0], losses[-1], time.perf_counter() - t0, losses, state)


@torch.no_grad()
def recompute_norm_stats(model: nn.Module, data: SliceSet, *, device: torch.device | None = None,
                         batch_size: int = 64) -> int:
    """Re-estimate every BatchNorm layer's running statistics on ``data`` (images only, no labels).

    One pass with only the normalisation layers in training mode (dropout stays off); each batch's
    statistics enter with weight ``batch size / images so far``, so a running mean is the mean over all
    the images (a running variance the size-weighted mean of the batches' variances). The model is left
    in eval mode on the CPU. Returns the number of BatchNorm layers re-estimated (0: nothing to do).
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms or len(data) == 0:
        return 0
    device = device or torch.device("cpu")
    model.to(device).eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.train()
    x = torch.from_numpy(data.x)
    n = len(data)
    step = batch_size if n - batch_size * (n // batch_size) != 1 else batch_size + 1  # no batch of one
    seen = 0
    for start in range(0, n, step):
        xb = x[start: start + step]
        seen += len(xb)
        for m in norms:
            m.momentum = len(xb) / seen
        model(xb.to(device))
    for m, mom in zip(norms, saved, strict=True):
        m.momentum = mom
    model.eval().to("cpu")
    return len(norms)


# --------------------------------------------------------------------------- differential privacy


@dataclass
class DPSGD:
    """DP-SGD settings of one backbone's local update (made by :mod:`client.privacy_ledger`).

    Attributes
    ----------
    noise_multiplier : float
        Noise std as a multiple of ``max_grad_norm``.
    max_grad_norm : float
        Per-sample clipping bound (L2 over all parameters).
    sample_rate : float
        Poisson sampling probability of each case per step.
    steps_per_epoch : int
        ``round(1 / sample_rate)`` steps make one (expected) pass over the data.
    accountant : opacus accountant
        Stepped once per optimiser step (``noise_multiplier``, ``sample_rate``).
    secret : int
        The site's secret seed of the sampling and the noise (never sent, never from the run config).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps_per_epoch: int
    accountant: Any
    secret: int


_ENGINE: dict[tuple[Any, ...], str] = {}
"""Per-sample gradient engine that works for each network shape (probed once per process)."""


def _no_inplace(model: nn.Module) -> None:
    # Opacus' backward hooks forbid in-place changes of a hooked layer's output (ReLU(inplace=True))
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False


def _signature(model: nn.Module) -> tuple[Any, ...]:
    return (type(model).__qualname__, tuple((n, tuple(p.shape)) for n, p in model.named_parameters()))


def per_sample_engine(model: nn.Module, example: torch.Tensor) -> str:
    """``"opacus"`` (Opacus' GradSampleModule hooks) when they follow this network, else ``"functorch"``.

    Opacus' hooks are faster but cannot follow some forwards (an in-place ``out += residual`` on a
    hooked layer's output in ResNets; parameters used outside a layer, as ViT's class token). The
    probe runs a copy of the network on two examples and checks every parameter got per-sample
    gradients; the answer is kept per network shape.
    """
    key = _signature(model)
    if key not in _ENGINE:
        import copy

        from opacus import GradSampleModule

        probe = copy.deepcopy(model).train()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gsm = GradSampleModule(probe, batch_first=True, loss_reduction="mean")
                gsm(example[:2]).sum().backward()
            ok = all(getattr(p, "grad_sample", None) is not None and p.grad_sample.shape[0] == 2
                     for p in probe.parameters() if p.requires_grad)
            gsm.to_standard_module()
        except (RuntimeError, TypeError, NotImplementedError, ValueError) as exc:
            logger.info("Opacus hooks cannot follow %s (%s); per-sample gradients by torch.func",
                        type(model).__name__, str(exc).splitlines()[0][:120])
            ok = False
        _ENGINE[key] = "opacus" if ok else "functorch"
    return _ENGINE[key]


def _functorch_grad_samples(model: nn.Module, loss_fn: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> None:
    """Per-sample gradients of ``loss_fn`` by ``torch.func`` (vmap of grad), into ``p.grad_sample``."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def one(ps: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (ps, buffers), (x.unsqueeze(0),)).reshape(-1)
        return loss_fn(out, y.reshape(1))

    grads = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")(params, xb, yb)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.grad_sample = grads[n]


def clipped_per_sample_norms(model: nn.Module) -> torch.Tensor:
    """L2 norm over all parameters of each sample's gradient (``p.grad_sample``), shape ``(B,)``."""
    gs = [p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in model.parameters()
          if getattr(p, "grad_sample", None) is not None]
    return torch.cat(gs, dim=1).norm(2, dim=1)


def train_backbone_dp(model: nn.Module, data: SliceSet, cfg: TrainConfig, *, epochs: int, seed: int, dp: DPSGD,
                      device: torch.device | None = None, global_state: dict[str, torch.Tensor] | None = None,
                      proximal_mu: float = 0.0, on_step: Any = None) -> TrainStats:
    """DP-SGD local update of ``model`` in place (Opacus), accounted in ``dp.accountant``.

    Each of the ``epochs * dp.steps_per_epoch`` steps: a Poisson batch (each case with probability
    ``dp.sample_rate``, from the site's secret), augmentation as without DP (seeded by ``seed``),
    per-sample gradients of the unweighted BCE (a class weight ``n_neg / n_pos`` would make every
    case's gradient depend on the others' labels), clipping of each to ``dp.max_grad_norm``, their
    sum plus N(0, (noise_multiplier * max_grad_norm)^2) noise, divided by the expected batch size.
    An empty batch still takes a step (noise only), as the analysis assumes. The FedProx gradient
    ``mu (w - w_global)`` and weight decay depend on no case and are added after the noise.

    Parameters
    ----------
    on_step : callable, optional
        ``on_step(model)`` after Opacus' clipping and noise, before the parameter update: each
        parameter then holds ``grad_sample`` (per-sample gradients, unclipped), ``summed_grad``
        (sum of the clipped ones) and ``grad`` (noisy mean). For tests.

    Returns
    -------
    TrainStats
        ``loss_*`` are means of the (pre-noise) batch losses, for the site's own log only: under
        DP they are not sent to the server.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from torch.nn.modules.batchnorm import _BatchNorm

    if any(isinstance(m, _BatchNorm) for m in model.modules()):
        raise ValueError("DP-SGD needs a network without BatchNorm: build it with privacy.dp on "
                         "(shared.models.run_network), which converts BatchNorm to GroupNorm")
    device = device or torch.device("cpu")
    t0 = time.perf_counter()
    n = len(data)
    if n == 0:
        return TrainStats(0, 0, float("nan"), float("nan"), 0.0)
    model.to(device).train()
    _no_inplace(model)
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y)
    engine = per_sample_engine(model, (x_all[:2] if n >= 2 else x_all[[0, 0]]).to(device))
    wrapped: nn.Module = GradSampleModule(model, batch_first=True, loss_reduction="mean") if engine == "opacus" \
        else model
    params = [p for p in model.parameters() if p.requires_grad]
    base = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    noise_gen = torch.Generator(device=device).manual_seed(stable_seed(dp.secret, "noise", seed) % (2 ** 63))
    sample_gen = torch.Generator().manual_seed(stable_seed(dp.secret, "sample", seed) % (2 ** 63))
    opt = DPOptimizer(base, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                      expected_batch_size=n * dp.sample_rate, loss_reduction="mean", generator=noise_gen,
                      secure_mode=True)
    opt.attach_step_hook(dp.accountant.get_optimizer_hook_fn(sample_rate=dp.sample_rate))
    loss_fn = nn.BCEWithLogitsLoss()
    anchors = None
    if proximal_mu > 0 and global_state is not None:
        anchors = {k: v.detach().to(device) for k, v in global_state.items()}
    aug_gen = torch.Generator().manual_seed(seed)
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=dp.sample_rate, generator=sample_gen,
                                            steps=epochs * dp.steps_per_epoch)
    losses: list[float] = []
    total, count, steps = 0.0, 0, 0
    try:
        for i, idx in enumerate(sampler):
            opt.zero_grad(set_to_none=True)
            if idx:
                idx_t = torch.as_tensor(idx, dtype=torch.long)
                xb = augment(x_all[idx_t], cfg, aug_gen).to(device)
                yb = y_all[idx_t].to(device)
                if engine == "opacus":
                    loss = loss_fn(wrapped(xb).reshape(-1), yb)
                    with warnings.catch_warnings():  # the first layer's input needs no gradient: expected
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        loss.backward()
                else:
                    _functorch_grad_samples(model, loss_fn, xb, yb)
                    with torch.no_grad():
                        loss = loss_fn(model(xb).reshape(-1), yb)
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            else:  # an empty Poisson batch: a step of noise only
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=device, dtype=p.dtype)
            if opt.pre_step():  # clip, sum, add noise, scale; steps the accountant
                if on_step is not None:
                    on_step(model)
                if anchors is not None:
                    with torch.no_grad():
                        for name, p in model.named_parameters():
                            if p.grad is not None and name in anchors:
                                p.grad.add_(p.detach() - anchors[name], alpha=proximal_mu)
                base.step()
            steps += 1
            if (i + 1) % dp.steps_per_epoch == 0:
                losses.append(total / count if count else float("nan"))
                total, count = 0.0, 0
    finally:
        opt.zero_grad(set_to_none=True)
        if isinstance(wrapped, GradSampleModule):
            wrapped.to_standard_module()
        for p in params:
            for attr in ("grad_sample", "summed_grad", "_processed"):
                if hasattr(p, attr):
                    delattr(p, attr)
    model.to("cpu")
    finite = [v for v in losses if np.isfinite(v)] or [float("nan")]
    return TrainStats(n, steps, finite[0], finite[-1], time.perf_counter() - t0, losses)


@torch.no_grad()
def predict(model: nn.Module, data: SliceSet, *, device: torch.device | None = None, batch_size: int = 64) -> np.ndarray:
    """Probabilities of a good response, shape ``(n,)``."""
    device = device or torch.device("cpu")
    if len(data) == 0:
        return np.zeros(0, np.float64)
    model.to(device).eval()
    out = []
    x = torch.from_numpy(data.x)
    for start in range(0, len(data), batch_size):
        out.append(torch.sigmoid(model(x[start: start + batch_size].to(device)).reshape(-1)).cpu())
    model.to("cpu")
    return torch.cat(out).double().numpy()


@torch.no_grad()
def mean_loss(model: nn.Module, data: SliceSet, device: torch.device | None = None) -> float:
    """Unweighted BCE of the model on ``data`` without augmentation (for monitoring)."""
    if len(data) == 0:
        return float("nan")
    p = np.clip(predict(model, data, device=device), 1e-7, 1 - 1e-7)
    y = data.y.astype(np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
