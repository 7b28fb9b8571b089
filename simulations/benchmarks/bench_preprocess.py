"""Benchmark: preprocessing throughput with the configured N4 fit vs a naive full-resolution N4, and the quality cost.

Run::

    python -m simulations.benchmarks.bench_preprocess --patients 20 --workers 2          # demo size
    python -m simulations.benchmarks.bench_preprocess --shape 512 512 30 --fov-mm 220 220 120 \
        --n4-fit-spacing 7 --patients 4 --workers 1 --reference-volumes 2                  # clinical size

What it does
------------
1. **Cases.** ``--site-dir`` takes an existing site folder. Otherwise ``--generator auto`` (default)
   uses :func:`simulations.synth.generate_cohort` when that module exists, with the ``synth``
   section of ``--config`` (default ``configs/demo.yaml``) restricted to one site (``--site``,
   default the first) with ``--patients`` patients, ``--shape`` voxels over ``--fov-mm`` (a clinical
   rectal T2W: 512 x 512 x 30 over 220 x 220 x 120 mm, 0.43 mm in plane); ``--generator phantom`` (or
   ``auto`` without ``simulations.synth``) writes a self-contained piecewise-homogeneous phantom site
   with a known smooth bias field per volume (:func:`make_phantom_site`).
2. **Throughput.** :func:`client.preprocess.preprocess_site` runs the configured pipeline (with the
   ``--n4-*`` overrides) on every case into a fresh cache with ``--workers`` processes (each with
   ``cores // workers`` ITK threads; ``--workers 1 --threads 1`` is "one core"). Wall time includes
   process start-up, I/O and the cache writes; patients/s, volumes/s and the mean compute seconds per
   volume (the manifest's ``seconds``) come from it. The naive baseline (the same pipeline with the
   N4 fit at full resolution) runs on every case too when ``--naive-pipeline on`` (default ``auto``:
   only when a volume has at most 1 M voxels; at 512 x 512 x 30 a full-resolution fit takes minutes).
3. **Quality** against the full-resolution fit (per volume, ``--reference-volumes`` of them spread
   over the sequences, in ``--workers`` processes): the configured fit
   (:func:`client.preprocess.n4_correct`) vs :func:`client.preprocess.n4_correct_full_resolution`
   on the raw image: Pearson r between the two corrected volumes over the Otsu foreground; the
   residual bias CoV ``std/mean(B_est / B_true)`` over the foreground when the true field is known
   (synthetic and phantom cases; 0 = perfect up to scale); for the phantom, the CoV inside a
   homogeneous tissue region before and after each correction; and the rest of the pipeline
   (normalise, largest-tumour slice, crop, discretise) run on both corrected volumes with the
   volume's tumour mask: same slice index, and the mean absolute grey-level difference of the two
   cached slices.

``--json PATH`` also writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from client.preprocess import (
    denoise,
    extract_slice,
    foreground_mask,
    load_slice,
    n4_correct,
    n4_correct_full_resolution,
    n4_shrink_factors,
    normalise,
    preprocess_site,
    resample_mask,
    resample_to_spacing,
)
from shared.config import RectalFLConfig, load_config

logger = logging.getLogger("bench_preprocess")

TruthFn = Callable[[str, str, str], dict[str, sitk.Image]]


# --------------------------------------------------------------------------- the phantom generator


def _smooth_field(shape_zyx: tuple[int, int, int], rng: np.random.Generator, strength: float) -> np.ndarray:
    """exp(random quadratic polynomial) with max |log B| = strength over the volume."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    terms = [x, y, z, x * y, x**2, y**2, x * z, y * z]
    c = rng.normal(0.0, 1.0, len(terms))
    poly = sum(ci * t for ci, t in zip(c, terms, strict=True))
    poly = poly - poly.mean()
    return np.exp(strength * poly / max(1e-9, np.abs(poly).max())).astype(np.float32)


def _phantom_volume(shape_xyz: tuple[int, int, int], spacing: tuple[float, float, float],
                    tumour: tuple[float, float, float, float], contrast: dict[str, float], rng: np.random.Generator,
                    bias_strength: float, noise: float) -> tuple[np.ndarray, ...]:
    """(image, tumour mask, tissue labels, bias) arrays (z, y, x) on one grid, geometry in mm."""
    nx, ny, nz = shape_xyz
    sx, sy, sz = spacing
    xs = (np.arange(nx) - (nx - 1) / 2) * sx
    ys = (np.arange(ny) - (ny - 1) / 2) * sy
    zs = (np.arange(nz) - (nz - 1) / 2) * sz
    z, y, x = np.meshgrid(zs, ys, xs, indexing="ij")
    half_x, half_y = nx * sx / 2, ny * sy / 2
    labels = np.zeros(x.shape, np.uint8)
    labels[(x / (0.9 * half_x)) ** 2 + (y / (0.75 * half_y)) ** 2 < 1] = 1  # fat / body
    labels[(x / (0.45 * half_x)) ** 2 + ((y + 0.1 * half_y) / (0.35 * half_y)) ** 2 < 1] = 2  # muscle
    labels[(x / (0.18 * half_x)) ** 2 + ((y + 0.1 * half_y) / (0.18 * half_y)) ** 2 < 1] = 3  # rectal wall
    cx, cy, cz, r = tumour
    d2 = ((x - cx) / r) ** 2 + ((y - cy) / r) ** 2 + ((z - cz) / (1.5 * r)) ** 2
    mask = d2 < 1
    labels[mask] = 4
    values = np.array([0.0, contrast["fat"], contrast["muscle"], contrast["wall"], contrast["tumour"]])
    clean = values[labels]
    bias = _smooth_field(x.shape, rng, bias_strength)
    img = np.abs(clean * bias + rng.normal(0, noise, x.shape) + 1j * rng.normal(0, noise, x.shape))
    return img.astype(np.float32), mask.astype(np.uint8), labels, bias


PHANTOM_CONTRAST = {
    "t2w": {"fat": 220.0, "muscle": 90.0, "wall": 60.0, "tumour": 150.0},
    "ce_t1w": {"fat": 200.0, "muscle": 110.0, "wall": 160.0, "tumour": 240.0},
    "dwi": {"fat": 30.0, "muscle": 60.0, "wall": 70.0, "tumour": 200.0},
    "adc": {"fat": 300.0, "muscle": 1400.0, "wall": 1500.0, "tumour": 800.0},
}


def make_phantom_site(out_dir: Path, n_patients: int, sequences: list[str], *, shape: tuple[int, int, int] = (96, 96, 12),
                      spacing: tuple[float, float, float] = (0.7, 0.7, 4.0), seed: int = 0,
                      missing_mask_fraction: float = 0.1, bias_strength: float = 0.4) -> tuple[Path, TruthFn]:
    """Write a phantom site (site data contract) and keep each volume's truth outside it.

    T2W/CE-T1W on ``shape`` at ``spacing``; DWI/ADC at half the in-plane resolution over the same
    field of view. Each volume has its own random smooth bias field (max |log B| = ``bias_strength``)
    and Rician noise; about ``missing_mask_fraction`` of the non-T2W masks are left out (served by
    the T2W mask).
    """
    site = out_dir / "site"
    truth = out_dir / "truth"
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        pid = f"BENCH{i + 1:04d}"
        rows.append(f"{pid},{int(rng.random() < 0.35)}")
        for tp in ("pre", "post"):
            nx, ny, nz = shape
            r = float(rng.uniform(5, 9) if tp == "pre" else rng.uniform(3, 6))
            tumour = (float(rng.uniform(-6, 6)), float(rng.uniform(-10, 0)),
                      float(rng.uniform(-nz * spacing[2] / 4, nz * spacing[2] / 4)), r)
            for seq in sequences:
                coarse = seq in ("dwi", "adc")
                shp = (nx // 2, ny // 2, nz) if coarse else shape
                sp = (spacing[0] * 2, spacing[1] * 2, spacing[2]) if coarse else spacing
                img, mask, labels, bias = _phantom_volume(shp, sp, tumour, PHANTOM_CONTRAST[seq], rng,
                                                          bias_strength, noise=4.0)
                origin = (-(shp[0] - 1) / 2 * sp[0], -(shp[1] - 1) / 2 * sp[1], -(shp[2] - 1) / 2 * sp[2])

                def write(arr: np.ndarray, path: Path, sp: tuple[float, float, float] = sp,
                          origin: tuple[float, float, float] = origin) -> None:
                    im = sitk.GetImageFromArray(arr)
                    im.SetSpacing(sp)
                    im.SetOrigin(origin)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    sitk.WriteImage(im, str(path), useCompression=True)

                write(img.astype(np.int16), site / "images" / pid / tp / f"{seq}.nii.gz")
                if seq == "t2w" or rng.random() >= missing_mask_fraction:
                    write(mask, site / "masks" / pid / tp / f"{seq}.nii.gz")
                write(labels, truth / pid / tp / f"{seq}_labels.nii.gz")
                write(bias, truth / pid / tp / f"{seq}_bias.nii.gz")
    site.mkdir(parents=True, exist_ok=True)
    (site / "patients.csv").write_text("patient_id,response\n" + "\n".join(rows) + "\n")

    def truth_fn(pid: str, tp: str, seq: str) -> dict[str, sitk.Image]:
        return {"bias": sitk.ReadImage(str(truth / pid / tp / f"{seq}_bias.nii.gz")),
                "labels": sitk.ReadImage(str(truth / pid / tp / f"{seq}_labels.nii.gz"))}

    return site, truth_fn


# --------------------------------------------------------------------------- the synthetic cohort


def make_synth_site(out_dir: Path, cfg: RectalFLConfig, n_patients: int, site_name: str | None, seed: int,
                    workers: int) -> tuple[Path, TruthFn | None, str]:
    from simulations.synth import generate_cohort

    spec = next((s for s in cfg.synth.sites if site_name in (None, s.name)), None)
    if spec is None:
        raise SystemExit(f"site {site_name!r} is not in the config's synth.sites")
    spec = spec.model_copy(update={"patients": max(4, n_patients)})
    synth = cfg.synth.model_copy(update={"sites": [spec]})
    generate_cohort(synth, out_dir, seed=seed, workers=workers, overwrite=True)
    truth_fn: TruthFn | None = None
    try:
        from simulations.synth import true_bias_field

        def truth_fn(pid: str, tp: str, seq: str) -> dict[str, sitk.Image]:
            return {"bias": true_bias_field(synth, seed, spec.name, pid, tp, seq)}
    except ImportError:  # pragma: no cover - older generator
        truth_fn = None
    return out_dir / spec.name, truth_fn, f"{spec.name} ({spec.scanner})"


# --------------------------------------------------------------------------- quality of one volume


def _init_worker(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


def _cov(values: np.ndarray) -> float:
    v = values.astype(np.float64)
    return float(v.std() / v.mean()) if v.size and v.mean() else float("nan")


def quality_one(image_path: str, truth: dict[str, sitk.Image] | None, n4: dict[str, Any],
                slice_check: tuple[Any, RectalFLConfig, str] | None = None) -> dict[str, Any]:
    """The configured N4 fit vs the full-resolution fit on one raw volume (see module docstring).

    ``n4`` holds :func:`client.preprocess.n4_correct`'s keywords (shrink_factor, fit_spacing_mm,
    iterations, convergence_threshold); ``slice_check`` is ``(record, cfg, site_dir)`` to run the
    rest of the pipeline on both corrected volumes with the volume's tumour mask.
    """
    from shared.cohort import read_image

    img = sitk.Cast(read_image(image_path), sitk.sitkFloat32)
    fg = foreground_mask(img)
    t0 = time.perf_counter()
    c_s, b_s = n4_correct(img, mask=fg, **n4)
    t1 = time.perf_counter()
    c_f, b_f = n4_correct_full_resolution(img, iterations=n4["iterations"],
                                          convergence_threshold=n4["convergence_threshold"], mask=fg)
    t2 = time.perf_counter()
    m = sitk.GetArrayViewFromImage(fg) > 0
    a, f = sitk.GetArrayFromImage(c_s)[m], sitk.GetArrayFromImage(c_f)[m]
    out: dict[str, Any] = {"r": float(np.corrcoef(a, f)[0, 1]), "fit_s_shrunk": t1 - t0, "fit_s_full": t2 - t1,
                           "voxels": int(np.prod(img.GetSize()))}
    if slice_check is not None:
        from client.preprocess import _load_mask_for

        record, cfg, site_dir = slice_check
        pp = cfg.preprocess
        mask, _, _ = _load_mask_for(img, record, cfg, Path(site_dir), min_overlap=0.5, direction_tolerance=0.05)
        res = []
        for c in (c_s, c_f):  # the rest of client.preprocess.preprocess_volume, on each corrected volume
            c = denoise(c, pp.denoise.method, iterations=pp.denoise.iterations, time_step=pp.denoise.time_step)
            mk = mask
            if pp.spacing_mm is not None:
                c = resample_to_spacing(c, pp.spacing_mm)
                mk = resample_mask(mask, c)
            res.append(extract_slice(normalise(c, pp.clip_percentiles), mk, pp))
        out["same_slice"] = float(res[0].slice_index == res[1].slice_index)
        out["grey_diff"] = float(np.abs(res[0].image.astype(float) - res[1].image.astype(float)).mean())
    if truth and "bias" in truth:
        true_b = sitk.GetArrayFromImage(truth["bias"]).astype(np.float64)[m]
        out["resid_before"] = _cov(true_b)
        out["resid_shrunk"] = _cov(sitk.GetArrayFromImage(b_s)[m] / true_b)
        out["resid_full"] = _cov(sitk.GetArrayFromImage(b_f)[m] / true_b)
    if truth and "labels" in truth:
        lab = sitk.GetArrayFromImage(truth["labels"])
        # the largest homogeneous tissue, eroded so partial-volume edges do not count
        tissue = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray((lab == 1).astype(np.uint8)),
                                                         [2, 2, 0]))
        region = tissue.astype(bool)
        raw = sitk.GetArrayFromImage(img)
        out["cov_before"] = _cov(raw[region])
        out["cov_shrunk"] = _cov(sitk.GetArrayFromImage(c_s)[region])
        out["cov_full"] = _cov(sitk.GetArrayFromImage(c_f)[region])
    return out


# --------------------------------------------------------------------------- main


def _with_n4(cfg: RectalFLConfig, **n4: Any) -> RectalFLConfig:
    data = cfg.model_dump(mode="json")
    data["preprocess"]["n4"].update(n4, enabled=True)
    return RectalFLConfig.model_validate(data)


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if key in r and np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else float("nan")


def _pick(records: list[Any], n: int) -> list[Any]:
    """``n`` records spread evenly within each sequence (every sequence represented); n <= 0: all."""
    if n <= 0 or n >= len(records):
        return list(records)
    seqs = list(dict.fromkeys(r.sequence for r in records))
    per = -(-n // len(seqs))
    todo = []
    for seq in seqs:
        group = [r for r in records if r.sequence == seq]
        idx = np.linspace(0, len(group) - 1, min(per, len(group))).round().astype(int)
        todo += [group[i] for i in sorted(set(idx.tolist()))]
    return todo


def _progress(text: str, milestone: bool) -> None:
    """One status line: rewritten in place on a terminal; in a log, only the milestones, one per line."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r  {text}\033[K")
    elif milestone:
        sys.stderr.write(f"  {text}\n")
    sys.stderr.flush()


def _run_pipeline(site_dir: Path, cache: Path, cfg: RectalFLConfig, workers: int, n_pat: int,
                  label: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    shutil.rmtree(cache, ignore_errors=True)
    total = [0]

    def progress(done: int, n: int, what: str) -> None:
        total[0] = n
        _progress(f"{label}: {done}/{n} volumes ({what})", done == n or done % max(1, n // 10) == 0)

    t = time.perf_counter()
    man = preprocess_site(site_dir, cache, cfg, workers=workers, force=True, progress=progress)
    wall = time.perf_counter() - t
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    st = man["status"].value_counts().to_dict()
    ok = man["status"] == "ok"
    return man, {"wall_s": wall, "patients_per_s": n_pat / wall, "volumes_per_s": len(man) / wall,
                 "mean_volume_s": float(man.loc[ok, "seconds"].mean()) if ok.any() else float("nan"),
                 "max_volume_s": float(man.loc[ok, "seconds"].max()) if ok.any() else float("nan"),
                 "status": {k: int(v) for k, v in st.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m simulations.benchmarks.bench_preprocess", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="ITK threads with --workers 1 (default: all cores; with more workers each gets cores // workers); "
                         "--workers 1 --threads 1 = one core. The reference fits always use every core")
    ap.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--site-dir", type=Path, default=None, help="use this site folder instead of generating cases")
    ap.add_argument("--generator", choices=("auto", "synth", "phantom"), default="auto")
    ap.add_argument("--site", default=None, help="synth: which site of the config's synth section (default first)")
    ap.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                    help="volume size in voxels (default: the config's synth.shape)")
    ap.add_argument("--fov-mm", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                    help="synth: field of view in mm (default: the config's synth.fov_mm; clinical: 220 220 120)")
    ap.add_argument("--n4-fit-spacing", type=float, default=None, metavar="MM",
                    help="override preprocess.n4.fit_spacing_mm (0: use the shrink factor)")
    ap.add_argument("--n4-shrink", type=int, default=None,
                    help="override preprocess.n4.shrink_factor (and fit with it, unless --n4-fit-spacing is given)")
    ap.add_argument("--n4-iterations", type=int, nargs="+", default=None, help="override preprocess.n4.iterations")
    ap.add_argument("--n4-convergence", type=float, default=None,
                    help="override preprocess.n4.convergence_threshold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--naive-pipeline", choices=("auto", "on", "off"), default="auto",
                    help="also run the whole pipeline with a full-resolution N4 fit on every case (auto: when a "
                         "volume has at most 1 M voxels)")
    ap.add_argument("--reference-volumes", "--quality-volumes", dest="reference_volumes", type=int, default=24,
                    help="volumes compared with a full-resolution N4 fit, spread evenly over the sequences "
                         "(0 = all; each costs one configured and one full-resolution fit)")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep cases and caches here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    cfg = load_config(args.config)
    synth_over: dict[str, Any] = {}
    if args.shape:
        synth_over["shape"] = args.shape
    if args.fov_mm:
        synth_over["fov_mm"] = args.fov_mm
    if synth_over:
        cfg = RectalFLConfig.model_validate({**cfg.model_dump(mode="json"),
                                             "synth": {**cfg.synth.model_dump(mode="json"), **synth_over}})
    n4_over: dict[str, Any] = {}
    if args.n4_fit_spacing is not None:
        n4_over["fit_spacing_mm"] = args.n4_fit_spacing or None
    if args.n4_shrink is not None:
        n4_over["shrink_factor"] = args.n4_shrink
        n4_over.setdefault("fit_spacing_mm", None)
    if args.n4_iterations:
        n4_over["iterations"] = args.n4_iterations
    if args.n4_convergence is not None:
        n4_over["convergence_threshold"] = args.n4_convergence
    cfg = _with_n4(cfg, **n4_over)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    work.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or max(1, cpus // max(1, args.workers))
    truth_fn: TruthFn | None = None
    t0 = time.perf_counter()
    if args.site_dir:
        site_dir, source = args.site_dir, f"site folder {args.site_dir}"
    else:
        use_synth = args.generator == "synth"
        if args.generator == "auto":
            try:
                import simulations.synth as synth_mod

                use_synth = hasattr(synth_mod, "generate_cohort")
            except ImportError:
                use_synth = False
        if use_synth:
            site_dir, truth_fn, name = make_synth_site(work / "cohort", cfg, args.patients, args.site, args.seed,
                                                       max(args.workers, cpus))
            source = f"simulations.synth cohort, site {name}, shape {tuple(cfg.synth.shape)}"
        else:
            site_dir, truth_fn = make_phantom_site(work / "phantom", args.patients, list(cfg.data.sequences),
                                                   shape=tuple(cfg.synth.shape), seed=args.seed)
            source = f"built-in phantom, shape {tuple(cfg.synth.shape)}"
    gen_s = time.perf_counter() - t0

    from shared.cohort import iter_volumes, read_image

    records = iter_volumes(site_dir, cfg)
    n_pat = len({r.patient_id for r in records})
    n4 = cfg.preprocess.n4
    grids = {}
    for r in records:  # the fit grid of each sequence (its first volume)
        if r.sequence not in grids:
            im = read_image(Path(r.image_path))
            f = n4_shrink_factors(im, n4.shrink_factor, fit_spacing_mm=n4.fit_spacing_mm)
            grids[r.sequence] = {"size": list(im.GetSize()), "spacing": [round(v, 3) for v in im.GetSpacing()],
                                 "fit_grid": [n // k for n, k in zip(im.GetSize(), f, strict=True)]}
    max_vox = max((int(np.prod(g["size"])) for g in grids.values()), default=0)
    fit = f"fit grid ~{n4.fit_spacing_mm:g} mm" if n4.fit_spacing_mm else f"shrink factor {n4.shrink_factor}"
    print(f"cases: {source}: {n_pat} patients, {len(records)} volumes "
          f"({', '.join(cfg.data.sequences)} x {', '.join(cfg.data.timepoints)}); made in {gen_s:.1f} s")
    for seq, g in grids.items():
        print(f"  {seq}: {'x'.join(map(str, g['size']))} voxels at {'x'.join(f'{v:g}' for v in g['spacing'])} mm; "
              f"N4 fit on {'x'.join(map(str, g['fit_grid']))}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {cpus} CPU core(s), load average {load:.2f} before the runs; workers={args.workers} x "
          f"{threads} thread(s); N4 {fit}, iterations {n4.iterations}, convergence {n4.convergence_threshold}")

    results: dict[str, Any] = {"source": source, "patients": n_pat, "volumes": len(records), "cpus": cpus,
                               "load_before": load, "workers": args.workers, "threads": threads,
                               "config": str(args.config), "grids": grids,
                               "n4": n4.model_dump(mode="json")}
    if args.workers == 1:  # preprocess_site runs in this process; more workers get cores // workers threads each
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    runs: dict[str, tuple[pd.DataFrame, Path]] = {}
    man, results["configured"] = _run_pipeline(site_dir, work / "cache_configured", cfg, args.workers, n_pat,
                                               "configured")
    runs["configured"] = (man, work / "cache_configured")
    naive = args.naive_pipeline == "on" or (args.naive_pipeline == "auto" and max_vox <= 1_000_000)
    if naive:
        c = _with_n4(cfg, shrink_factor=1, fit_spacing_mm=None)
        man, results["full_res"] = _run_pipeline(site_dir, work / "cache_full", c, args.workers, n_pat,
                                                 "full-resolution N4")
        runs["full_res"] = (man, work / "cache_full")
        a, b = runs["configured"][0], runs["full_res"][0]
        both = (a["status"] == "ok") & (b["status"] == "ok")
        diffs = []
        for r in a[both].itertuples():
            ia, _ = load_slice(runs["configured"][1], r.patient_id, r.timepoint, r.sequence)
            ib, _ = load_slice(runs["full_res"][1], r.patient_id, r.timepoint, r.sequence)
            diffs.append(float(np.abs(ia.astype(float) - ib.astype(float)).mean()))
        same = float((a.loc[both, "slice_index"] == b.loc[both, "slice_index"]).mean()) if both.any() else np.nan
        results["cache_agreement"] = {"same_slice_index": same,
                                      "mean_abs_grey_diff": float(np.mean(diffs)) if diffs else float("nan")}
    else:
        print(f"naive full-resolution pipeline skipped ({max_vox / 1e6:.1f} M voxels per volume; "
              "--naive-pipeline on runs it); the reference fits below time it")

    # quality pass: the configured fit vs a full-resolution fit, with the rest of the pipeline on both
    todo = _pick(records, args.reference_volumes)
    n4_kw = {"shrink_factor": n4.shrink_factor, "fit_spacing_mm": n4.fit_spacing_mm,
             "iterations": list(n4.iterations), "convergence_threshold": n4.convergence_threshold}
    t = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    q_rows: list[dict[str, Any]] = []
    q_workers = max(1, min(args.workers, len(todo)))
    with ProcessPoolExecutor(max_workers=q_workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(max(1, cpus // q_workers),)) as ex:  # the reference fits use every core
        futs = []
        for r in todo:
            truth = truth_fn(r.patient_id, r.timepoint, r.sequence) if truth_fn else None
            futs.append((r, ex.submit(quality_one, str(r.image_path), truth, n4_kw, (r, cfg, str(site_dir)))))
        for i, (r, f) in enumerate(futs, 1):
            try:
                q_rows.append({"sequence": r.sequence, **f.result()})
            except Exception as exc:  # a bad volume is reported, not fatal
                logger.warning("quality pass: %s: %s", r.image_path, exc)
            _progress(f"reference fits: {i}/{len(futs)} volumes ({time.perf_counter() - t:.0f} s)", True)
    results["quality"] = {
        "volumes": len(q_rows), "seconds": time.perf_counter() - t,
        "pearson_r_mean": _mean(q_rows, "r"), "pearson_r_min": float(min((q["r"] for q in q_rows), default=np.nan)),
        "same_slice": _mean(q_rows, "same_slice"), "grey_diff": _mean(q_rows, "grey_diff"),
        "fit_s_shrunk_mean": _mean(q_rows, "fit_s_shrunk"), "fit_s_full_mean": _mean(q_rows, "fit_s_full"),
        "resid_bias_cov_before": _mean(q_rows, "resid_before"), "resid_bias_cov_shrunk": _mean(q_rows, "resid_shrunk"),
        "resid_bias_cov_full": _mean(q_rows, "resid_full"), "tissue_cov_before": _mean(q_rows, "cov_before"),
        "tissue_cov_shrunk": _mean(q_rows, "cov_shrunk"), "tissue_cov_full": _mean(q_rows, "cov_full"),
        "by_sequence": {s: {"r": _mean([q for q in q_rows if q["sequence"] == s], "r"),
                            "fit_s_shrunk": _mean([q for q in q_rows if q["sequence"] == s], "fit_s_shrunk"),
                            "fit_s_full": _mean([q for q in q_rows if q["sequence"] == s], "fit_s_full")}
                        for s in sorted({q["sequence"] for q in q_rows})},
    }
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    results["load_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    _report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _report(res: dict[str, Any]) -> None:
    s, f = res["configured"], res.get("full_res")
    q = res["quality"]
    n4 = res["n4"]
    fit = f"fit grid ~{n4['fit_spacing_mm']:g} mm" if n4["fit_spacing_mm"] else f"shrink_factor={n4['shrink_factor']}"
    lines = [
        "",
        f"preprocess_site throughput ({res['patients']} patients, {res['volumes']} volumes, workers={res['workers']}, "
        f"{res['cpus']} cores)",
        f"  {'pipeline':<34}{'wall s':>9}{'patients/s':>12}{'volumes/s':>11}{'s/volume':>10}{'max':>7}  status",
        f"  {'N4 ' + fit:<34}{s['wall_s']:>9.1f}{s['patients_per_s']:>12.3f}{s['volumes_per_s']:>11.3f}"
        f"{s['mean_volume_s']:>10.2f}{s['max_volume_s']:>7.2f}  {s['status']}",
    ]
    if f is not None:
        ag = res["cache_agreement"]
        lines += [
            f"  {'N4 full resolution (naive)':<34}{f['wall_s']:>9.1f}{f['patients_per_s']:>12.3f}"
            f"{f['volumes_per_s']:>11.3f}{f['mean_volume_s']:>10.2f}{f['max_volume_s']:>7.2f}  {f['status']}",
            f"  speed-up: x{f['wall_s'] / s['wall_s']:.2f} (wall)",
            f"  caches agree: same slice index for {ag['same_slice_index']:.1%} of volumes; mean |grey-level "
            f"difference| of the cached slices {ag['mean_abs_grey_diff']:.2f} (0-255 scale)",
        ]
    lines += [
        "",
        f"N4 quality, configured vs full-resolution fit ({q['volumes']} volumes, {q['seconds']:.1f} s)",
        f"  Pearson r of the corrected volumes (foreground): mean {q['pearson_r_mean']:.5f}, min {q['pearson_r_min']:.5f}",
        f"  whole pipeline on both: same largest-tumour slice for {q['same_slice']:.0%} of volumes, mean |grey-level "
        f"difference| of the cached slices {q['grey_diff']:.2f} (0-255 scale)",
        f"  fit time per volume: configured {q['fit_s_shrunk_mean']:.2f} s, full resolution {q['fit_s_full_mean']:.2f} s",
    ]
    if np.isfinite(q["resid_bias_cov_shrunk"]):
        lines.append(f"  residual bias CoV (B_est/B_true, foreground): before {q['resid_bias_cov_before']:.4f}, "
                     f"configured {q['resid_bias_cov_shrunk']:.4f}, full {q['resid_bias_cov_full']:.4f}")
    if np.isfinite(q["tissue_cov_shrunk"]):
        lines.append(f"  CoV in a homogeneous tissue region: before {q['tissue_cov_before']:.4f}, "
                     f"configured {q['tissue_cov_shrunk']:.4f}, full {q['tissue_cov_full']:.4f}")
    else:
        lines.append("  CoV in a tissue region: n/a (no tissue labels for these cases)")
    for seq, v in q["by_sequence"].items():
        lines.append(f"  {seq:<7} r {v['r']:.5f}  fit s: configured {v['fit_s_shrunk']:.2f}, full {v['fit_s_full']:.2f}")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
