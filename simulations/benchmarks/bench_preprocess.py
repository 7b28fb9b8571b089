"""Benchmark: preprocessing throughput with shrunken-N4 vs a naive full-resolution N4, and the quality cost.

Run::

    python -m simulations.benchmarks.bench_preprocess --patients 20 --workers 2

What it does
------------
1. **Cases.** ``--site-dir`` takes an existing site folder. Otherwise ``--generator auto`` (default)
   uses :func:`simulations.synth.generate_cohort` when that module exists, with the ``synth``
   section of ``--config`` (default ``configs/demo.yaml``) restricted to one site (``--site``,
   default the first) with ``--patients`` patients; ``--generator phantom`` (or ``auto`` without
   ``simulations.synth``) writes a self-contained piecewise-homogeneous phantom site with a known
   smooth bias field per volume (:func:`make_phantom_site`).
2. **Throughput.** :func:`client.preprocess.preprocess_site` runs twice on the same cases, each into a
   fresh cache with ``--workers`` processes: the configured pipeline (N4 fitted on the image shrunk
   by ``preprocess.n4.shrink_factor``) and the naive baseline (the same pipeline with
   ``shrink_factor = 1``: N4 fitted at full resolution). Wall time includes process start-up, I/O
   and the cache writes; patients/s and volumes/s are computed from it.
3. **Quality** (per volume, in ``--workers`` processes): :func:`client.preprocess.n4_correct`
   (shrunken) vs :func:`client.preprocess.n4_correct_full_resolution` on the raw image: Pearson r
   between the two corrected volumes over the Otsu foreground; the residual bias CoV
   ``std/mean(B_est / B_true)`` over the foreground when the true field is known (synthetic and
   phantom cases; 0 = perfect up to scale); and, for the phantom, the CoV inside a homogeneous
   tissue region before and after each correction. Also the agreement of the two caches (same
   slice index, mean absolute grey-level difference of the cached slices).

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
import SimpleITK as sitk

from client.preprocess import (
    foreground_mask,
    load_slice,
    n4_correct,
    n4_correct_full_resolution,
    preprocess_site,
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


def quality_one(image_path: str, truth: dict[str, sitk.Image] | None, shrink_factor: int, iterations: list[int],
                convergence_threshold: float) -> dict[str, Any]:
    """Shrunken vs full-resolution N4 on one raw volume (see module docstring)."""
    from shared.cohort import read_image

    img = sitk.Cast(read_image(image_path), sitk.sitkFloat32)
    fg = foreground_mask(img)
    t0 = time.perf_counter()
    c_s, b_s = n4_correct(img, shrink_factor=shrink_factor, iterations=iterations,
                          convergence_threshold=convergence_threshold, mask=fg)
    t1 = time.perf_counter()
    c_f, b_f = n4_correct_full_resolution(img, iterations=iterations, convergence_threshold=convergence_threshold,
                                          mask=fg)
    t2 = time.perf_counter()
    m = sitk.GetArrayViewFromImage(fg) > 0
    a, f = sitk.GetArrayFromImage(c_s)[m], sitk.GetArrayFromImage(c_f)[m]
    out: dict[str, Any] = {"r": float(np.corrcoef(a, f)[0, 1]), "fit_s_shrunk": t1 - t0, "fit_s_full": t2 - t1,
                           "voxels": int(np.prod(img.GetSize()))}
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


def _variant(cfg: RectalFLConfig, shrink_factor: int) -> RectalFLConfig:
    data = cfg.model_dump(mode="json")
    data["preprocess"]["n4"]["shrink_factor"] = shrink_factor
    data["preprocess"]["n4"]["enabled"] = True
    return RectalFLConfig.model_validate(data)


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if key in r and np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else float("nan")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m simulations.benchmarks.bench_preprocess", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--site-dir", type=Path, default=None, help="use this site folder instead of generating cases")
    ap.add_argument("--generator", choices=("auto", "synth", "phantom"), default="auto")
    ap.add_argument("--site", default=None, help="synth: which site of the config's synth section (default first)")
    ap.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                    help="volume size in voxels (default: the config's synth.shape)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality-volumes", type=int, default=24,
                    help="volumes in the quality pass, spread evenly over the cases (0 = all; each costs one "
                         "shrunken and one full-resolution fit)")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep cases and caches here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    cfg = load_config(args.config)
    if args.shape:
        cfg = RectalFLConfig.model_validate({**cfg.model_dump(mode="json"),
                                             "synth": {**cfg.synth.model_dump(mode="json"), "shape": args.shape}})
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    work.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
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
                                                       args.workers)
            source = f"simulations.synth cohort, site {name}, shape {tuple(cfg.synth.shape)}"
        else:
            site_dir, truth_fn = make_phantom_site(work / "phantom", args.patients, list(cfg.data.sequences),
                                                   shape=tuple(cfg.synth.shape), seed=args.seed)
            source = f"built-in phantom, shape {tuple(cfg.synth.shape)}"
    gen_s = time.perf_counter() - t0

    from shared.cohort import iter_volumes

    records = iter_volumes(site_dir, cfg)
    n_pat = len({r.patient_id for r in records})
    print(f"cases: {source}: {n_pat} patients, {len(records)} volumes "
          f"({', '.join(cfg.data.sequences)} x {', '.join(cfg.data.timepoints)}); made in {gen_s:.1f} s")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {cpus} CPU core(s) available, load average {load:.2f} before the runs; workers={args.workers}; "
          f"N4 iterations {cfg.preprocess.n4.iterations}, convergence {cfg.preprocess.n4.convergence_threshold}")

    results: dict[str, Any] = {"source": source, "patients": n_pat, "volumes": len(records), "cpus": cpus,
                               "load_before": load,
                               "workers": args.workers, "config": str(args.config),
                               "n4_iterations": list(cfg.preprocess.n4.iterations)}
    shrink = cfg.preprocess.n4.shrink_factor
    runs = {}
    for label, sf in (("shrunken", shrink), ("full_res", 1)):
        cache = work / f"cache_{label}"
        shutil.rmtree(cache, ignore_errors=True)
        c = _variant(cfg, sf)
        t = time.perf_counter()
        man = preprocess_site(site_dir, cache, c, workers=args.workers, force=True)
        wall = time.perf_counter() - t
        runs[label] = (man, cache)
        st = man["status"].value_counts().to_dict()
        results[label] = {"shrink_factor": sf, "wall_s": wall, "patients_per_s": n_pat / wall,
                          "volumes_per_s": len(man) / wall, "mean_volume_s": float(man["seconds"].mean()),
                          "status": {k: int(v) for k, v in st.items()}}
    a, b = runs["shrunken"][0], runs["full_res"][0]
    both = (a["status"] == "ok") & (b["status"] == "ok")
    same_slice = float((a.loc[both, "slice_index"] == b.loc[both, "slice_index"]).mean()) if both.any() else float("nan")
    diffs = []
    for r in a[both].itertuples():
        ia, _ = load_slice(runs["shrunken"][1], r.patient_id, r.timepoint, r.sequence)
        ib, _ = load_slice(runs["full_res"][1], r.patient_id, r.timepoint, r.sequence)
        diffs.append(float(np.abs(ia.astype(float) - ib.astype(float)).mean()))
    results["cache_agreement"] = {"same_slice_index": same_slice, "mean_abs_grey_diff": float(np.mean(diffs))
                                  if diffs else float("nan")}

    # quality pass
    if args.quality_volumes <= 0 or args.quality_volumes >= len(records):
        todo = list(records)
    else:  # evenly spread within each sequence, so every sequence is represented
        seqs = list(dict.fromkeys(r.sequence for r in records))
        per = -(-args.quality_volumes // len(seqs))
        todo = []
        for seq in seqs:
            group = [r for r in records if r.sequence == seq]
            idx = np.linspace(0, len(group) - 1, min(per, len(group))).round().astype(int)
            todo += [group[i] for i in sorted(set(idx.tolist()))]
    n4 = cfg.preprocess.n4
    t = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, cpus // max(1, args.workers))
    q_rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=ctx, initializer=_init_worker,
                             initargs=(threads,)) as ex:
        futs = []
        for r in todo:
            truth = truth_fn(r.patient_id, r.timepoint, r.sequence) if truth_fn else None
            futs.append((r, ex.submit(quality_one, str(r.image_path), truth, shrink, list(n4.iterations),
                                      n4.convergence_threshold)))
        for r, f in futs:
            try:
                q_rows.append({"sequence": r.sequence, **f.result()})
            except Exception as exc:  # a bad volume is reported, not fatal
                logger.warning("quality pass: %s: %s", r.image_path, exc)
    results["quality"] = {
        "volumes": len(q_rows), "seconds": time.perf_counter() - t,
        "pearson_r_mean": _mean(q_rows, "r"), "pearson_r_min": float(min((q["r"] for q in q_rows), default=np.nan)),
        "fit_s_shrunk_mean": _mean(q_rows, "fit_s_shrunk"), "fit_s_full_mean": _mean(q_rows, "fit_s_full"),
        "resid_bias_cov_before": _mean(q_rows, "resid_before"), "resid_bias_cov_shrunk": _mean(q_rows, "resid_shrunk"),
        "resid_bias_cov_full": _mean(q_rows, "resid_full"), "tissue_cov_before": _mean(q_rows, "cov_before"),
        "tissue_cov_shrunk": _mean(q_rows, "cov_shrunk"), "tissue_cov_full": _mean(q_rows, "cov_full"),
        "by_sequence": {s: {"r": _mean([q for q in q_rows if q["sequence"] == s], "r"),
                            "fit_s_shrunk": _mean([q for q in q_rows if q["sequence"] == s], "fit_s_shrunk"),
                            "fit_s_full": _mean([q for q in q_rows if q["sequence"] == s], "fit_s_full")}
                        for s in sorted({q["sequence"] for q in q_rows})},
    }
    results["load_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    _report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _report(res: dict[str, Any]) -> None:
    s, f = res["shrunken"], res["full_res"]
    q, ag = res["quality"], res["cache_agreement"]
    lines = [
        "",
        f"preprocess_site throughput ({res['patients']} patients, {res['volumes']} volumes, workers={res['workers']}, "
        f"{res['cpus']} cores)",
        f"  {'pipeline':<34}{'wall s':>9}{'patients/s':>12}{'volumes/s':>11}{'s/volume':>10}  status",
        f"  {'N4 shrunken (shrink_factor=' + str(s['shrink_factor']) + ')':<34}{s['wall_s']:>9.1f}"
        f"{s['patients_per_s']:>12.3f}{s['volumes_per_s']:>11.3f}{s['mean_volume_s']:>10.2f}  {s['status']}",
        f"  {'N4 full resolution (naive)':<34}{f['wall_s']:>9.1f}{f['patients_per_s']:>12.3f}"
        f"{f['volumes_per_s']:>11.3f}{f['mean_volume_s']:>10.2f}  {f['status']}",
        f"  speed-up: x{f['wall_s'] / s['wall_s']:.2f} (wall)",
        f"  caches agree: same slice index for {ag['same_slice_index']:.1%} of volumes; mean |grey-level difference| "
        f"of the cached slices {ag['mean_abs_grey_diff']:.2f} (0-255 scale)",
        "",
        f"N4 quality, shrunken vs full-resolution fit ({q['volumes']} volumes, {q['seconds']:.1f} s)",
        f"  Pearson r of the corrected volumes (foreground): mean {q['pearson_r_mean']:.5f}, min {q['pearson_r_min']:.5f}",
        f"  fit time per volume: shrunken {q['fit_s_shrunk_mean']:.2f} s, full {q['fit_s_full_mean']:.2f} s",
    ]
    if np.isfinite(q["resid_bias_cov_shrunk"]):
        lines.append(f"  residual bias CoV (B_est/B_true, foreground): before {q['resid_bias_cov_before']:.4f}, "
                     f"shrunken {q['resid_bias_cov_shrunk']:.4f}, full {q['resid_bias_cov_full']:.4f}")
    if np.isfinite(q["tissue_cov_shrunk"]):
        lines.append(f"  CoV in a homogeneous tissue region: before {q['tissue_cov_before']:.4f}, "
                     f"shrunken {q['tissue_cov_shrunk']:.4f}, full {q['tissue_cov_full']:.4f}")
    else:
        lines.append("  CoV in a tissue region: n/a (no tissue labels for these cases)")
    for seq, v in q["by_sequence"].items():
        lines.append(f"  {seq:<7} r {v['r']:.5f}  fit s: shrunken {v['fit_s_shrunk']:.2f}, full {v['fit_s_full']:.2f}")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
