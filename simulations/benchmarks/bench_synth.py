"""Benchmark: time to generate the synthetic cohort at the demo size, with 1 and N workers.

Run as::

    python -m simulations.benchmarks.bench_synth --patients 200 --workers 2

The sites, shape (96 x 96 x 12), sequences (t2w, dwi, ce_t1w x pre, post) and fractions come from
the ``synth`` section of ``configs/demo.yaml``; the patients are spread over its sites in
proportion to their sizes. Each run writes into a fresh temporary folder (removed afterwards
unless ``--keep``). Prints one line per worker count: wall seconds, patients/s, CPU seconds (this
process and its worker pool: comparable on a busy machine), MB and files written.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from shared.config import SynthConfig, load_config
from simulations.synth import generate_cohort

logger = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def demo_synth_config(patients: int, config: Path = DEMO_CONFIG) -> SynthConfig:
    """The demo's synth section with ``patients`` spread over its sites (at least 4 per site)."""
    synth = load_config(config).synth
    total = sum(s.patients for s in synth.sites)
    counts = [max(4, round(patients * s.patients / total)) for s in synth.sites]
    counts[0] += patients - sum(counts)
    if counts[0] < 4:
        raise ValueError(f"--patients {patients} is too small for {len(counts)} sites of at least 4 patients")
    sites = [s.model_copy(update={"patients": n}) for s, n in zip(synth.sites, counts, strict=True)]
    return synth.model_copy(update={"sites": sites})


def _folder_size(root: Path) -> tuple[int, int]:
    files = nbytes = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            files += 1
            nbytes += os.path.getsize(os.path.join(dirpath, name))
    return files, nbytes


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the worker pool)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(patients: int, workers: list[int], seed: int = 42, keep: bool = False,
        config: Path = DEMO_CONFIG) -> list[dict[str, float]]:
    """Generate the cohort once per worker count; returns one result dict per run."""
    cfg = demo_synth_config(patients, config)
    results = []
    for w in workers:
        out = Path(tempfile.mkdtemp(prefix=f"bench_synth_w{w}_"))
        try:
            cpu0 = _cpu_seconds()
            t0 = time.perf_counter()
            summary = generate_cohort(cfg, out, seed=seed, workers=w)
            seconds = time.perf_counter() - t0
            cpu = _cpu_seconds() - cpu0
            files, nbytes = _folder_size(out)
            results.append({"workers": w, "patients": patients, "seconds": seconds,
                            "patients_per_s": patients / seconds, "cpu_seconds": cpu,
                            "cpu_ms_per_patient": 1000 * cpu / patients, "mb": nbytes / 1e6, "files": files,
                            "summary_bytes": summary.bytes})
        finally:
            if keep:
                logger.warning("kept %s", out)
            else:
                shutil.rmtree(out, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2, help="the largest worker count (1 is always run)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--config", type=Path, default=DEMO_CONFIG)
    ap.add_argument("--keep", action="store_true", help="keep the generated folders")
    args = ap.parse_args(argv)
    counts = sorted({1, max(1, args.workers)})
    cfg = demo_synth_config(args.patients, args.config)
    sys.stdout.write(
        f"synthetic cohort benchmark: {args.patients} patients over {len(cfg.sites)} sites "
        f"({', '.join(f'{s.name}={s.patients}' for s in cfg.sites)}), shape {tuple(cfg.shape)}, "
        f"sequences t2w/dwi/ce_t1w{'/adc' if cfg.include_adc else ''} x pre/post, "
        f"dicom_fraction {cfg.dicom_fraction}, cpu count {os.cpu_count()}\n")
    for r in run(args.patients, counts, args.seed, args.keep, args.config):
        sys.stdout.write(
            f"workers={r['workers']}: {r['seconds']:.1f} s wall ({r['patients_per_s']:.1f} patients/s), "
            f"{r['cpu_seconds']:.1f} CPU-s ({r['cpu_ms_per_patient']:.0f} CPU-ms/patient, incl. worker start-up), "
            f"{r['mb']:.1f} MB in {r['files']} files\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
