"""The GPU path: training images/s of the paper backbone, fp32 eager vs mixed precision + channels-last
(+ cuDNN autotuning, + torch.compile), and one local training round of the paper configuration.

Run from the repository root (on the GPU machine; on a CPU-only machine it measures fp32 only, since
every switch is off there)::

    python -m simulations.benchmarks.bench_gpu                          # densenet121, 256x256, batch 32
    python -m simulations.benchmarks.bench_gpu --model resnet18 --steps 20 --no-round

Each mode runs the site's real training loop (:func:`client.train.train_backbone`: per-sample
random resized crop and flip, SGD with momentum, pinned host memory and asynchronous copies on
CUDA) over ``--batch * --steps`` random 1-channel slices after one warm-up batch (for ``compile``
the warm-up pays the compilation, timed and printed apart), with ``train.precision`` /
``channels_last`` / ``deterministic`` / ``compile`` as listed. Printed: images/s, the speed-up over
fp32, and peak GPU memory. Then (``--round``, default on) one local training round of
``configs/paper.yaml`` on this device: every backbone of its sequences x timepoints for
``local_epochs`` over ``--round-slices`` slices (default 135: the training split of a 169-patient
site), with the config's training settings and the fastest mode found above.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from client.train import SliceSet, resolve_precision, train_backbone
from shared.config import TrainConfig
from shared.models import build_model

MODES = (  # name, precision, channels_last, deterministic, compile
    ("fp32 eager", "fp32", False, True, False),
    ("bf16 + channels-last", "bf16", True, True, False),
    ("fp16 + channels-last", "fp16", True, True, False),
    ("bf16 + channels-last, fast mode", "bf16", True, False, False),
    ("bf16 + channels-last, fast, compile", "bf16", True, False, True),
)


def data(n: int, size: int, seed: int) -> SliceSet:
    rng = np.random.default_rng(seed)
    return SliceSet("pre_t2w", rng.random((n, 1, size, size), dtype=np.float32),
                    (rng.random(n) < 0.4).astype(np.float32), [f"p{i}" for i in range(n)],
                    np.array(["train"] * n, dtype=object))


def throughput(model_name: str, size: int, batch: int, steps: int, device: torch.device,
               cfg: TrainConfig) -> tuple[float, float, float]:
    """(images/s, peak GiB, warm-up seconds) of ``train_backbone`` with ``cfg``'s switches."""
    model = build_model(model_name, size, seed=0)
    t = time.perf_counter()
    train_backbone(model, data(batch, size, 0), cfg, epochs=1, seed=0, device=device)  # warm-up (+ compile)
    warm = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    stats = train_backbone(model, data(batch * steps, size, 1), cfg, epochs=1, seed=1, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return stats.n_examples / seconds, peak, warm


def paper_round(device: torch.device, n_slices: int, best: dict) -> None:
    """One local round of configs/paper.yaml: each backbone (sequence x timepoint) on ``n_slices`` slices."""
    from shared.config import load_config
    from shared.models import signature_keys

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "paper.yaml")
    keys = signature_keys(cfg)
    train = cfg.train.model_copy(update=best)
    size = cfg.preprocess.slice_size
    total = 0.0
    for i, key in enumerate(keys):
        model = build_model(train.backbone, size, seed=i)
        t = time.perf_counter()
        train_backbone(model, data(n_slices, size, 10 + i), train, epochs=train.local_epochs, seed=i, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        total += dt
        print(f"  {key}: {dt:.1f} s", flush=True)
    print(f"paper round ({len(keys)} backbones x {train.local_epochs} epoch(s) x {n_slices} slices, "
          f"{train.backbone} {size}x{size}, batch {train.batch_size}, {best or 'fp32 eager'}): {total:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="densenet121")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="timed batches (default 20 on CUDA, 2 on CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile mode")
    ap.add_argument("--round", action=argparse.BooleanOptionalAction, default=True,
                    help="also time one local training round of configs/paper.yaml")
    ap.add_argument("--round-slices", type=int, default=135)
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    steps = args.steps or (20 if device.type == "cuda" else 2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} {args.size}x{args.size}, batch {args.batch}, {steps} steps on {name} "
          f"(torch {torch.__version__}, load {os.getloadavg()[0]:.1f})")
    base = None
    best: tuple[float, dict] = (0.0, {})
    for label, precision, cl, det, comp in MODES:
        if comp and args.no_compile:
            continue
        if device.type != "cuda" and (precision != "fp32" or cl or comp or not det):
            print(f"{label:36s}: off on CPU (the same fp32 eager loop)")
            continue
        cfg = TrainConfig(batch_size=args.batch, precision=precision, channels_last=cl, deterministic=det,
                          compile=comp)
        eff = resolve_precision(precision, cl, device, compile=comp, deterministic=det)
        try:
            ips, peak, warm = throughput(args.model, args.size, args.batch, steps, device, cfg)
        except Exception as exc:  # e.g. no C compiler for TorchInductor: say so and go on
            print(f"{label:36s}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        base = base or ips
        if ips > best[0]:
            best = (ips, {"precision": precision, "channels_last": cl, "deterministic": det, "compile": comp}
                    if device.type == "cuda" else {})
        print(f"{label:36s}: {ips:8.1f} img/s  x{ips / base:.2f}  ({eff.name}, warm-up {warm:.1f} s)"
              + (f"  peak {peak:.1f} GiB" if peak == peak else ""), flush=True)
    if args.round:
        paper_round(device, args.round_slices, best[1])


if __name__ == "__main__":
    main()
