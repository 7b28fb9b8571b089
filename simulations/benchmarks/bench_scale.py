"""A simulated consortium of many small sites: seconds per round and peak memory as the sites grow.

Run from the repository root::

    python -m simulations.benchmarks.bench_scale                     # 20 and 50 sites
    python -m simulations.benchmarks.bench_scale --sites 10 20 --patients 12 --rounds 2

For each size it makes a synthetic cohort of ``--sites`` training sites plus one external site, each
with ``--patients`` patients on a ``--shape`` grid (small, so that preprocessing is not what is
measured), preprocesses it, and runs ``rectalfl simulate`` (discovery, training, signatures, their
securely aggregated AUCs, the report; the fusion analysis only with ``--with-analysis``) in a subprocess, while
sampling every 0.5 s the resident memory of that process and every process below it (Ray's raylet,
workers and the ClientApp actors). Printed per size: seconds per training round (mean over rounds,
from the run record), the whole run, and the peak of the summed RSS. Goal of the speed issue: 50
sites with RSS <= 8 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCANNERS = ["siemens_like", "ge_like", "philips_like"]


def tree_rss(pid: int) -> int:
    """Summed resident memory (bytes) of ``pid`` and every process below it, from /proc."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            p = int(stat.parent.name)
            parent[p] = int(fields[1])
            rss[p] = int(fields[21]) * page
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [pid]
    seen = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += rss.get(p, 0)
        todo += [c for c, pp in parent.items() if pp == p]
    return total


def config(work: Path, n_sites: int, patients: int, shape: list[int], rounds: int, analysis: bool) -> Path:
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    sites = [{"name": f"site_{i:02d}", "patients": patients, "prevalence": 0.4, "scanner": SCANNERS[i % 3]}
             for i in range(n_sites)]
    sites.append({"name": "external", "patients": patients, "prevalence": 0.35, "scanner": "legacy_1p5t",
                  "external": True})
    demo.update(name=f"scale-{n_sites}", data_root=str(work / "data"), cache_root=str(work / "cache"),
                runs_root=str(work / "runs"))
    demo["synth"].update(sites=sites, shape=shape, dicom_fraction=0.0)
    demo["preprocess"].update(slice_size=32)
    demo["federation"].update(rounds=rounds, min_sites=2)
    demo["privacy"] = {**demo.get("privacy", {}), "min_cell_count": 3}
    demo["policy"] = {**demo.get("policy", {}), "min_cell_count": 3}
    demo.setdefault("fusion", {}).update(variants=False, enabled=analysis)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(demo))
    return path


def run_size(n_sites: int, a: argparse.Namespace, work: Path) -> dict[str, float]:
    cfg = config(work, n_sites, a.patients, a.shape, a.rounds, a.with_analysis)
    exe = str(Path(sys.executable).parent / "rectalfl")
    env = {**os.environ, "COLUMNS": "200"}
    t0 = time.perf_counter()
    with open(work / "prepare.log", "wb") as fh:
        rc = subprocess.run([exe, "simulate", "--prepare-only", "--config", str(cfg)], stdout=fh,
                            stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        raise SystemExit(f"preparing {n_sites} sites failed; see {work / 'prepare.log'}")
    prep = time.perf_counter() - t0
    peak = [0]
    log = open(work / "simulate.log", "wb")  # noqa: SIM115 - closed below
    t0 = time.perf_counter()
    proc = subprocess.Popen([exe, "simulate", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env)

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    t.join()
    log.close()
    if rc:
        raise SystemExit(f"the {n_sites}-site simulation failed (exit {rc}); see {work / 'simulate.log'}")
    run_dir = max((p for p in (work / "runs").iterdir() if (p / "run.db").is_file()), key=lambda p: p.stat().st_mtime)
    con = sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True)
    secs = [r[0] for r in con.execute("SELECT seconds FROM rounds WHERE stage = 'train' AND status = 'completed'")]
    replied = [r[0] for r in con.execute("SELECT n_replied FROM rounds WHERE stage = 'train'")]
    con.close()
    return {"sites": n_sites, "prepare_s": prep, "round_s": sum(secs) / max(len(secs), 1),
            "replied": min(replied) if replied else 0, "run_s": wall, "peak_rss_gb": peak[0] / 2**30}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, nargs="+", default=[20, 50], help="training sites per consortium")
    p.add_argument("--patients", type=int, default=12, help="patients per site")
    p.add_argument("--shape", type=int, nargs=3, default=[48, 48, 8])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--with-analysis", action="store_true",
                   help="also run the fusion analysis (off by default: with 20 sites it makes hundreds of message "
                        "rounds, see the README)")
    p.add_argument("--workdir", type=Path, default=None, help="keep cohorts and runs here (default: temporary)")
    a = p.parse_args(argv)
    rows = []
    for n in a.sites:
        work = (a.workdir / f"sites_{n}") if a.workdir else Path(tempfile.mkdtemp(prefix=f"bench_scale_{n}_"))
        work.mkdir(parents=True, exist_ok=True)
        print(f"{n} training sites + 1 external, {a.patients} patients each: {work}", flush=True)
        r = run_size(n, a, work)
        rows.append(r)
        print(f"  prepared in {r['prepare_s']:.0f} s; run {r['run_s']:.0f} s, {r['round_s']:.1f} s per training "
              f"round ({r['replied']} sites replied), peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'sites':>6}{'s/training round':>18}{'whole run s':>13}{'peak RSS GB':>13}")
    for r in rows:
        print(f"{r['sites']:>6}{r['round_s']:>18.1f}{r['run_s']:>13.0f}{r['peak_rss_gb']:>13.2f}")


if __name__ == "__main__":
    main()
