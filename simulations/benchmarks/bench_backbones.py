"""Benchmark of the backbone zoo: training throughput of each architecture at the paper's settings.

Run from the repository root::

    python -m simulations.benchmarks.bench_backbones                     # every full-size network, CPU (+ CUDA)
    python -m simulations.benchmarks.bench_backbones --models resnet18,swin_t --devices cuda --steps 10

For each network and device, on random 1-channel ``size x size`` slices:

* ``step img/s``: one SGD step (forward, backward, update; lr 0.01, momentum 0.9) on a batch of
  ``--batch`` slices, no augmentation: the network's own cost;
* ``loop img/s``: the site's real training loop (:func:`client.train.train_backbone`, with its
  per-sample random resized crop and flip) over ``--batch * --steps`` slices;
* ``s/round/site``: what one federated round costs one hospital with ``--patients`` training
  patients and ``--backbones`` backbones (6 = 3 sequences x pre/post) at one local epoch, from the
  loop throughput: ``backbones * patients / loop img/s``;
* ``MB/round/site``: the weights a site receives and sends back each round (float32, both ways, all
  backbones; BatchNorm counters stay local).

One warm-up step precedes the timed ones. Numbers depend on the machine and its load: report them
with the CPU model, the thread count and the load average printed in the header.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_throughput(name: str, size: int, batch: int, steps: int, device: torch.device) -> float:
    """Images per second of plain SGD steps (forward + backward + update) at batch ``batch``."""
    from shared.models import build_model

    model = build_model(name, size, seed=0).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, generator=gen).to(device)
    y = (torch.rand(batch, generator=gen) < 0.4).float().to(device)

    def one() -> None:
        loss = loss_fn(model(x).reshape(-1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    one()  # warm-up (allocations, kernel selection)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def loop_throughput(name: str, size: int, batch: int, steps: int, device: torch.device) -> float:
    """Images per second of :func:`client.train.train_backbone` (augmentation included), one epoch."""
    from client.train import SliceSet, train_backbone
    from shared.config import TrainConfig
    from shared.models import build_model

    cfg = TrainConfig(batch_size=batch)
    rng = np.random.default_rng(0)

    def data(n: int) -> SliceSet:
        return SliceSet("pre_t2w", rng.random((n, 1, size, size), dtype=np.float32),
                        (rng.random(n) < 0.4).astype(np.float32), [f"p{i}" for i in range(n)],
                        np.array(["train"] * n, dtype=object))

    model = build_model(name, size, seed=0)
    train_backbone(model, data(batch), cfg, epochs=1, seed=0, device=device)  # warm-up
    stats = train_backbone(model, data(batch * steps), cfg, epochs=1, seed=1, device=device)
    return stats.n_examples / stats.seconds


def round_megabytes(name: str, size: int, backbones: int) -> float:
    from shared.models import build_model
    from shared.records import is_local_only

    sd = build_model(name, size).state_dict()
    per_net = sum(t.numel() * 4 for k, t in sd.items() if not is_local_only(k))
    return 2 * backbones * per_net / 1e6


def main(argv: list[str] | None = None) -> None:
    from shared.models import build_model, count_parameters, full_size_models, model_spec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="full", help="comma-separated registry names, or 'full' / 'cpu'")
    ap.add_argument("--size", type=int, default=256, help="slice side (the paper: 256)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (the paper: 32)")
    ap.add_argument("--steps", type=int, default=2, help="timed batches per measurement")
    ap.add_argument("--devices", default="cpu,cuda", help="cpu and/or cuda (cuda is skipped when absent)")
    ap.add_argument("--patients", type=int, default=100, help="training patients of one site (for s/round)")
    ap.add_argument("--backbones", type=int, default=6, help="backbones per run (sequences x timepoints)")
    ap.add_argument("--no-loop", action="store_true", help="skip the training-loop measurement")
    args = ap.parse_args(argv)

    from simulations.compare import parse_backbones

    names = full_size_models() if args.models == "full" else parse_backbones(args.models)
    devices = [torch.device(d) for d in args.devices.split(",")
               if d != "cuda" or torch.cuda.is_available()]
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads ({os.cpu_count()} cores, {cpu}), "
          f"load average {os.getloadavg()[0]:.1f}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"))
    print(f"slices {args.size}x{args.size}, batch {args.batch}, {args.steps} timed batch(es) after 1 warm-up; "
          f"round = {args.backbones} backbones x {args.patients} patients x 1 local epoch")
    print(f"{'network':16s} {'family':15s} {'params':>11s} {'device':>6s} {'step img/s':>11s} {'loop img/s':>11s} "
          f"{'s/round/site':>13s} {'MB/round/site':>14s}")
    for name in names:
        params = count_parameters(build_model(name, args.size))
        mb = round_megabytes(name, args.size, args.backbones)
        for dev in devices:
            try:
                step = step_throughput(name, args.size, args.batch, args.steps, dev)
                loop = float("nan") if args.no_loop else loop_throughput(name, args.size, args.batch, args.steps, dev)
            except torch.OutOfMemoryError:
                print(f"{name:16s} out of memory on {dev}")
                continue
            per_round = args.backbones * args.patients / (loop if np.isfinite(loop) else step)
            print(f"{name:16s} {model_spec(name).family:15s} {params:11,d} {dev.type:>6s} {step:11.1f} {loop:11.1f} "
                  f"{per_round:13.1f} {mb:14.1f}", flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
