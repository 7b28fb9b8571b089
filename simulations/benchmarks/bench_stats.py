"""Benchmark of the site-computed statistics, with and without secure aggregation.

Run from the repository root::

    python -m simulations.benchmarks.bench_stats --sites 20 --patients 10000

``--patients`` is per site. For each quantity two runs over the same data:

* **math**: the protocol's mathematics with contributions summed in the clear in one process
  (:func:`shared.stats.sitecomputed.run_plain`): the floor of what any implementation costs;
* **plain**: the real site path (every site's :class:`client.stats_service.StatsService`: policy
  checks, fixed patient sets, state persisted between messages, the pipelined driver
  :func:`shared.stats_driver.run_site_queries`, every request and reply through the wire encoding),
  but contributions sent *unmasked* (fixed-point encoded, summed by the server): the same system
  without secure aggregation. Benchmark-only; no policy can select it;
* **secure**: the same with secure aggregation (real keys: signed adverts, sealed seeds, masked
  vectors, integrity tags).

Printed per quantity: rounds, wall seconds of all sites together (one process runs them one after
another), seconds per site, bytes each site sends (math: its float64 contributions; plain/secure:
its encoded replies), and the ratios secure / plain. Last line: the ratios for the three headline
quantities (AUC + DeLong, logistic regression, fusion fit).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shared.stats.sitecomputed import CohortData, protocol_class, run_plain
from shared.stats_driver import SiteQuery, run_site_queries
from shared.wire import nbytes, pack

logger = logging.getLogger(__name__)
RUN = "bench-stats"


def make_tables(n_sites: int, n_patients: int, seed: int) -> dict[str, pd.DataFrame]:
    """Synthetic site tables: outcome, two probability scores (4 decimals) and 3 clinical predictors."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_sites):
        n = n_patients
        age, cea, t = rng.normal(62, 11, n), rng.lognormal(1.2, 0.8, n), rng.integers(2, 5, n).astype(float)
        eta = -3 + 0.03 * age + 0.2 * np.log(cea) + 0.4 * t
        y = (rng.uniform(size=n) < 1 / (1 + np.exp(-eta))).astype(np.int64)
        a = np.round(1 / (1 + np.exp(-(eta + rng.normal(0, 0.8, n)))), 4)
        b = np.round(1 / (1 + np.exp(-(0.5 * eta + rng.normal(0, 1.0, n)))), 4)
        out[f"site{i:02d}"] = pd.DataFrame({"patient_id": [f"s{i}-{j}" for j in range(n)], "split": "train",
                                            "label": y, "pre_a": a, "post_b": b, "age": age.round(),
                                            "cea": cea.round(2), "t_stage": t})
    return out


def cases(extra_fusion: bool) -> list[tuple[str, str, dict[str, Any], list[str]]]:
    out = [
        ("AUC + DeLong CI, 2 scores + covariance", "roc", {"columns": ["pre_a", "post_b"]}, ["pre_a", "post_b"]),
        ("logistic regression (3 predictors)", "logistic", {"columns": ["age", "cea", "t_stage"]},
         ["age", "cea", "t_stage"]),
        ("calibration (10 bins, slope, intercepts)", "calibration", {"column": "pre_a"}, ["pre_a"]),
    ]
    if extra_fusion:
        out.append(("fusion SVM fit (2 signatures, CV 3x3 grid)", "fusion_svm_fit",
                    {"columns": ["pre_a", "post_b"], "C_grid": [0.1, 1.0, 10.0], "gamma_factors": [0.25, 1.0, 4.0],
                     "cv_folds": 5, "seed": 1}, ["pre_a", "post_b"]))
    return out


class ClearAgg:
    """The secure-aggregation interface without the protection (benchmark baseline only).

    ``mask`` returns the fixed-point encoded contribution unmasked, so the server's sum *is* the
    total; ``unmask`` decodes it. Same message shapes minus adverts, seeds and tags.
    """

    def __init__(self, site: str, roster: dict[str, Any]) -> None:
        self.site, self.roster = site, roster
        self._layout: dict[str, tuple] = {}

    def advertise(self, session_id: str, participants: list[str], *, query_id: str | None = None) -> dict:
        self._layout[session_id] = (len(participants), {})
        return {}

    def share(self, session_id: str, adverts: dict) -> dict:
        return {}

    def mask(self, session_id: str, envelopes: dict, contribution: dict, spec: dict, **_: Any) -> dict:
        from shared.secagg import as_specs, encode

        n, _ = self._layout[session_id]
        specs = as_specs(spec)
        shapes = {k: np.asarray(v).shape for k, v in contribution.items()}
        self._layout[session_id] = (n, (specs, shapes))
        return {k: encode(k, np.asarray(v), specs[k], n) for k, v in contribution.items()}

    def mask_next(self, session_id: str, contribution: dict, spec: dict, **kw: Any) -> dict:
        return self.mask(session_id, {}, contribution, spec, **kw)

    def unmask(self, session_id: str, total: dict) -> dict:
        from shared.secagg import decode

        _, (specs, shapes) = self._layout[session_id]
        return {k: decode(k, np.asarray(total[k]), specs[k], shapes[k]) for k in specs}

    def close(self, session_id: str) -> None:
        self._layout.pop(session_id, None)


def plain(name: str, params: dict[str, Any], cols: list[str], tables: dict[str, pd.DataFrame], k: int
          ) -> tuple[float, float, int]:
    proto = protocol_class(name).from_params(params)
    data = {s: CohortData(t["label"].to_numpy(), t[cols].to_numpy(float), tuple(cols),
                          extra={"patient_id": t["patient_id"].to_numpy()}) for s, t in tables.items()}
    sent = {s: 0 for s in data}
    t0 = time.perf_counter()
    res = run_plain(proto, data, k)
    seconds = time.perf_counter() - t0
    # replay the rounds to count the float64 bytes of every contribution (not timed)
    state = proto.init_state()
    for _ in range(res.rounds):
        parts = {s: proto.local(d, state) for s, d in data.items()}
        for s, c in parts.items():
            sent[s] += sum(np.asarray(v, dtype=np.float64).nbytes for v in c.values())
        tot = {kk: sum(np.asarray(p[kk], dtype=np.float64) for p in parts.values()) for kk in parts[next(iter(parts))]}
        state, _ = proto.advance(state, tot)
    return seconds, float(np.mean(list(sent.values()))), res.rounds


def through_sites(name: str, params: dict[str, Any], cols: list[str], tables: dict[str, pd.DataFrame], k: int,
                  root: Path, tag: str, *, secure: bool = True) -> tuple[float, float, int]:
    from client.site_policy import SIGNATURES_STAMP, read_stamps, roster_from, write_stamp
    from client.stats_service import SiteContext, StatsService
    from shared.config import PolicyConfig
    from simulations.sites import inprocess_transport, make_consortium_keys, site_service

    keys = make_consortium_keys(root / "roster", list(tables))
    roster = roster_from(root / "roster")
    services = {}
    for s, t in tables.items():
        cache = root / tag / s
        cache.mkdir(parents=True, exist_ok=True)
        write_stamp(cache / SIGNATURES_STAMP, run=RUN, weights="0" * 64)
        pol = PolicyConfig(min_cell_count=k, roster=root / "roster", identity_key=keys[s], role="train",
                           query_budget=10**6)
        if secure:
            services[s] = site_service(s, cache, pol, ("age", "cea", "t_stage"), (lambda t=t: t), keys[s])
        else:
            services[s] = StatsService(SiteContext(
                site=s, cache_dir=cache, policy=pol, clinical_columns=("age", "cea", "t_stage"), table=lambda t=t: t,
                stamps=lambda c=cache: read_stamps(c), secagg=lambda s=s, r=roster: ClearAgg(s, r)))
    inner = inprocess_transport(services, RUN)
    sent = {s: 0 for s in tables}

    def counting(requests: dict[str, dict]) -> dict[str, dict]:
        replies = inner(requests)
        for s, rep in replies.items():
            sent[s] += nbytes(*pack(rep))
        return replies

    q = SiteQuery(f"q-{tag}", protocol_class(name).from_params(params), "training", cols, sorted(tables))
    t0 = time.perf_counter()
    run_site_queries([q], counting, run=RUN, k=k)
    seconds = time.perf_counter() - t0
    if not q.ok:
        raise RuntimeError(f"{name}: {q.error}")
    return seconds, float(np.mean(list(sent.values()))), q.rounds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=20)
    ap.add_argument("--patients", type=int, default=10000, help="patients per site")
    ap.add_argument("--min-count", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fusion", action="store_true", help="skip the fusion SVM fit (the slowest row)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tables = make_tables(args.sites, args.patients, args.seed)
    n = args.sites
    try:
        protocol_class("fusion_svm_fit")
        fusion = not args.no_fusion
    except KeyError:
        fusion = False
    print(f"{n} sites x {args.patients} patients, k={args.min_count}; one process runs every site in turn")
    print(f"{'quantity':44s} {'mode':7s} {'rounds':>6s} {'wall [s]':>9s} {'s/site':>8s} {'bytes/site':>11s}")
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, name, params, cols) in enumerate(cases(fusion)):
            tm, bm, rm = plain(name, params, cols, tables, args.min_count)
            tp, bp, rp = through_sites(name, params, cols, tables, args.min_count, Path(tmp), f"p{i}", secure=False)
            ts, bs, rs = through_sites(name, params, cols, tables, args.min_count, Path(tmp), f"s{i}")
            print(f"{label:44s} {'math':7s} {rm:6d} {tm:9.2f} {tm / n:8.3f} {bm:11.0f}")
            print(f"{'':44s} {'plain':7s} {rp:6d} {tp:9.2f} {tp / n:8.3f} {bp:11.0f}")
            print(f"{'':44s} {'secure':7s} {rs:6d} {ts:9.2f} {ts / n:8.3f} {bs:11.0f}   "
                  f"x{ts / tp:.2f} time, x{bs / bp:.2f} bytes (vs plain)")
            ratios[name] = (ts / tp, bs / bp)
    head = {k: v for k, v in ratios.items() if k in ("roc", "logistic", "fusion_svm_fit")}
    print("secure/plain: " + ", ".join(f"{k} time x{t:.2f} bytes x{b:.2f}" for k, (t, b) in head.items()))


if __name__ == "__main__":
    main()
