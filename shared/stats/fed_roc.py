"""Federated ROC statistics: AUC (DeLong or bootstrap CI), paired DeLong test, Youden threshold.

Round 1 (all): each site bins each score on the shared grid and sends, per class, the cells of
its histogram (:mod:`shared.stats.histogram`) and its class counts.

Round 2 (DeLong only): the server sends, per score, four arrays over the fine bins built from the
pooled cells (for bin ``j``)::

    v10[j] = (negatives surely below j + 0.5 negatives in a cell containing j) / n_neg
    t10[j] = negatives in a cell containing j / n_neg
    v01[j] = (positives surely above j + 0.5 positives in a cell containing j) / n_pos
    t01[j] = positives in a cell containing j / n_pos

Each site looks up its own patients' bins, replaces the half credit its *own* cells got by the
exact order of its own pairs (it knows both fine bins), and returns only sums: per score the sum
of the placement values over its positives (v10) and over its negatives (v01), the matrices of
cross-product sums (``v10_a v10_b`` ...) and the sums of t10 / t01 (after the same correction). The server forms the DeLong AUCs and covariance
(:func:`shared.stats.roc.delong_from_moments`).

Bound. A positive-negative pair whose bins differ and whose cells do not overlap is ordered
exactly; any other pair gets 1/2 where the raw scores give 0, 1/2 or 1. Hence, against the pooled
AUC of the raw scores::

    |AUC_fed - AUC_pooled| <= 0.25 * (sum t10 / n_pos + sum t01 / n_neg)      ("auc" in bound)

i.e. half the fraction of pairs the grid cannot order (same fine bin, or a patient of one site
inside a merged cell of another site). With single-bin cells (no merging) it is ``0.5 * (pairs in the same bin) / (n_pos n_neg)``,
and for on-grid scores the result equals the pooled one exactly. The DeLong variance is exact in
that case too; with merged cells it is computed from the half-credit placement values and is not
bounded.

A site with ``0 < n < min_count`` patients in a class is excluded from the quantity (recorded);
a class with no patient at a site is fine (the site contributes the other class).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._checks import DEFAULT_MIN_COUNT, as_binary, as_scores, check_alpha, small, where
from .histogram import Cells, Grid, mann_whitney_cells
from .protocol import (
    EXCLUDED_CLASS,
    MERGED,
    FederatedProtocol,
    Final,
    Params,
    Summary,
    run_protocol,
    site_min_count,
)
from .results import AUCResult, DeLongResult, Federated, YoudenResult
from .roc import _normal_ci, bootstrap_aucs, delong_from_moments, delong_result, youden_from_counts

logger = logging.getLogger(__name__)

CLASSES = ("pos", "neg")


def _site_arrays(data: Sequence[Any], n_scores: int, site: str | None) -> tuple[np.ndarray, list[np.ndarray]]:
    if len(data) != 1 + n_scores:
        raise ValueError(f"site data{where(site)} must be (y_true, {n_scores} score array(s))")
    y = as_binary(data[0], site=site)
    names = ["score"] if n_scores == 1 else [f"score_{c}" for c in "ab"[:n_scores]]
    return y, [as_scores(s, y.size, n, site) for s, n in zip(data[1:], names, strict=True)]


def _check_lookup(arr: np.ndarray, n_bins: int, increasing: bool, key: str) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    d = np.diff(a)
    if a.shape != (n_bins,) or a.min() < 0 or a.max() > 1 or not ((d >= -1e-12) if increasing else (d <= 1e-12)).all():
        raise ValueError(f"server parameter {key!r} is not a monotone table in [0, 1] of length {n_bins}")
    return a


def _check_range(arr: np.ndarray, n_bins: int, key: str) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.shape != (n_bins,) or a.min() < 0 or a.max() > 1:
        raise ValueError(f"server parameter {key!r} is not a table in [0, 1] of length {n_bins}")
    return a


class ROCProtocol(FederatedProtocol):
    """AUC / paired DeLong / Youden from histograms (see module docstring).

    Parameters
    ----------
    n_scores : {1, 2}
        One score (AUC, Youden) or two paired scores (DeLong test).
    grid : Grid, optional
        Shared grid; default :meth:`Grid.probability` (10001 bins on [0, 1]).
    output : {"auc", "delong", "youden"}
    alpha : float
    method : {"delong", "bootstrap"}
        For ``output="auc"``. The bootstrap runs on the server from the round-1 cells.
    n_boot, seed : int
    min_count : int
    """

    name = "roc"

    def __init__(self, n_scores: int = 1, grid: Grid | None = None, output: str = "auc", alpha: float = 0.05,
                 method: str = "delong", n_boot: int = 2000, seed: int | None = None,
                 *, min_count: int = DEFAULT_MIN_COUNT) -> None:
        super().__init__(min_count=min_count)
        if n_scores not in (1, 2):
            raise ValueError(f"n_scores must be 1 or 2, got {n_scores}")
        if output not in ("auc", "delong", "youden") or (output == "delong") != (n_scores == 2):
            raise ValueError(f"output {output!r} does not fit n_scores={n_scores}")
        if method not in ("delong", "bootstrap"):
            raise ValueError(f"method must be 'delong' or 'bootstrap', got {method!r}")
        self.n_scores, self.output, self.method = n_scores, output, method
        self.grid = grid if grid is not None else Grid.probability()
        self.alpha = check_alpha(alpha)
        self.n_boot, self.seed = n_boot, seed
        self.included: list[str] = []
        self.cells: list[dict[str, Cells]] = []
        self.n1 = self.n0 = 0

    def start(self) -> Params:
        self.round = 1
        return {"round": 1, "min_count": self.min_count, "n_scores": self.n_scores, "grid.edges": self.grid.edges}

    @staticmethod
    def site_step(data: Sequence[Any], params: Params, *, site: str | None = None,
                  min_count: int = DEFAULT_MIN_COUNT) -> Summary:
        """Round 1: cells per score and class. Round 2: placement-value sums.

        Parameters
        ----------
        data : tuple ``(y_true, score)`` or ``(y_true, score_a, score_b)``
            Arrays of shape (n,).
        params : dict
            Server message.
        """
        k = site_min_count(params, min_count)
        m = int(params["n_scores"])
        y, scores = _site_arrays(data, m, site)
        n1, n0 = int(y.sum()), int(y.size - y.sum())
        out: Summary = {"round": int(params["round"]), "min_count": k}
        qn = "roc" if m == 1 else "delong"
        if small(n1, k) or small(n0, k):
            out[f"supp.{qn}"] = EXCLUDED_CLASS
            out["excluded"] = 1
            return out
        edges = np.asarray(params["grid.edges"], dtype=np.float64)
        grid = Grid.from_edges(edges)
        bins = [grid.bin(s, "score" if m == 1 else f"score_{'ab'[i]}", site) for i, s in enumerate(scores)]
        out.update({"excluded": 0, "n_pos": n1, "n_neg": n0})
        if int(params["round"]) == 1:
            for i, b in enumerate(bins):
                for c, mask in zip(CLASSES, (y == 1, y == 0), strict=True):
                    cells, merged = Cells.from_bins(b[mask], grid.n_bins, k)
                    out.update(cells.to_summary(f"s{i}.{c}"))
                    if merged:
                        out[f"supp.{qn}.s{i}.{c}"] = MERGED
            return out
        nb = grid.n_bins
        N1, N0 = int(params["n_pos"]), int(params["n_neg"])
        v10s, v01s, t10s, t01s = [], [], [], []
        for i, b in enumerate(bins):
            bp, bn = b[y == 1], b[y == 0]
            v10 = _check_lookup(params[f"s{i}.v10"], nb, True, f"s{i}.v10")[bp]
            v01 = _check_lookup(params[f"s{i}.v01"], nb, False, f"s{i}.v01")[bn]
            t10 = _check_range(params[f"s{i}.t10"], nb, f"s{i}.t10")[bp]
            t01 = _check_range(params[f"s{i}.t01"], nb, f"s{i}.t01")[bn]
            # pairs within this site: replace the half credit of its own cells by the exact order
            neg_cells, _ = Cells.from_bins(bn, nb, k)
            pos_cells, _ = Cells.from_bins(bp, nb, k)
            sn, sp = np.sort(bn), np.sort(bp)
            below = np.searchsorted(sn, bp, "left")
            tie = np.searchsorted(sn, bp, "right") - below
            cb, cc, _ = neg_cells.below_cover_above()
            v10s.append(v10 + ((below + 0.5 * tie) - (cb[bp] + 0.5 * cc[bp])) / N0)
            t10s.append((t10 + (tie - cc[bp]) / N0).sum())
            above = sp.size - np.searchsorted(sp, bn, "right")
            tie = np.searchsorted(sp, bn, "right") - np.searchsorted(sp, bn, "left")
            _, pc, pa = pos_cells.below_cover_above()
            v01s.append(v01 + ((above + 0.5 * tie) - (pa[bn] + 0.5 * pc[bn])) / N1)
            t01s.append((t01 + (tie - pc[bn]) / N1).sum())
        v10, v01 = np.stack(v10s), np.stack(v01s)
        t10, t01 = np.array(t10s), np.array(t01s)
        out.update({"sum10": v10.sum(axis=1), "sum01": v01.sum(axis=1), "prod10": v10 @ v10.T,
                    "prod01": v01 @ v01.T, "tie10": t10, "tie01": t01})
        return out

    def server_step(self, summaries: Mapping[str, Summary]) -> Params | Final:
        self.log_suppressions(summaries)
        if self.round == 1:
            return self._round1(summaries)
        return self._round2(summaries)

    def _round1(self, summaries: Mapping[str, Summary]) -> Params | Final:
        nb = self.grid.n_bins
        self.included = [s for s, v in summaries.items() if not int(v.get("excluded", 0))]
        self.n1 = sum(int(summaries[s]["n_pos"]) for s in self.included)
        self.n0 = sum(int(summaries[s]["n_neg"]) for s in self.included)
        if self.n1 == 0 or self.n0 == 0:
            absent = "positive" if self.n1 == 0 else "negative"
            raise ValueError(f"no {absent} patient in the included sites ({self.included}); the AUC is undefined")
        self.cells = [
            {c: Cells.concat([Cells.from_summary(summaries[s], f"s{i}.{c}", nb) for s in self.included], nb)
             for c in CLASSES}
            for i in range(self.n_scores)
        ]
        if self.output == "youden":
            return self._youden()
        if self.method == "bootstrap":
            return self._bootstrap()
        params: Params = {"round": 2, "min_count": self.min_count, "n_scores": self.n_scores,
                          "grid.edges": self.grid.edges, "n_pos": self.n1, "n_neg": self.n0}
        for i, cc in enumerate(self.cells):
            b0, c0, _ = cc["neg"].below_cover_above()
            _, c1, a1 = cc["pos"].below_cover_above()
            params[f"s{i}.v10"] = np.clip((b0 + 0.5 * c0) / self.n0, 0.0, 1.0)
            params[f"s{i}.t10"] = c0 / self.n0
            params[f"s{i}.v01"] = np.clip((a1 + 0.5 * c1) / self.n1, 0.0, 1.0)
            params[f"s{i}.t01"] = c1 / self.n1
        self.round = 2
        return params

    def _round2(self, summaries: Mapping[str, Summary]) -> Final:
        missing = [s for s in self.included if s not in summaries or int(summaries[s].get("excluded", 0))]
        if missing:
            raise ValueError(f"site(s) {missing} answered round 1 but not round 2")
        tot = {k: sum(np.asarray(summaries[s][k], dtype=np.float64) for s in self.included)
               for k in ("sum10", "sum01", "prod10", "prod01", "tie10", "tie01")}
        auc, cov = delong_from_moments(self.n1, self.n0, tot["sum10"], tot["sum01"], tot["prod10"], tot["prod01"])
        bound = 0.25 * (tot["tie10"] / self.n1 + tot["tie01"] / self.n0)
        if self.output == "auc":
            a, var = float(auc[0]), float(cov[0, 0])
            lo, hi = _normal_ci(a, var, self.alpha)
            return Final(AUCResult(a, lo, hi, var, self.n1, self.n0, self.alpha, "delong"), {"auc": float(bound[0])})
        res: DeLongResult = delong_result(auc, cov, self.alpha)
        return Final(res, {"auc_a": float(bound[0]), "auc_b": float(bound[1]), "diff": float(bound.sum())})

    def _bootstrap(self) -> Final:
        pos, neg = self.cells[0]["pos"], self.cells[0]["neg"]
        u, unresolved = mann_whitney_cells(pos, neg)
        a = u / (self.n1 * self.n0)
        boots = bootstrap_aucs(pos, neg, self.n_boot, self.seed)
        lo, hi = np.quantile(boots, [self.alpha / 2, 1 - self.alpha / 2])
        res = AUCResult(a, float(lo), float(hi), float(boots.var(ddof=1)), self.n1, self.n0, self.alpha, "bootstrap")
        return Final(res, {"auc": 0.5 * unresolved / (self.n1 * self.n0)})

    def _youden(self) -> Final:
        pos, neg = self.cells[0]["pos"], self.cells[0]["neg"]
        nb = self.grid.n_bins
        cover = np.zeros(nb + 1)
        for c in (pos, neg):
            np.add.at(cover, c.start, 1)
            np.add.at(cover, c.stop, -1)
        cand = np.flatnonzero(np.cumsum(cover)[:nb] > 0)
        tp_s, tp_p = pos.at_or_above(cand)
        fp_s, fp_p = neg.at_or_above(cand)
        res: YoudenResult = youden_from_counts(self.grid.points[cand], (tp_s + tp_p) / 2, (fp_s + fp_p) / 2,
                                               self.n1, self.n0)
        i = int(np.searchsorted(self.grid.points[cand], res.threshold))
        bound = 0.5 * (tp_p[i] - tp_s[i]) / self.n1 + 0.5 * (fp_p[i] - fp_s[i]) / self.n0
        return Final(res, {"j": float(bound)})


def federated_auc_ci(
    sites: Sequence[tuple[np.ndarray, np.ndarray]] | Mapping[str, tuple[np.ndarray, np.ndarray]],
    alpha: float = 0.05, method: str = "delong", grid: Grid | None = None, n_boot: int = 2000,
    seed: int | None = None, min_count: int = DEFAULT_MIN_COUNT,
) -> Federated[AUCResult]:
    """Federated :func:`shared.stats.auc_ci`; ``sites`` holds one ``(y_true, score)`` per site.

    Returns
    -------
    Federated[AUCResult]
        ``bound["auc"]`` is the certified distance to the pooled AUC of the raw scores.
    """
    proto = ROCProtocol(1, grid, "auc", alpha, method, n_boot, seed, min_count=min_count)
    return run_protocol(proto, sites)


def federated_delong_test(
    sites: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] | Mapping[str, tuple],
    alpha: float = 0.05, grid: Grid | None = None, min_count: int = DEFAULT_MIN_COUNT,
) -> Federated[DeLongResult]:
    """Federated :func:`shared.stats.delong_test`; one ``(y_true, score_a, score_b)`` per site."""
    return run_protocol(ROCProtocol(2, grid, "delong", alpha, min_count=min_count), sites)


def federated_youden_threshold(
    sites: Sequence[tuple[np.ndarray, np.ndarray]] | Mapping[str, tuple[np.ndarray, np.ndarray]],
    grid: Grid | None = None, min_count: int = DEFAULT_MIN_COUNT,
) -> Federated[YoudenResult]:
    """Federated :func:`shared.stats.youden_threshold` from the pooled histogram ROC.

    Candidate thresholds are the points of grid bins holding (or covered by a cell holding)
    patients; equals the pooled result on grid-snapped scores without merging. ``bound["j"]``
    bounds the error of the reported J due to merged cells straddling the threshold (for the
    rule "score in a bin >= the threshold's bin").
    """
    return run_protocol(ROCProtocol(1, grid, "youden", min_count=min_count), sites)
