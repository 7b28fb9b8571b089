"""Benchmark of the federated statistics: server combine time and bytes per site.

Run from the repository root::

    python -m simulations.benchmarks.bench_stats --sites 20 --patients 10000

``--patients`` is per site. Site steps run first (their time is reported separately); the timed
"combine" is everything the server does with the sites' summaries over all rounds
(``server_step`` calls), which is what must stay well under a second.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from shared.stats import CalibrationProtocol, LogisticProtocol, ROCProtocol
from shared.stats.protocol import FederatedProtocol, Final, payload_bytes

logger = logging.getLogger(__name__)


def make_sites(n_sites: int, n_patients: int, seed: int) -> list[dict[str, Any]]:
    """Synthetic sites: outcome, two probability scores (4 decimals) and 4 clinical predictors."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_sites):
        n = n_patients
        X = pd.DataFrame({"age": rng.normal(62, 11, n), "cea": rng.lognormal(1.2, 0.8, n),
                          "t_stage": rng.integers(2, 5, n).astype(float), "male": rng.integers(0, 2, n)})
        eta = -3 + 0.03 * X["age"] + 0.2 * np.log(X["cea"]) + 0.4 * X["t_stage"] - 0.2 * X["male"]
        y = (rng.uniform(size=n) < 1 / (1 + np.exp(-eta))).to_numpy().astype(np.int64)
        a = np.round(1 / (1 + np.exp(-(eta + rng.normal(0, 0.8, n)))), 4).to_numpy()
        b = np.round(1 / (1 + np.exp(-(0.5 * eta + rng.normal(0, 1.0, n)))), 4).to_numpy()
        out.append({"y": y, "a": a, "b": b, "X": X})
    return out


def run(protocol: FederatedProtocol, data: dict[str, Any]) -> tuple[Any, float, float, dict[str, int], int]:
    """Run a protocol; returns (result, combine seconds, site seconds, bytes per site, rounds)."""
    step = type(protocol).site_step
    params = protocol.start()
    t_server = t_site = 0.0
    sent = dict.fromkeys(data, 0)
    rounds = 0
    while True:
        rounds += 1
        t0 = time.perf_counter()
        summaries = {s: step(d, params, site=s, min_count=protocol.min_count) for s, d in data.items()}
        t_site += time.perf_counter() - t0
        for s, v in summaries.items():
            sent[s] += payload_bytes(v)
        t0 = time.perf_counter()
        out = protocol.server_step(summaries)
        t_server += time.perf_counter() - t0
        if isinstance(out, Final):
            return out.result, t_server, t_site, sent, rounds
        params = out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=20)
    ap.add_argument("--patients", type=int, default=10000, help="patients per site")
    ap.add_argument("--min-count", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sites = make_sites(args.sites, args.patients, args.seed)
    names = [f"site{i}" for i in range(args.sites)]
    k = args.min_count
    cases: list[tuple[str, Callable[[], FederatedProtocol], Callable[[dict], Any]]] = [
        ("AUC + DeLong CI (1 score)", lambda: ROCProtocol(1, min_count=k), lambda d: (d["y"], d["a"])),
        ("paired DeLong test (2 scores)", lambda: ROCProtocol(2, output="delong", min_count=k),
         lambda d: (d["y"], d["a"], d["b"])),
        ("logistic regression (4 predictors)", lambda: LogisticProtocol(list(sites[0]["X"].columns), min_count=k),
         lambda d: (d["X"], d["y"])),
        ("calibration (10 bins, slope, intercepts)", lambda: CalibrationProtocol(10, min_count=k),
         lambda d: (d["y"], d["a"])),
    ]
    print(f"{args.sites} sites x {args.patients} patients, min_count={k}")
    print(f"{'quantity':44s} {'rounds':>6s} {'combine [s]':>12s} {'site steps [s]':>15s} {'bytes/site (mean, max)':>24s}")
    for label, make, pick in cases:
        data = {n: pick(d) for n, d in zip(names, sites, strict=True)}
        _, t_server, t_site, sent, rounds = run(make(), data)
        b = np.array(list(sent.values()))
        print(f"{label:44s} {rounds:6d} {t_server:12.4f} {t_site:15.3f} {b.mean():12.0f} {b.max():11d}")


if __name__ == "__main__":
    main()
