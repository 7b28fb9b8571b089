"""Spearman correlation between features, pooled and federated (binned, with a certified bound).

Why binned: Spearman's rho is Pearson's correlation of the pooled ranks, and a patient's pooled
rank depends on every other site's values, which cannot be had from sums. So the federated
protocol ranks on a pooled fine-grid histogram:

1. sums -> pooled mean and SD per feature -> each feature's grid: ``n_bins`` equal bins over
   ``mean +- span_sd * SD`` plus two open end bins (derived on site from totals, never chosen
   by the server, never from one patient's value);
2. pooled histogram per feature on that grid;
3. (``refine=True``) a second grid with edges at the pooled quantiles interpolated from that
   histogram (so skewed features, common in radiomics, get fine bins where their patients
   are), and the pooled histogram on it;
4. each site gives its patients the **mid-rank of their bin** (patients below + (count in
   bin + 1) / 2) and sends the sums of rank products ``sum r_f r_g``; rho = Pearson of those ranks.

The federated result equals, exactly, Spearman's rho of the grid-snapped pooled values
(:func:`spearman_binned`). Against the raw values the error is bounded from the pooled
histograms alone: within a bin holding ``c`` patients the raw ranks are a permutation of ``c``
consecutive ranks whose mean is the mid-rank, so the rank error vector ``u`` of a feature
satisfies ``|u|^2 <= sum_b c_b (c_b^2 - 1) / 12`` and sums to 0 (so it does not move the mean).
The angle between the centred raw and binned rank vectors is then at most
``theta = arcsin(min(1, |u| / |r_c|))`` per feature, and the raw rho lies within
``cos(arccos(rho_binned) -+ (theta_f + theta_g))`` (:func:`spearman_bound`).

Disclosure: the release (matrix of rho and bounds) needs ``n >= min_count``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from .sc_legacy import (
    Contribution,
    SiteComputedProtocol,
    State,
    as_count,
    check_consistent,
    small_count,
    withheld,
)


def check_features(x: Any, n_features: int | None = None) -> np.ndarray:
    """Validate a feature matrix of shape (n_samples, n_features), finite."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"features must have shape (n_samples, n_features), got {a.shape}")
    if n_features is not None and a.shape[1] != n_features:
        raise ValueError(f"expected {n_features} features, got {a.shape[1]}")
    if not np.all(np.isfinite(a)):
        rows = np.unique(np.argwhere(~np.isfinite(a))[:, 0])
        raise ValueError(f"features contain NaN/inf in rows {rows[:10].tolist()}; impute or exclude those patients")
    return a


def grid_edges(mean: np.ndarray, sd: np.ndarray, n_bins: int, span_sd: float) -> np.ndarray:
    """Per-feature inner edges (n_features, n_bins + 1) over ``mean +- span_sd * sd``.

    A feature with ``sd == 0`` gets a unit-width grid (all its patients fall in one bin).
    """
    width = np.where(sd > 0, sd, 1.0) * span_sd
    return (mean - width)[:, None] + np.linspace(0.0, 2.0, n_bins + 1)[None, :] * width[:, None]


def bin_features(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index per value: 0 = below the grid, 1..n_bins inside ``[e_b, e_{b+1})``, n_bins + 1 = at/above the top."""
    out = np.empty(x.shape, dtype=np.int64)
    for f in range(x.shape[1]):
        out[:, f] = np.searchsorted(edges[f], x[:, f], side="right")
    return out


def quantile_edges(hist: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Refined grid per feature: edges at pooled quantiles interpolated linearly inside the bins.

    Parameters
    ----------
    hist : ndarray of shape (n_features, n_bins + 2)
        Counts on ``edges`` (with the two open end bins).
    edges : ndarray of shape (n_features, n_bins + 1)

    Returns
    -------
    ndarray of shape (n_features, n_bins + 1)
        Non-decreasing (repeated edges make empty bins, which are harmless); same outer edges.
    """
    out = np.empty_like(edges)
    nb = edges.shape[1] - 1
    for f in range(edges.shape[0]):
        inner = hist[f, 1:-1]
        cum = np.concatenate([[0.0], np.cumsum(inner)])
        if cum[-1] <= 0:
            out[f] = edges[f]
            continue
        q = np.linspace(0.0, cum[-1], nb + 1)
        e = np.interp(q, cum, edges[f])
        e[0], e[-1] = edges[f, 0], edges[f, -1]
        out[f] = np.maximum.accumulate(e)
    return out


def _histograms(b: np.ndarray, n_bins: int) -> np.ndarray:
    return np.stack([np.bincount(b[:, f], minlength=n_bins + 2) for f in range(b.shape[1])]).astype(np.float64)


def midranks_from_hist(hist: np.ndarray) -> np.ndarray:
    """Mid-rank of each bin from counts (1-based ranks): below + (count + 1) / 2."""
    below = np.cumsum(hist, axis=-1) - hist
    return below + (hist + 1.0) / 2.0


def _rank_geometry(hist: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per feature: |centred binned ranks| and the bound on |raw - binned rank error|."""
    mr = midranks_from_hist(hist)
    centre = (n + 1) / 2.0
    norm_r = np.sqrt((hist * (mr - centre) ** 2).sum(axis=-1))
    err = np.sqrt((hist * (hist**2 - 1) / 12.0).sum(axis=-1))
    return norm_r, err


def spearman_bound(rho: np.ndarray, norm_r: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Certified bound on |rho_raw - rho_binned| per feature pair (see the module docstring)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = np.arcsin(np.clip(np.where(norm_r > 0, err / np.where(norm_r > 0, norm_r, 1.0), 1.0), 0.0, 1.0))
    delta = theta[:, None] + theta[None, :]
    phi = np.arccos(np.clip(rho, -1.0, 1.0))
    lo = np.cos(np.clip(phi + delta, 0.0, np.pi))
    hi = np.cos(np.clip(phi - delta, 0.0, np.pi))
    b = np.maximum(np.abs(hi - rho), np.abs(rho - lo))
    b = np.where(np.isfinite(rho), b, np.nan)
    np.fill_diagonal(b, 0.0)  # rho_ff = 1 on raw and binned values alike
    return b


def _mean_sd(n: int, s: np.ndarray, ss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SD (ddof=0) from sums; an SD at rounding level is set to 0 (constant feature)."""
    mean = s / n
    sd = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    return mean, np.where(sd > 1e-7 * np.maximum(1.0, np.abs(mean)), sd, 0.0)


def _rho_from_rank_products(rr: np.ndarray, n: int) -> np.ndarray:
    centre = (n + 1) / 2.0
    s = rr - n * centre**2  # sum of products of centred ranks (rank sums are n * centre)
    d = np.sqrt(np.clip(np.diag(s), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = s / np.outer(d, d)
    rho[~np.isfinite(rho)] = np.nan
    return np.clip(rho, -1.0, 1.0)


def spearman_binned(x: Any, n_bins: int = 1024, span_sd: float = 5.0, refine: bool = True) -> dict[str, np.ndarray]:
    """Pooled reference: Spearman's rho of the grid-snapped values, and the bound vs raw values.

    The grid is the one the federated protocol derives (pooled mean/SD with ``ddof=0``, then,
    with ``refine``, pooled quantiles from the first histogram).

    Returns
    -------
    dict
        ``rho`` (n_features, n_features), ``bound`` (same), ``edges`` (the final grid), ``n``.
    """
    a = check_features(x)
    n = a.shape[0]
    mean, sd = _mean_sd(n, a.sum(axis=0), (a**2).sum(axis=0))
    edges = grid_edges(mean, sd, n_bins, span_sd)
    b = bin_features(a, edges)
    hist = _histograms(b, n_bins)
    if refine:
        edges = quantile_edges(hist, edges)
        b = bin_features(a, edges)
        hist = _histograms(b, n_bins)
    ranks = np.stack([midranks_from_hist(hist[f])[b[:, f]] for f in range(a.shape[1])], axis=1)
    rho = _rho_from_rank_products(ranks.T @ ranks, n)
    norm_r, err = _rank_geometry(hist, n)
    return {"rho": rho, "bound": spearman_bound(rho, norm_r, err), "edges": edges, "n": n}


class SpearmanProtocol(SiteComputedProtocol):
    """Federated Spearman correlation matrix on pooled fine-grid ranks (3 or 4 rounds of sums).

    Parameters
    ----------
    feature_names : sequence of str
    n_bins : int
        Inner bins per feature (the bound shrinks as bins get finer).
    span_sd : float
        The grid covers pooled mean +- span_sd SD; values outside go to two open end bins.
    refine : bool
        Add a round that re-grids each feature at pooled quantiles (tighter bound on skewed data).
    """

    name: ClassVar[str] = "spearman"

    def __init__(self, feature_names: Sequence[str], *, n_bins: int = 1024, span_sd: float = 5.0,
                 refine: bool = True) -> None:
        if not feature_names:
            raise ValueError("feature_names must name at least one feature")
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins!r}")
        if not span_sd > 0:
            raise ValueError(f"span_sd must be > 0, got {span_sd!r}")
        self.feature_names = [str(f) for f in feature_names]
        self.n_bins, self.span_sd, self.refine = int(n_bins), float(span_sd), bool(refine)

    def params(self) -> dict[str, Any]:
        return {"features": self.feature_names, "n_bins": self.n_bins, "span_sd": self.span_sd,
                "refine": self.refine}

    def init_state(self) -> State:
        return {"phase": "moments"}

    def local(self, data: Any, state: State) -> Contribution:
        a = check_features(data, len(self.feature_names))
        if state["phase"] == "moments":
            return {"n": np.array([a.shape[0]], dtype=np.float64), "sum": a.sum(axis=0), "sumsq": (a**2).sum(axis=0)}
        b = bin_features(a, np.asarray(state["edges"]))
        if state["phase"] == "histogram":
            return {"hist": _histograms(b, self.n_bins)}
        mr = midranks_from_hist(np.asarray(state["hist"]))
        ranks = np.stack([mr[f][b[:, f]] for f in range(a.shape[1])], axis=1)
        return {"rank_products": ranks.T @ ranks}

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        if state["phase"] == "moments":
            n = int(as_count(totals["n"], "n")[0])
            if n == 0:
                return {"phase": "done", "n": 0}, True
            mean, sd = _mean_sd(n, np.asarray(totals["sum"]), np.asarray(totals["sumsq"]))
            edges = grid_edges(mean, sd, self.n_bins, self.span_sd)
            return {"phase": "histogram", "n": n, "edges": edges.tolist(), "refined": False}, False
        if state["phase"] == "histogram":
            hist = as_count(totals["hist"], "hist").astype(np.float64)
            check_consistent(bool(np.all(hist.sum(axis=1) == state["n"])), "histogram counts do not add up to n")
            if self.refine and not state["refined"]:
                state.update(edges=quantile_edges(hist, np.asarray(state["edges"])).tolist(), refined=True)
                return state, False
            state["hist"] = hist.tolist()
            state["phase"] = "ranks"
            return state, False
        n = state["n"]
        rp = np.asarray(totals["rank_products"])
        hist = np.asarray(state["hist"], dtype=np.float64)
        # sum_i r_fi^2 is fixed by the pooled histogram: the diagonal must equal it.
        expected_diag = (hist * midranks_from_hist(hist) ** 2).sum(axis=1)
        check_consistent(bool(np.allclose(np.diag(rp), expected_diag, rtol=1e-9)) and bool(np.allclose(rp, rp.T)),
                         "rank products do not match the pooled histogram")
        rho = _rho_from_rank_products(rp, n)
        norm_r, err = _rank_geometry(np.asarray(state["hist"], dtype=np.float64), n)
        state.update(phase="done", rho=rho.tolist(), bound=spearman_bound(rho, norm_r, err).tolist())
        for key in ("hist", "edges"):
            state.pop(key, None)
        return state, True

    def release(self, state: State, totals: Mapping[str, np.ndarray], min_count: int) -> dict[str, Any]:
        out: dict[str, Any] = {"method": "spearman", "exact": "on grid-snapped values; bound vs raw values",
                               "features": self.feature_names, "withheld": []}
        n = state.get("n", 0)
        if n < 3 or small_count(n, min_count):
            out["withheld"].append(withheld("spearman", f"fewer than max(3, min_count={min_count}) patients"))
            return out
        out.update({"n": n, "rho": state["rho"], "bound": state["bound"]})
        return out


def redundancy_filter(rho: Any, threshold: float = 0.95, priority: Sequence[float] | None = None,
                      bound: Any = None) -> dict[str, Any]:
    """Drop redundant features: keep greedily by priority, skipping any with |rho| > threshold to a kept one.

    Parameters
    ----------
    rho : array-like of shape (n_features, n_features)
    threshold : float
    priority : sequence of float, optional
        Higher is kept first (e.g. the ICC); ties and None keep the given order.
    bound : array-like of shape (n_features, n_features), optional
        The binning bound; pairs whose |rho| +- bound straddles the threshold are reported as
        ``"ambiguous"`` (the decision could differ on the raw values).

    Returns
    -------
    dict
        ``kept`` and ``dropped`` (feature indices; dropped maps to the kept feature that caused
        it) and ``ambiguous`` pairs.
    """
    r = np.abs(np.asarray(rho, dtype=np.float64))
    nf = r.shape[0]
    if r.shape != (nf, nf):
        raise ValueError(f"rho must be square, got {r.shape}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    pr = np.zeros(nf) if priority is None else np.asarray(priority, dtype=np.float64)
    order = sorted(range(nf), key=lambda i: (-np.nan_to_num(pr[i], nan=-np.inf), i))
    kept: list[int] = []
    dropped: dict[int, int] = {}
    for i in order:
        hit = next((j for j in kept if np.isfinite(r[i, j]) and r[i, j] > threshold), None)
        if hit is None:
            kept.append(i)
        else:
            dropped[i] = hit
    ambiguous: list[tuple[int, int]] = []
    if bound is not None:
        b = np.asarray(bound, dtype=np.float64)
        for i in range(nf):
            for j in range(i + 1, nf):
                if np.isfinite(r[i, j]) and r[i, j] - b[i, j] <= threshold < r[i, j] + b[i, j]:
                    ambiguous.append((i, j))
    return {"kept": sorted(kept), "dropped": dropped, "ambiguous": ambiguous}
