"""Site-computed ROC analysis: AUC, DeLong variance and covariance of many score columns at once.

One query per cohort covers every model column (the same fixed patient set for all of them).

Rounds
------
1. Each site adds, per column and class, the histogram of its scores on the fixed probability grid
   (:meth:`shared.stats.histogram.Grid.probability`: 10001 bins centred on ``j / 10000``), the
   class counts, and the class histogram on the coarse display grid (``display_bins`` equal bins
   on [0, 1], binned from the raw scores). Every site then holds the pooled histograms (state).
   AUC and the DeLong variance of each column are exact functions of them: the placement value of
   a positive in bin ``b`` is ``V10(b) = (negatives in bins < b + 0.5 * negatives in b) / n_neg``,
   of a negative ``V01(b) = (positives in bins > b + 0.5 * positives in b) / n_pos`` (ties within a
   bin count half, as pROC's midranks), ``AUC = mean V10`` and ``var = S10 / n_pos + S01 / n_neg``
   with the ``n - 1`` sample variances of the placement values (DeLong et al. 1988; pROC).
2. Only with two or more columns: each site adds, over its own positives, ``V10_a * V10_b`` for
   every pair of columns (M x M), and over its negatives ``V01_a * V01_b``, looking its patients'
   bins up in the *pooled* tables it holds; the totals give the DeLong covariance matrix.

Nothing a round computes depends on a server message: the tables come from the previous totals.

Exactness
---------
For scores on the 1e-4 grid (e.g. probabilities rounded to 4 decimals), AUC, variance and
covariance equal :func:`shared.stats.auc_ci` / :func:`shared.stats.delong_test` on the same scores
(same-bin scores are then true ties). Otherwise two scores in one grid bin count as a tie: the
released ``tie_bound = 0.5 * (positive-negative pairs sharing a bin) / (n_pos * n_neg)`` bounds
``|AUC - AUC on the raw scores|``; the variance and covariance are those of the grid-snapped
scores (no bound is claimed for them). The display cells are binned from the raw scores, so the
decision curve at released edges is exact.

Release (what the server sees)
------------------------------
With ``k`` the agreed floor, only if the pooled ``n_pos >= k`` and ``n_neg >= k``; otherwise
nothing but ``withheld`` (the reason). Then, per column: ``auc``, DeLong ``lo``/``hi`` (normal
interval at ``alpha``, clipped to [0, 1] as pROC), ``var``, ``tie_bound``; ``n_pos``, ``n_neg``;
the DeLong covariance matrix ``cov`` (every pairwise DeLong test follows, see
:meth:`ROCRelease.delong`); and per column the **display cells**: the pooled class counts on the
display grid, adjacent cells merged (:func:`shared.stats.sc_common.released_cells`) until every
cell holds 0 or >= k positives and 0 or >= k negatives; edges are display-grid edges, never data
values. A merged cell's upper edge says that its last display bin is not empty (at display
resolution, not which patient or class). The fine histograms and the placement products never
leave the sites (secure aggregation gives them to sites only).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy import stats

from ._checks import check_min_count
from .histogram import Grid
from .results import AUCResult, DeLongResult
from .roc import delong_result
from .sc_common import (
    DISPLAY_BINS,
    MAX_COLUMNS,
    cells_payload,
    check_alpha,
    check_choice,
    check_columns,
    check_probabilities,
    class_hist,
    coarsened,
    column_of,
    display_bin,
    display_edges,
    fnan,
    fnum,
    net_benefit_from_cells,
    released_cells,
    withheld,
)
from .sitecomputed import COUNT_SPEC, SUM_SPEC, CohortData, Released, SiteComputedProtocol, State, Withheld

logger = logging.getLogger(__name__)

GRID_RESOLUTION = 1e-4


def placement_tables(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Placement value of each grid bin for each column, from pooled class histograms.

    Parameters
    ----------
    hist : ndarray of shape (m, 2, n_bins)
        Pooled counts: ``hist[:, 0]`` negatives, ``hist[:, 1]`` positives.

    Returns
    -------
    v10 : ndarray of shape (m, n_bins)
        For a positive in bin b: fraction of negatives below it, same-bin negatives half.
    v01 : ndarray of shape (m, n_bins)
        For a negative in bin b: fraction of positives above it, same-bin positives half.
    """
    c0 = hist[:, 0, :].astype(np.float64)
    c1 = hist[:, 1, :].astype(np.float64)
    n0 = c0.sum(axis=1, keepdims=True)
    n1 = c1.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        v10 = (np.cumsum(c0, axis=1) - c0 + 0.5 * c0) / n0
        v01 = (n1 - np.cumsum(c1, axis=1) + 0.5 * c1) / n1
    return v10, v01


def normal_ci(auc: float, var: float, alpha: float) -> tuple[float, float]:
    """DeLong normal interval clipped to [0, 1] (pROC); NaN when the variance is undefined."""
    if not np.isfinite(var):
        return float("nan"), float("nan")
    half = stats.norm.ppf(1 - alpha / 2) * np.sqrt(max(var, 0.0))
    return float(max(auc - half, 0.0)), float(min(auc + half, 1.0))


@dataclass(frozen=True)
class ROCRelease:
    """What the server gets from :class:`ROCSite` (see the module docstring).

    Attributes
    ----------
    columns : tuple of str
    aucs : dict
        Column -> :class:`~shared.stats.results.AUCResult` (empty when withheld).
    cov : ndarray of shape (m, m)
        DeLong covariance of the AUCs (NaN when withheld).
    tie_bound : dict
        Column -> bound on ``|AUC - AUC on the raw scores|`` from same-bin pairs.
    curves : dict
        Column -> released display cells (``lo``, ``hi``, ``n_neg``, ``n_pos``).
    withheld : tuple of Withheld
    """

    columns: tuple[str, ...]
    aucs: dict[str, AUCResult]
    cov: np.ndarray
    tie_bound: dict[str, float]
    curves: dict[str, dict[str, list]]
    alpha: float
    withheld: tuple[Withheld, ...] = field(default_factory=tuple)

    @property
    def released(self) -> bool:
        return bool(self.aucs)

    def delong(self, a: str, b: str) -> DeLongResult:
        """Paired DeLong test of column ``a`` against ``b`` (pROC ``roc.test``), from the release."""
        if not self.released:
            raise ValueError("the ROC analysis was withheld: " + "; ".join(w.reason for w in self.withheld))
        i, j = self.columns.index(a), self.columns.index(b)
        auc = np.array([self.aucs[a].auc, self.aucs[b].auc])
        return delong_result(auc, self.cov[np.ix_([i, j], [i, j])], self.alpha)

    def net_benefit(self, column: str) -> pd.DataFrame:
        """Decision curve of ``column`` at the released display-cell edges."""
        if column not in self.curves:
            raise ValueError(f"no released curve for {column!r}")
        return net_benefit_from_cells(self.curves[column])


class ROCSite(SiteComputedProtocol):
    """AUC, DeLong CI/variance/covariance and display cells of many score columns.

    Parameters
    ----------
    columns : list of str
        Score columns (probabilities in [0, 1]; higher = more likely positive), 1 to 32.
    alpha : float
        1 - confidence level, in (0, 0.5).
    display_bins : int
        Equal display bins on [0, 1], one of :data:`~shared.stats.sc_common.DISPLAY_BINS`.
    """

    name: ClassVar[str] = "roc"
    max_rounds: ClassVar[int] = 2

    def __init__(self, columns: Sequence[str], alpha: float = 0.05, display_bins: int = 20) -> None:
        super().__init__()
        cols = check_columns("columns", columns, MAX_COLUMNS)
        self._keep(columns=cols, alpha=check_alpha(alpha),
                   display_bins=int(check_choice("display_bins", display_bins, DISPLAY_BINS)))
        self.columns = tuple(cols)
        self.alpha = float(self.params["alpha"])
        self.display_bins = int(self.params["display_bins"])
        self.grid = Grid.probability(GRID_RESOLUTION)

    # -- site side -------------------------------------------------------------------------------
    def _bins(self, data: CohortData) -> tuple[np.ndarray, np.ndarray]:
        """Fine-grid and display-grid bins, shape (m, n) each."""
        fine, disp = [], []
        for c in self.columns:
            s = check_probabilities(column_of(data, c), c)
            fine.append(self.grid.bin(s, c))
            disp.append(display_bin(s, self.display_bins))
        n = data.n
        return (np.array(fine, dtype=np.int64).reshape(len(self.columns), n),
                np.array(disp, dtype=np.int64).reshape(len(self.columns), n))

    def layout(self, state: State) -> dict[str, dict[str, Any]]:
        m = len(self.columns)
        if state["round"] == 0:
            return {
                "hist": {"shape": (m, 2, self.grid.n_bins), **COUNT_SPEC},
                "display": {"shape": (m, 2, self.display_bins), **COUNT_SPEC},
                "n": {"shape": (2,), **COUNT_SPEC},
            }
        return {"ss10": {"shape": (m, m), **SUM_SPEC}, "ss01": {"shape": (m, m), **SUM_SPEC}}

    def local(self, data: CohortData, state: State) -> dict[str, np.ndarray]:
        y = data.y
        fine, disp = self._bins(data)
        if state["round"] == 0:
            nb, nd = self.grid.n_bins, self.display_bins
            return {
                "hist": np.stack([class_hist(b, y, nb).T for b in fine]),
                "display": np.stack([class_hist(b, y, nd).T for b in disp]),
                "n": np.array([(y == 0).sum(), (y == 1).sum()], dtype=np.float64),
            }
        v10, v01 = placement_tables(np.asarray(state["hist"]))
        rows = np.arange(len(self.columns))[:, None]
        p10 = v10[rows, fine[:, y == 1]].T  # (n_pos_site, m)
        p01 = v01[rows, fine[:, y == 0]].T
        return {"ss10": p10.T @ p10, "ss01": p01.T @ p01}

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        if state["round"] == 0:
            hist = np.rint(np.asarray(totals["hist"])).astype(np.int64)
            n = np.rint(np.asarray(totals["n"])).astype(np.int64)
            n0, n1 = int(n[0]), int(n[1])
            new: State = {"round": 1, "hist": hist,
                          "display": np.rint(np.asarray(totals["display"])).astype(np.int64),
                          "n_neg": n0, "n_pos": n1}
            if n0 == 0 or n1 == 0:
                return new, True
            v10, v01 = placement_tables(hist)
            c0, c1 = hist[:, 0, :].astype(np.float64), hist[:, 1, :].astype(np.float64)
            new["s10"] = (c1 * v10).sum(axis=1)
            new["s01"] = (c0 * v01).sum(axis=1)
            new["ss10_diag"] = (c1 * v10**2).sum(axis=1)
            new["ss01_diag"] = (c0 * v01**2).sum(axis=1)
            new["tie_pairs"] = (c1 * c0).sum(axis=1)
            return new, len(self.columns) == 1
        new = dict(state)
        new["round"] = 2
        new["ss10"] = np.asarray(totals["ss10"], dtype=np.float64)
        new["ss01"] = np.asarray(totals["ss01"], dtype=np.float64)
        return new, True

    def _moments(self, state: State) -> tuple[np.ndarray, np.ndarray]:
        """AUCs and the DeLong covariance matrix from the state."""
        n1, n0 = state["n_pos"], state["n_neg"]
        m = len(self.columns)
        s10, s01 = np.asarray(state["s10"]), np.asarray(state["s01"])
        ss10 = np.array(state["ss10"], dtype=np.float64) if "ss10" in state else np.zeros((m, m))
        ss01 = np.array(state["ss01"], dtype=np.float64) if "ss01" in state else np.zeros((m, m))
        # the diagonal from the exact round-1 sums (no second encoding)
        ss10[np.diag_indices(m)] = state["ss10_diag"]
        ss01[np.diag_indices(m)] = state["ss01_diag"]
        m10, m01 = s10 / n1, s01 / n0
        auc = (m10 + m01) / 2
        if n1 < 2 or n0 < 2:
            return auc, np.full((m, m), np.nan)
        c10 = (ss10 - n1 * np.outer(m10, m10)) / (n1 - 1)
        c01 = (ss01 - n0 * np.outer(m01, m01)) / (n0 - 1)
        cov = c10 / n1 + c01 / n0
        return auc, (cov + cov.T) / 2

    def release(self, state: State, min_count: int) -> Released:
        k = check_min_count(min_count)
        n1, n0 = int(state["n_pos"]), int(state["n_neg"])
        out: Released = {"protocol": self.name, "columns": list(self.columns), "alpha": self.alpha,
                         "display_bins": self.display_bins, "grid_resolution": GRID_RESOLUTION}
        if n1 < k or n0 < k:
            return {**out, "released": False, "withheld": [withheld(
                "roc", f"the cohort has fewer than k={k} positives or negatives; AUC, CI, curve withheld")]}
        auc, cov = self._moments(state)
        var = np.diag(cov)
        ci = [normal_ci(float(a), float(v), self.alpha) for a, v in zip(auc, var, strict=True)]
        tie = np.asarray(state["tie_pairs"]) * 0.5 / (n1 * n0)
        edges = display_edges(self.display_bins)
        curves, notes = {}, []
        for i, c in enumerate(self.columns):
            counts = np.asarray(state["display"])[i].T  # (display_bins, 2)
            ranges = released_cells(counts, k)
            assert ranges is not None  # class totals are >= k here
            curves[c] = cells_payload(counts, ranges, edges)
            if coarsened(counts, ranges):
                notes.append(withheld(f"curve.{c}", f"display cells merged so each holds 0 or >= k={k} "
                                                    "positives and negatives"))
        return {
            **out, "released": True, "n_pos": n1, "n_neg": n0,
            "auc": [fnum(a) for a in auc], "lo": [fnum(a) for a, _ in ci], "hi": [fnum(b) for _, b in ci],
            "var": [fnum(v) for v in var], "tie_bound": [fnum(t) for t in tie],
            "cov": [[fnum(v) for v in row] for row in cov], "curves": curves, "withheld": notes,
        }

    def result(self, released: Released) -> ROCRelease:
        cols = tuple(released["columns"])
        wh = tuple(Withheld(w["quantity"], w["reason"]) for w in released.get("withheld", []))
        alpha = float(released["alpha"])
        if not released.get("released"):
            return ROCRelease(cols, {}, np.full((len(cols), len(cols)), np.nan), {}, {}, alpha, wh)
        aucs = {
            c: AUCResult(fnan(released["auc"][i]), fnan(released["lo"][i]), fnan(released["hi"][i]),
                         fnan(released["var"][i]), int(released["n_pos"]), int(released["n_neg"]), alpha, "delong")
            for i, c in enumerate(cols)
        }
        cov = np.array([[fnan(v) for v in row] for row in released["cov"]], dtype=np.float64)
        tie = {c: fnan(released["tie_bound"][i]) for i, c in enumerate(cols)}
        return ROCRelease(cols, aucs, cov, tie, dict(released["curves"]), alpha, wh)
