"""N4 bias-field correction at clinical size: seconds per volume on one core, and what a coarser fit costs.

Run from the repository root::

    python -m simulations.benchmarks.bench_n4                        # 512 x 512 x 30 at 0.43 x 0.43 x 4 mm
    python -m simulations.benchmarks.bench_n4 --volumes 2 --fit-spacings 3.5 7

Phantom T2W volumes (pelvis, rectal wall, tumour) with a known smooth multiplicative bias field
(``bench_preprocess``'s phantom), written at the resolution of a clinical rectal T2W series. For
each fit setting - the fixed ``shrink_factor`` (the default, 4) and physical fit grids
(``preprocess.n4.fit_spacing_mm``) - :func:`client.image_ops.n4_correct` runs exactly as
preprocessing runs it (fit on one ITK thread; here everything on one thread), and the benchmark
prints seconds per volume, the fit grid, the correlation of the estimated log bias with the true
one inside the body, the correlation of the corrected volume with the fixed-factor result, and the
residual non-uniformity (coefficient of variation) of the muscle.

``--full-check`` adds the comparison with an N4 fit at full resolution on a smaller volume of the
same field of view (a full-resolution fit at 512 x 512 takes far too long to be a routine check).
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


def _cov(arr: np.ndarray, region: np.ndarray) -> float:
    v = arr[region].astype(np.float64)
    return float(v.std() / v.mean())


def run(setting: float | None, im: sitk.Image, labels: np.ndarray, bias: np.ndarray,
        reference: np.ndarray | None) -> dict[str, float]:
    t = time.perf_counter()
    corr, est = n4_correct(im, shrink_factor=4, iterations=ITERATIONS, fit_spacing_mm=setting)
    seconds = time.perf_counter() - t
    c, b = sitk.GetArrayFromImage(corr), sitk.GetArrayFromImage(est)
    body = labels > 0
    return {"s": seconds, "r_bias": float(np.corrcoef(np.log(b[body]), np.log(bias[body]))[0, 1]),
            "r_ref": float(np.corrcoef(c[body], reference[body])[0, 1]) if reference is not None else 1.0,
            "cov": _cov(c, labels == 2), "corrected": c}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 30], metavar=("X", "Y", "Z"))
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.43, 0.43, 4.0], metavar=("X", "Y", "Z"))
    ap.add_argument("--volumes", type=int, default=2)
    ap.add_argument("--fit-spacings", type=float, nargs="+", default=[3.5, 7.0],
                    help="physical fit grids to compare with the fixed shrink factor 4 (mm)")
    ap.add_argument("--full-check", type=int, default=4, metavar="SHRINK",
                    help="also compare with a full-resolution fit on the volume shrunk this much (0: skip)")
    args = ap.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one core, as a preprocessing worker
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    settings: list[float | None] = [None, *args.fit_spacings]
    rows: dict[float | None, list[dict[str, float]]] = {s: [] for s in settings}
    grids = {}
    for v in range(args.volumes):
        im, labels, bias = phantom(shape, spacing, seed=v)
        raw_cov = _cov(sitk.GetArrayFromImage(im), labels == 2)
        ref = None
        for s in settings:
            r = run(s, im, labels, bias, ref)
            if s is None:
                ref = r["corrected"]
            r["raw_cov"] = raw_cov
            rows[s].append(r)
            f = n4_shrink_factors(im, 4, fit_spacing_mm=s)
            grids[s] = "x".join(str(n // k) for n, k in zip(shape, f, strict=True))
            print(f"volume {v + 1}: {'shrink 4' if s is None else f'{s:g} mm'}: {r['s']:.1f} s", flush=True)
    print(f"\n{shape[0]}x{shape[1]}x{shape[2]} at {spacing[0]:g}x{spacing[1]:g}x{spacing[2]:g} mm, "
          f"{args.volumes} volume(s), one thread")
    print(f"{'fit':14s} {'fit grid':>12s} {'s/volume':>9s} {'r(log bias)':>11s} {'r vs shrink 4':>13s} "
          f"{'muscle CoV':>10s} {'(raw)':>6s}")
    for s in settings:
        rs = rows[s]
        name = "shrink 4" if s is None else f"{s:g} mm grid"
        print(f"{name:14s} {grids[s]:>12s} {np.mean([r['s'] for r in rs]):9.1f} {np.mean([r['r_bias'] for r in rs]):11.4f} "
              f"{min(r['r_ref'] for r in rs):13.5f} {np.mean([r['cov'] for r in rs]):10.4f} "
              f"{np.mean([r['raw_cov'] for r in rs]):6.3f}")
    if args.full_check:
        k = args.full_check
        small_shape = (shape[0] // k, shape[1] // k, shape[2])
        small_sp = (spacing[0] * k, spacing[1] * k, spacing[2])
        im, labels, bias = phantom(small_shape, small_sp, seed=0)
        t = time.perf_counter()
        full, _ = n4_correct_full_resolution(im, iterations=ITERATIONS)
        t_full = time.perf_counter() - t
        f = sitk.GetArrayFromImage(full)
        body = labels > 0
        print(f"\nagainst a full-resolution fit ({small_shape[0]}x{small_shape[1]}x{small_shape[2]} at "
              f"{small_sp[0]:g} mm, same field of view; the full fit took {t_full:.0f} s):")
        for s in settings:
            c, _ = n4_correct(im, shrink_factor=4, iterations=ITERATIONS, fit_spacing_mm=s)
            r = float(np.corrcoef(sitk.GetArrayFromImage(c)[body], f[body])[0, 1])
            print(f"  {'shrink 4' if s is None else f'{s:g} mm grid':14s} r = {r:.5f}")


if __name__ == "__main__":
    main()
