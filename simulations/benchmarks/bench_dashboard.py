"""Benchmark of the operator dashboard: page-load times on a large synthetic run record.

Run from the repository root::

    python -m simulations.benchmarks.bench_dashboard --rounds 100 --sites 20 --repeats 20

It writes a run record through the real RunStore API (``server.dashboard.synthetic``: per round
and site the ClientApp's metric keys for 6 backbones, liveness every round, a checkpoint artefact
per round, join/drop/reject events, tables and a report) plus a few smaller runs for the runs list,
serves the dashboard with uvicorn on 127.0.0.1 and times full HTTP requests (server time plus
transfer over loopback, as a browser on the same machine would wait). Target: the run page under
300 ms.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from server.dashboard import create_app
from server.dashboard.serve import running
from server.dashboard.synthetic import write_synthetic_run
from server.store import RunStore

logger = logging.getLogger(__name__)

BACKBONES = ("pre_t2w", "post_t2w", "pre_dwi", "post_dwi", "pre_ce_t1w", "post_ce_t1w")
TOKEN = "benchmark-token-0123456789abcdef"


def build(root: Path, rounds: int, sites: int, others: int) -> tuple[str, dict[str, int]]:
    """The large run (``big``) and ``others`` small ones; returns the big run's id and its row counts."""
    t0 = time.perf_counter()
    write_synthetic_run(root, "big", name="bench-big", n_rounds=rounds, n_sites=sites, n_external=2,
                        backbones=BACKBONES, dp=True, checkpoints=True, drop_site_in_round=2)
    with RunStore.open_run_dir(root / "big") as store:  # more events, as a long deployment run collects
        for rnd in range(1, rounds + 1):
            store.event("big", "checkpoint", f"checkpoint after round {rnd}", round=rnd)
            if rnd % 10 == 0:
                store.event("big", "site_failed", f"site_{rnd % sites + 1:02d} failed: TimeoutError", level="error",
                            site=f"site_{rnd % sites + 1:02d}", round=rnd, detail={"stage": "train"})
    for i in range(others):
        write_synthetic_run(root, f"small-{i:02d}", name=f"bench-small-{i}", n_rounds=5, n_sites=3, seed=i)
    with RunStore.open_run_dir(root / "big", readonly=True) as store:
        counts = {"rounds": len(store.rounds("big")), "site_metrics": len(store.metrics("big")),
                  "events": len(store.events("big")), "artefacts": len(store.artefacts("big"))}
    logger.info("wrote the records in %.1f s", time.perf_counter() - t0)
    return "big", counts


def measure(url: str, path: str, repeats: int) -> tuple[float, list[float], int]:
    """Wall time (ms) of the first GET of ``path``, of ``repeats`` more, and the response size."""
    with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}", "Accept": "text/html"}, timeout=60) as c:
        t0 = time.perf_counter()
        r = c.get(url + path)
        r.raise_for_status()
        first = (time.perf_counter() - t0) * 1000
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = c.get(url + path)
            r.raise_for_status()
            times.append((time.perf_counter() - t0) * 1000)
    return first, times, len(r.content)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--sites", type=int, default=20, help="training sites (2 external sites are added)")
    ap.add_argument("--others", type=int, default=10, help="small runs next to it (for the runs list)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("server").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="rectalfl-bench-dashboard-") as tmp:
        root = Path(tmp)
        run_id, counts = build(root, args.rounds, args.sites, args.others)
        print(f"run record: {args.rounds} rounds x {args.sites} training sites (+2 external), "
              f"{len(BACKBONES)} backbones; rows: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        print(f"{'request':<44} {'first ms':>9} {'median ms':>10} {'p95 ms':>8} {'max ms':>8} {'size':>12}")
        pages = [("runs list  /", "/"), ("run page   /runs/big", f"/runs/{run_id}"),
                 ("run JSON   /api/runs/big", f"/api/runs/{run_id}"),
                 ("run JSON   /api/runs/big?series=0", f"/api/runs/{run_id}?series=0"),
                 ("runs JSON  /api/runs", "/api/runs"),
                 ("compare    /compare?run=big&run=small-00", f"/compare?run={run_id}&run=small-00")]
        results = {}
        with running(create_app(root, TOKEN)) as url:
            for label, path in pages:
                first, times, size = measure(url, path, args.repeats)
                times.sort()
                p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
                results[label] = statistics.median(times)
                print(f"{label:<44} {first:>9.1f} {statistics.median(times):>10.1f} {p95:>8.1f} {times[-1]:>8.1f} "
                      f"{size / 1024:>8.1f} KiB")
        page = results["run page   /runs/big"]
        print(f"run page median {page:.1f} ms: {'within' if page < 300 else 'OVER'} the 300 ms target")


if __name__ == "__main__":
    main()
