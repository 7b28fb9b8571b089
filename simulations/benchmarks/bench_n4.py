"""N4 bias-field correction at clinical size: seconds per volume on one core, and what each fit setting costs.

Run from the repository root::

    python -m simulations.benchmarks.bench_n4                        # 512 x 512 x 30 at 0.43 x 0.43 x 4 mm
    python -m simulations.benchmarks.bench_n4 --volumes 1 --fit-spacings 7 --schedules 20,20,20 --no-full-reference
    python -m simulations.benchmarks.bench_n4 --source synth --volumes 1     # simulations.synth at 220 mm FOV

Phantom T2W volumes (pelvis, rectal wall, tumour) with a known smooth multiplicative bias field
(``bench_preprocess``'s phantom), written at the resolution of a clinical rectal T2W series; or
(``--source synth``) T2W volumes of the synthetic cohort over a clinical field of view (harder:
anatomy, scanner contrast, Rician noise; no tissue labels, so no muscle CoV). For
each fit setting - the fixed ``shrink_factor`` 4 with the old default schedule, and every physical
fit grid (``preprocess.n4.fit_spacing_mm``) x iteration schedule (``preprocess.n4.iterations``: one
entry per fitting level) x convergence threshold - :func:`client.image_ops.n4_correct` runs exactly
as preprocessing runs it (fit on one ITK thread; here everything on one thread), and the benchmark
prints seconds per volume, the fit grid, the correlation of the estimated log bias with the true one
inside the body, the correlation of the corrected volume with a fit at FULL resolution of the same
volume (``--full-reference``, default on: minutes per volume, done once per volume with every core),
and the residual non-uniformity (coefficient of variation) of the muscle.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import SimpleITK as sitk

from client.image_ops import n4_correct, n4_correct_full_resolution, n4_shrink_factors
from simulations.benchmarks.bench_preprocess import PHANTOM_CONTRAST, _phantom_volume

ITERATIONS = (50, 40, 30)


def phantom(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int):
    rng = np.random.default_rng(seed)
    tumour = (float(rng.uniform(-15, 15)), float(rng.uniform(-15, 10)), 0.0, float(rng.uniform(10, 20)))
    img, _, labels, bias = _phantom_volume(shape, spacing, tumour, PHANTOM_CONTRAST["t2w"], rng, 0.4, 6.0)
    im = sitk.GetImageFromArray(img)
    im.SetSpacing(spacing)
    return im, labels, bias


def synthetic(shape: tuple[int, int, int], fov_mm: tuple[float, float, float], seed: int):
    """A ``simulations.synth`` T2W (Siemens-like profile) of ``shape`` voxels over ``fov_mm``: the image, a body
    mask (label 1: the Otsu foreground; no tissue labels, so no muscle CoV) and the true bias field."""
    from client.image_ops import foreground_mask
    from shared.config import SiteSpec, SynthConfig
    from simulations.synth import render_patient

    spec = SiteSpec(name="bench", patients=4, scanner="siemens_like")
    cfg = SynthConfig(sites=[spec], shape=shape, fov_mm=fov_mm)
    vol = render_patient(cfg, spec, seed, 0, sequences=("t2w",), timepoints=("pre",)).volumes[("pre", "t2w")]
    im = sitk.Cast(vol.image_sitk(), sitk.sitkFloat32)
    body = sitk.GetArrayFromImage(foreground_mask(im)).astype(np.uint8)
    return im, body, sitk.GetArrayFromImage(vol.bias_sitk()).astype(np.float64)


def _cov(arr: np.ndarray, region: np.ndarray) -> float:
    if not region.any():
        return float("nan")
    v = arr[region].astype(np.float64)
    return float(v.std() / v.mean())


def run(setting: float | None, schedule: tuple[int, ...], threshold: float, im: sitk.Image, labels: np.ndarray,
        bias: np.ndarray, reference: np.ndarray | None) -> dict[str, float]:
    t = time.perf_counter()
    corr, est = n4_correct(im, shrink_factor=4, iterations=schedule, convergence_threshold=threshold,
                           fit_spacing_mm=setting)
    seconds = time.perf_counter() - t
    c, b = sitk.GetArrayFromImage(corr), sitk.GetArrayFromImage(est)
    body = labels > 0
    return {"s": seconds, "r_bias": float(np.corrcoef(np.log(b[body]), np.log(bias[body]))[0, 1]),
            "r_full": float(np.corrcoef(c[body], reference[body])[0, 1]) if reference is not None else float("nan"),
            "cov": _cov(c, labels == 2)}


def _schedule(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 30], metavar=("X", "Y", "Z"))
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.43, 0.43, 4.0], metavar=("X", "Y", "Z"))
    ap.add_argument("--volumes", type=int, default=2)
    ap.add_argument("--source", choices=("phantom", "synth"), default="phantom",
                    help="phantom (tissue labels: muscle CoV) or simulations.synth (harder anatomy and contrast)")
    ap.add_argument("--fov-mm", type=float, nargs=3, default=[220.0, 220.0, 120.0], metavar=("X", "Y", "Z"),
                    help="synth: field of view (the spacing then follows from it and the scanner profile)")
    ap.add_argument("--fit-spacings", type=float, nargs="+", default=[3.5, 7.0, 10.0],
                    help="physical fit grids (mm), each with every schedule and threshold")
    ap.add_argument("--schedules", type=_schedule, nargs="+", default=[(50, 40, 30), (20, 20, 20), (30, 20)],
                    help="iterations per fitting level, comma-separated (e.g. 20,20,20)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[1e-4, 1e-3], help="convergence thresholds")
    ap.add_argument("--shrink4", action=argparse.BooleanOptionalAction, default=True,
                    help="also the fixed shrink factor 4 with 50,40,30 / 1e-4 (the demo's kind of setting)")
    ap.add_argument("--full-reference", action=argparse.BooleanOptionalAction, default=True,
                    help="compare every setting with an N4 fit at full resolution (minutes per volume)")
    args = ap.parse_args()
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    settings: list[tuple[float | None, tuple[int, ...], float]] = []
    if args.shrink4:
        settings.append((None, ITERATIONS, 1e-4))
    settings += [(fs, sch, th) for fs in args.fit_spacings for sch in args.schedules for th in args.thresholds]
    rows: dict[tuple, list[dict[str, float]]] = {s: [] for s in settings}
    grids: dict[float | None, str] = {}
    cores = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    full_s = []
    for v in range(args.volumes):
        if args.source == "synth":
            im, labels, bias = synthetic(shape, tuple(args.fov_mm), seed=v)
            spacing = tuple(round(x, 3) for x in im.GetSpacing())
        else:
            im, labels, bias = phantom(shape, spacing, seed=v)
        raw_cov = _cov(sitk.GetArrayFromImage(im), labels == 2)
        ref = None
        if args.full_reference:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(cores)
            t = time.perf_counter()
            full, _ = n4_correct_full_resolution(im, iterations=ITERATIONS, convergence_threshold=1e-4)
            full_s.append(time.perf_counter() - t)
            ref = sitk.GetArrayFromImage(full)
            print(f"volume {v + 1}: full-resolution reference fit ({ITERATIONS}, 1e-4, {cores} threads): "
                  f"{full_s[-1]:.0f} s", flush=True)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one core, as a preprocessing worker
        for st in settings:
            r = run(*st, im, labels, bias, ref)
            r["raw_cov"] = raw_cov
            rows[st].append(r)
            f = n4_shrink_factors(im, 4, fit_spacing_mm=st[0])
            grids[st[0]] = "x".join(str(n // k) for n, k in zip(shape, f, strict=True))
        print(f"volume {v + 1}: {len(settings)} settings done", flush=True)
    print(f"\n{args.source}: {shape[0]}x{shape[1]}x{shape[2]} at {spacing[0]:g}x{spacing[1]:g}x{spacing[2]:g} mm, "
          f"{args.volumes} volume(s), one thread per fit"
          + (f"; full-resolution reference fits {np.mean(full_s):.0f} s per volume on {cores} threads" if full_s else ""))
    print(f"{'fit':12s} {'fit grid':>10s} {'schedule':>10s} {'conv':>6s} {'s/volume':>9s} {'r(log bias)':>11s} "
          f"{'r vs full (min)':>15s} {'muscle CoV':>10s} {'(raw)':>6s}")
    for st in settings:
        rs = rows[st]
        name = "shrink 4" if st[0] is None else f"{st[0]:g} mm grid"
        print(f"{name:12s} {grids[st[0]]:>10s} {','.join(map(str, st[1])):>10s} {st[2]:>6.0e} "
              f"{np.mean([r['s'] for r in rs]):9.2f} {np.mean([r['r_bias'] for r in rs]):11.4f} "
              f"{min(r['r_full'] for r in rs):15.5f} {np.mean([r['cov'] for r in rs]):10.4f} "
              f"{np.mean([r['raw_cov'] for r in rs]):6.3f}")


if __name__ == "__main__":
    main()
