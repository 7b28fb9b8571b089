"""Benchmark of secure aggregation (:mod:`shared.secagg`) against a plain float64 sum.

Run from the repository root::

    python -m simulations.benchmarks.bench_secagg                 # 3/5/20 sites x 1e3/2e4/2e5 values
    python -m simulations.benchmarks.bench_secagg --sites 20 --lengths 20000

Each site contributes one float64 vector (fixed point, 24 fractional bits). All sites and the
server run in this one process, one after the other, through :func:`run_secure_sum` (state files
are written and fsynced as on a real site). Times are seconds per site per round (mean over sites)
and the server's sum; bytes are payload bytes (arrays + text) per site. "plain" is each site
sending its float64 vector and the server summing them, with no protection.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from shared.secagg import ArraySpec, SiteSecAgg, make_identities, run_secure_sum

ROUNDS = ("advertise", "share", "mask", "unmask")


def plain_run(data: dict[str, np.ndarray]) -> tuple[float, float, np.ndarray]:
    """Per-site payload time (mean), server sum time, and the sum, for the unprotected protocol."""
    t = time.perf_counter()
    payloads = {s: np.ascontiguousarray(v, dtype=np.float64).copy() for s, v in data.items()}
    t_site = (time.perf_counter() - t) / len(data)
    t = time.perf_counter()
    total = np.sum(np.stack(list(payloads.values())), axis=0)
    return t_site, time.perf_counter() - t, total


def bench(n_sites: int, length: int, seed: int, root: Path) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    names = [f"site_{i:02d}" for i in range(n_sites)]
    keys, roster = make_identities(names)
    sites = {n: SiteSecAgg(n, keys[n], roster, root / f"{n_sites}-{length}" / n) for n in names}
    vectors = {n: rng.uniform(-1000, 1000, size=length) for n in names}
    spec = {"v": ArraySpec(bound=1000.0, frac_bits=24)}
    t = time.perf_counter()
    res = run_secure_sum({n: {"v": v} for n, v in vectors.items()}, spec, sites=sites)
    wall = time.perf_counter() - t
    p_site, p_server, p_total = plain_run(vectors)
    err = float(np.max(np.abs(res.total["v"] - p_total))) if length else 0.0
    assert err <= n_sites * 2.0**-25 + 1e-6, err
    mean = {r: float(np.mean(list(res.seconds[r].values()))) for r in ROUNDS}
    up = {r: float(np.mean(list(res.bytes_up[r].values()))) for r in ROUNDS}
    down = {r: float(np.mean(list(res.bytes_down[r].values()))) for r in ROUNDS}
    tag = 8 * 4
    return {
        **{f"t_{r}": mean[r] for r in ROUNDS},
        "t_site": sum(mean.values()), "t_agg": res.seconds["aggregate"]["server"], "wall": wall,
        "p_site": p_site, "p_server": p_server, "err": err,
        "b_advert": up["advertise"], "b_env": up["share"], "b_masked": up["mask"] - tag, "b_tag": tag,
        "b_up": sum(up.values()), "b_down": sum(down.values()), "b_plain": 8.0 * length,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 5, 20])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 20000, 200000])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = {}
    print("seconds per site per round (mean over sites); server sum; bytes per site (payload)")
    print(f"{'sites':>5s} {'length':>7s} | {'advert':>7s} {'share':>7s} {'mask':>7s} {'unmask':>7s} "
          f"{'site tot':>8s} {'server':>7s} {'wall':>6s} | {'plain site':>10s} {'plain srv':>9s} | "
          f"{'advert B':>8s} {'env B':>6s} {'masked B':>9s} {'tag B':>5s} {'up B':>9s} {'down B':>9s} "
          f"{'plain B':>9s} {'up/plain':>8s} {'max err':>8s}")
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        for n in args.sites:
            for length in args.lengths:
                r = bench(n, length, args.seed, Path(tmp))
                rows[(n, length)] = r
                print(f"{n:5d} {length:7d} | {r['t_advertise']:7.4f} {r['t_share']:7.4f} {r['t_mask']:7.4f} "
                      f"{r['t_unmask']:7.4f} {r['t_site']:8.4f} {r['t_agg']:7.4f} {r['wall']:6.2f} | "
                      f"{r['p_site']:10.6f} {r['p_server']:9.6f} | {r['b_advert']:8.0f} {r['b_env']:6.0f} "
                      f"{r['b_masked']:9.0f} {r['b_tag']:5.0f} {r['b_up']:9.0f} {r['b_down']:9.0f} "
                      f"{r['b_plain']:9.0f} {r['b_up'] / max(r['b_plain'], 1):8.3f} {r['err']:8.1e}")
    key = (20, 20000) if (20, 20000) in rows else next(reversed(rows))
    r = rows[key]
    secure_t, plain_t = r["t_site"] + r["t_agg"], r["p_site"] + r["p_server"]
    print(f"{key[0]} sites x {key[1]}: secure/plain time {secure_t / plain_t:.0f}x "
          f"({secure_t:.4f} s vs {plain_t:.6f} s per site + server); bytes up {r['b_up'] / r['b_plain']:.3f}x, "
          f"up+down {(r['b_up'] + r['b_down']) / (2 * r['b_plain']):.3f}x (plain: vector up, total down)")


if __name__ == "__main__":
    main()
