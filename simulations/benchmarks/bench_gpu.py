"""The GPU path: training images/s of the paper backbone in fp32 vs mixed precision + channels-last.

Run from the repository root (on the GPU machine; on a CPU-only machine it measures fp32 only, since
every switch is off there)::

    python -m simulations.benchmarks.bench_gpu                          # densenet121, 256x256, batch 32
    python -m simulations.benchmarks.bench_gpu --model resnet18 --steps 20

Each mode runs the site's real training loop (:func:`client.train.train_backbone`: per-sample
random resized crop and flip, SGD with momentum, pinned host memory and asynchronous copies on
CUDA) over ``--batch * --steps`` random 1-channel slices after one warm-up batch, with
``train.precision`` / ``train.channels_last`` as listed. Printed: images/s, the speed-up over fp32,
and peak GPU memory.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from client.train import SliceSet, resolve_precision, train_backbone
from shared.config import TrainConfig
from shared.models import build_model

MODES = (("fp32", False), ("bf16", True), ("fp16", True))


def data(n: int, size: int, seed: int) -> SliceSet:
    rng = np.random.default_rng(seed)
    return SliceSet("pre_t2w", rng.random((n, 1, size, size), dtype=np.float32),
                    (rng.random(n) < 0.4).astype(np.float32), [f"p{i}" for i in range(n)],
                    np.array(["train"] * n, dtype=object))


def throughput(model_name: str, size: int, batch: int, steps: int, device: torch.device, precision: str,
               channels_last: bool) -> tuple[float, float]:
    cfg = TrainConfig(batch_size=batch, precision=precision, channels_last=channels_last)
    model = build_model(model_name, size, seed=0)
    train_backbone(model, data(batch, size, 0), cfg, epochs=1, seed=0, device=device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    stats = train_backbone(model, data(batch * steps, size, 1), cfg, epochs=1, seed=1, device=device)
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return stats.n_examples / seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="densenet121")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="timed batches (default 20 on CUDA, 2 on CPU)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    steps = args.steps or (20 if device.type == "cuda" else 2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} {args.size}x{args.size}, batch {args.batch}, {steps} steps on {name} "
          f"(torch {torch.__version__}, load {os.getloadavg()[0]:.1f})")
    base = None
    for precision, cl in MODES:
        eff = resolve_precision(precision, cl, device)
        if device.type != "cuda" and precision != "fp32":
            print(f"{precision:5s} channels_last={cl!s:5s}: off on CPU (the same fp32 loop)")
            continue
        ips, peak = throughput(args.model, args.size, args.batch, steps, device, precision, cl)
        base = base or ips
        print(f"{eff.name:5s} channels_last={eff.channels_last!s:5s}: {ips:8.1f} img/s  x{ips / base:.2f}"
              + (f"  peak {peak:.1f} GiB" if peak == peak else ""))


if __name__ == "__main__":
    main()
