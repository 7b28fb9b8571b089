"""Site-computed threshold metrics, calibration and decision curves.

Every protocol here reads one probability column of the cohort's fixed patient set and releases
nothing unless the pooled cohort has at least ``k`` positives and ``k`` negatives (``k``: the
agreed floor); otherwise the release holds only ``withheld`` with the reason.

:class:`ThresholdMetricsSite` (one round)
    Params: ``column``; ``threshold``, a multiple of 0.01 in (0, 1) (validated: a server cannot
    probe arbitrary thresholds). Each site adds its confusion counts ``tp, fp, tn, fn``
    (positive prediction when ``prob >= threshold``, as :func:`shared.stats.binary_metrics`).

    Release rule. The class totals ``n_pos = tp + fn`` and ``n_neg = fp + tn`` are published
    anyway (cohort summary, ROC), so each class row is released *with its total preserved*: a
    row whose two cells are both 0 or >= k is exact; otherwise its small cell ``s`` (``0 < s < k``;
    the smaller if both are) is rounded to the nearer of 0 and ``k`` (``n_c`` instead of ``k``
    when ``n_c < 2k``, since the other cell must stay 0 or >= k too), half up (``s >= k/2`` -> ``k``),
    and the other cell becomes ``n_c - s'``. Rounding each cell independently to base ``k`` would
    not do: with the exact total, e.g. ``n_pos = 14, fn = 2, k = 5`` gives ``tp = 12 -> 10`` and
    ``fn -> 0``, and ``fn = 14 - tp`` with ``tp in [7.5, 12.5)`` and ``fn in [0, 2.5)`` pins ``fn = 2``.
    Under the row rule every released row is consistent with at least two values of a small
    cell (tested). Metrics are computed from the released cells; the release then says
    ``approx: true`` with a ``withheld`` entry "cells below k rounded to base k" (like any
    suppression marker, the flag itself says that some cell held 1 to k-1 patients, not which
    value). Exact releases equal :func:`shared.stats.binary_metrics`. Released: ``tp, fp, tn, fn``
    (as released), accuracy, sensitivity, specificity, F1, PPV, NPV, ``approx``.

    Known limit: thresholds are on a 0.01 grid, so 99 queries of one column give the pooled class
    counts per 0.01 bin by differencing (not which patient has which score). The site's query
    budget (policy) bounds this; report thresholds should be fixed in the analysis config.

:class:`CalibrationSite` (1 + Newton rounds)
    Params: ``column``, ``n_bins`` (one of 5, 10, 20 equal bins on [0, 1]), ``max_iter`` (<= 100),
    ``tol``. Round 1: per bin and class the counts, per bin the sum of probabilities, the Brier
    sum and ``sum logit(p)``, ``sum logit(p)^2`` (to detect constant predictions); from round 1 on,
    the Newton terms (score, information, log-likelihood) of the two recalibration models
    ``y ~ a + b logit(p)`` (slope) and ``y ~ 1 + offset(logit(p))`` (calibration-in-the-large),
    at the iterates every site derives from the previous totals (:mod:`shared.stats.sc_newton`).
    Release: ``n``, ``n_pos``, Brier score, calibration slope, its model's intercept and the
    calibration-in-the-large intercept (each None unless its fit converged) with each fit's
    ``converged``/``iterations``/``grad_norm``/``reason``; the reliability curve and ECE from the
    calibration bins merged until every merged bin holds 0 or >= k positives and 0 or >= k
    negatives (grid edges only; per merged bin: ``lo``, ``hi``, ``n_neg``, ``n_pos`` and the sum
    of predicted probabilities, i.e. the mean predicted risk over its >= k patients). A slope
    beyond 50 is taken as separation (the fit fails instead of running to ``max_iter``). Without
    merging everything equals :func:`shared.stats.calibration`. The Newton sums are encoded with
    2**-32 resolution up to 2**24 per site: up to ~88 000 patients per site (information entries
    reach 190 per patient at clipped probabilities).

:class:`NetBenefitSite` (one round)
    Params: ``column``, ``display_bins`` (one of :data:`~shared.stats.sc_common.DISPLAY_BINS`).
    Each site adds its class counts on the display grid; the release is the merged display cells
    (0 or >= k per class) and the decision curve at their lower edges, where it equals
    :func:`shared.stats.net_benefit` exactly. The ROC release carries the same cells per column
    (:meth:`shared.stats.sc_roc.ROCRelease.net_benefit`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ._checks import check_min_count
from .classification import calibration_bin_index, is_constant, logit_clipped, metrics_from_counts
from .results import BinaryMetrics, CalibrationResult
from .sc_common import (
    CALIBRATION_BINS,
    DISPLAY_BINS,
    MAX_ITER_LIMIT,
    cells_payload,
    check_choice,
    check_column,
    check_float,
    check_int,
    check_percent_threshold,
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
from .sc_newton import beta as fit_beta
from .sc_newton import (
    convergence,
    is_active,
    local_terms,
    new_fit,
    prefixed,
    term_layout,
    update,
)
from .sitecomputed import COUNT_SPEC, SUM_SPEC, CohortData, Released, SiteComputedProtocol, State, Withheld

logger = logging.getLogger(__name__)

#: A calibration slope beyond this is taken as separation (logit(p) orders the outcome perfectly).
SLOPE_LIMIT = 50.0
#: Encoding of sums of logit(p) (|logit| <= 27.7 after clipping) and their squares.
LOGIT_SPEC = {"bound": float(2**34), "frac_bits": 20}


def _withheld_small(k: int, what: str) -> dict[str, str]:
    return withheld(what, f"the cohort has fewer than k={k} positives or negatives; withheld")


def _results_withheld(released: Released) -> tuple[Withheld, ...]:
    return tuple(Withheld(w["quantity"], w["reason"]) for w in released.get("withheld", []))


# -- threshold metrics -------------------------------------------------------------------------
def round_row(a: int, n_c: int, k: int) -> int:
    """Released predicted-positive count of a class row ``(a, n_c - a)`` (see the module docstring).

    Parameters
    ----------
    a : int
        Predicted-positive count of the class (tp or fp).
    n_c : int
        The class total (>= k).
    k : int

    Returns
    -------
    int
        ``a`` when both cells are 0 or >= k; else the row rounded so both are, total kept.
    """
    b = n_c - a

    def ok(c: int) -> bool:
        return c == 0 or c >= k

    if ok(a) and ok(b):
        return a
    small_is_a = (not ok(a)) and (ok(b) or a <= b)
    s = a if small_is_a else b
    hi = k if n_c >= 2 * k else n_c
    s_r = hi if s - 0 >= hi - s else 0
    return s_r if small_is_a else n_c - s_r


@dataclass(frozen=True)
class ThresholdMetrics:
    """Release of :class:`ThresholdMetricsSite`: metrics (None when withheld), approx flag, reasons."""

    column: str
    threshold: float
    metrics: BinaryMetrics | None
    approx: bool
    withheld: tuple[Withheld, ...] = field(default_factory=tuple)


class ThresholdMetricsSite(SiteComputedProtocol):
    """Accuracy, sensitivity, specificity, F1, PPV, NPV at a 0.01-grid threshold (see module docstring).

    Parameters
    ----------
    column : str
    threshold : float
        A multiple of 0.01 in (0, 1).
    """

    name: ClassVar[str] = "threshold_metrics"
    max_rounds: ClassVar[int] = 1

    def __init__(self, column: str, threshold: float = 0.5) -> None:
        super().__init__()
        self._keep(column=check_column("column", column), threshold=check_percent_threshold(threshold))
        self.column = self.params["column"]
        self.threshold = float(self.params["threshold"])

    def layout(self, state: State) -> dict[str, dict[str, Any]]:
        return {"counts": {"shape": (4,), **COUNT_SPEC}}

    def local(self, data: CohortData, state: State) -> dict[str, np.ndarray]:
        p = check_probabilities(column_of(data, self.column), self.column)
        pred = p >= self.threshold
        y = data.y
        tp = int((pred & (y == 1)).sum())
        fp = int((pred & (y == 0)).sum())
        return {"counts": np.array([tp, fp, int((y == 0).sum()) - fp, int((y == 1).sum()) - tp], np.float64)}

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        c = np.rint(np.asarray(totals["counts"])).astype(np.int64)
        return {"round": 1, "tp": int(c[0]), "fp": int(c[1]), "tn": int(c[2]), "fn": int(c[3])}, True

    def release(self, state: State, min_count: int) -> Released:
        k = check_min_count(min_count)
        tp, fp, tn, fn = (int(state[x]) for x in ("tp", "fp", "tn", "fn"))
        out: Released = {"protocol": self.name, "column": self.column, "threshold": self.threshold}
        n1, n0 = tp + fn, fp + tn
        if n1 < k or n0 < k:
            return {**out, "released": False, "approx": False,
                    "withheld": [_withheld_small(k, "threshold_metrics")]}
        tp_r = round_row(tp, n1, k)
        fp_r = round_row(fp, n0, k)
        approx = (tp_r, fp_r) != (tp, fp)
        m = metrics_from_counts(tp_r, fp_r, n0 - fp_r, n1 - tp_r, self.threshold)
        notes = [withheld("threshold_metrics.cells", f"cells below k={k} rounded to base k (class totals kept); "
                                                     "metrics computed from the rounded cells")] if approx else []
        return {**out, "released": True, "approx": approx, "tp": m.tp, "fp": m.fp, "tn": m.tn, "fn": m.fn,
                "accuracy": fnum(m.accuracy), "sensitivity": fnum(m.sensitivity),
                "specificity": fnum(m.specificity), "f1": fnum(m.f1), "ppv": fnum(m.ppv), "npv": fnum(m.npv),
                "withheld": notes}

    def result(self, released: Released) -> ThresholdMetrics:
        wh = _results_withheld(released)
        if not released.get("released"):
            return ThresholdMetrics(released["column"], float(released["threshold"]), None, False, wh)
        m = BinaryMetrics(
            fnan(released["accuracy"]), fnan(released["sensitivity"]), fnan(released["specificity"]),
            fnan(released["f1"]), fnan(released["ppv"]), fnan(released["npv"]), int(released["tp"]),
            int(released["fp"]), int(released["tn"]), int(released["fn"]), float(released["threshold"]))
        return ThresholdMetrics(released["column"], float(released["threshold"]), m, bool(released["approx"]), wh)


# -- calibration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationRelease:
    """Release of :class:`CalibrationSite`.

    Attributes
    ----------
    result : CalibrationResult or None
        ``bins`` are the released (possibly merged) bins with an extra ``n_pos`` column; None when
        withheld.
    fits : dict
        ``"slope"`` and ``"citl"`` -> convergence record (method, converged, iterations,
        grad_norm, reason).
    merged : bool
        True when calibration bins were merged for disclosure control (ECE then differs from the
        unmerged one).
    """

    column: str
    result: CalibrationResult | None
    fits: dict[str, dict[str, Any]]
    merged: bool
    withheld: tuple[Withheld, ...] = field(default_factory=tuple)


class CalibrationSite(SiteComputedProtocol):
    """Reliability curve, ECE, Brier score, calibration slope and intercepts (see module docstring).

    Parameters
    ----------
    column : str
    n_bins : int
        One of 5, 10, 20.
    max_iter : int
        Newton evaluations per fit, 1 to 100.
    tol : float
        Newton convergence tolerance on the step, in [1e-12, 1e-4].
    """

    name: ClassVar[str] = "calibration"

    def __init__(self, column: str, n_bins: int = 10, max_iter: int = 100, tol: float = 1e-8) -> None:
        super().__init__()
        self._keep(column=check_column("column", column),
                   n_bins=int(check_choice("n_bins", n_bins, CALIBRATION_BINS)),
                   max_iter=check_int("max_iter", max_iter, 1, MAX_ITER_LIMIT),
                   tol=check_float("tol", tol, 1e-12, 1e-4, open_lo=False, open_hi=False))
        self.column = self.params["column"]
        self.n_bins = int(self.params["n_bins"])
        self.max_iter = int(self.params["max_iter"])
        self.tol = float(self.params["tol"])
        self.max_rounds = 2 + self.max_iter  # type: ignore[misc]

    def init_state(self) -> State:
        state: State = {"round": 0}
        new_fit(state, "slope", 2, max_iter=self.max_iter, tol=self.tol, sep_limit=SLOPE_LIMIT)
        new_fit(state, "citl", 1, max_iter=self.max_iter, tol=self.tol)
        return state

    def layout(self, state: State) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if state["round"] == 0:
            out.update({
                "count": {"shape": (self.n_bins, 2), **COUNT_SPEC},
                "sum_p": {"shape": (self.n_bins,), **SUM_SPEC},
                "brier": {"shape": (1,), **SUM_SPEC},
                "logit": {"shape": (2,), **LOGIT_SPEC},
            })
        for fid, p in (("slope", 2), ("citl", 1)):
            if is_active(state, fid):
                out.update(term_layout(fid, p, firth=False))
        return out

    def local(self, data: CohortData, state: State) -> dict[str, np.ndarray]:
        p = check_probabilities(column_of(data, self.column), self.column)
        y = data.y
        lg = logit_clipped(p)
        ones = np.ones((p.size, 1))
        out: dict[str, np.ndarray] = {}
        if state["round"] == 0:
            b = calibration_bin_index(p, self.n_bins)
            out.update({
                "count": class_hist(b, y, self.n_bins),
                "sum_p": np.bincount(b, weights=p, minlength=self.n_bins),
                "brier": np.array([float(((p - y) ** 2).sum())]),
                "logit": np.array([lg.sum(), lg @ lg]),
            })
        if is_active(state, "slope"):
            out.update(prefixed("slope", local_terms(np.column_stack([ones, lg]), y, fit_beta(state, "slope"),
                                                     firth=False)))
        if is_active(state, "citl"):
            out.update(prefixed("citl", local_terms(ones, y, fit_beta(state, "citl"), firth=False, offset=lg)))
        return out

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        new = dict(state)
        if state["round"] == 0:
            count = np.rint(np.asarray(totals["count"])).astype(np.int64)
            new.update(count=count, sum_p=np.asarray(totals["sum_p"], dtype=np.float64),
                       brier=float(np.asarray(totals["brier"])[0]))
            n, n1 = int(count.sum()), int(count[:, 1].sum())
            s, ss = (float(v) for v in np.asarray(totals["logit"]))
            single = n1 in (0, n)
            if single:
                for fid in ("slope", "citl"):
                    new[fid] = {**new[fid], "status": "failed", "reason": "a single outcome class"}
            elif is_constant(n, s, ss):
                new["slope"] = {**new["slope"], "status": "failed",
                                "reason": "all predicted probabilities are equal; the slope is not identifiable"}
        for fid in ("slope", "citl"):
            if is_active(state, fid) and is_active(new, fid):
                update(new, fid, {k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith(fid + ".")})
        new["round"] = int(state["round"]) + 1
        return new, not (is_active(new, "slope") or is_active(new, "citl"))

    def release(self, state: State, min_count: int) -> Released:
        k = check_min_count(min_count)
        count = np.asarray(state["count"], dtype=np.int64)
        n, n1 = int(count.sum()), int(count[:, 1].sum())
        out: Released = {"protocol": self.name, "column": self.column, "n_bins": self.n_bins}
        fits = {fid: convergence(state, fid) for fid in ("slope", "citl")}
        if n1 < k or n - n1 < k:
            return {**out, "released": False, "withheld": [_withheld_small(k, "calibration")]}
        ranges = released_cells(count, k)
        assert ranges is not None
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        cells = cells_payload(count, ranges, edges)
        sum_p = np.asarray(state["sum_p"], dtype=np.float64)
        cells["sum_p"] = [float(sum_p[s:t].sum()) for s, t in ranges]
        merged = coarsened(count, ranges)
        notes = [withheld("calibration.bins", f"calibration bins merged so each holds 0 or >= k={k} positives "
                                              "and negatives (ECE and curve from the merged bins)")] if merged else []
        slope = fit_beta(state, "slope")
        citl = fit_beta(state, "citl")
        ok_s, ok_c = fits["slope"]["converged"], fits["citl"]["converged"]
        for fid, ok in (("slope", ok_s), ("citl", ok_c)):
            if not ok:
                notes.append(withheld(f"calibration.{fid}", f"fit did not converge: {fits[fid]['reason']}"))
        return {**out, "released": True, "n": n, "n_pos": n1, "brier": fnum(state["brier"] / n),
                "slope": fnum(slope[1]) if ok_s else None, "slope_model_intercept": fnum(slope[0]) if ok_s else None,
                "intercept": fnum(citl[0]) if ok_c else None, "fits": fits, "bins": cells, "merged": merged,
                "withheld": notes}

    def result(self, released: Released) -> CalibrationRelease:
        wh = _results_withheld(released)
        if not released.get("released"):
            return CalibrationRelease(released["column"], None, {}, False, wh)
        c = released["bins"]
        count = np.asarray(c["n_neg"], np.float64) + np.asarray(c["n_pos"], np.float64)
        pos = np.asarray(c["n_pos"], np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mp = np.where(count > 0, np.asarray(c["sum_p"]) / count, np.nan)
            obs = np.where(count > 0, pos / count, np.nan)
        nz = count > 0
        ece = float((count[nz] / count.sum() * np.abs(mp[nz] - obs[nz])).sum())
        bins = pd.DataFrame({"bin_lo": c["lo"], "bin_hi": c["hi"], "count": count.astype(np.int64),
                             "mean_predicted": mp, "observed_rate": obs, "n_pos": pos.astype(np.int64)})
        res = CalibrationResult(bins, fnan(released["brier"]), ece, fnan(released["slope"]),
                                fnan(released["intercept"]), fnan(released["slope_model_intercept"]))
        return CalibrationRelease(released["column"], res, dict(released["fits"]), bool(released["merged"]), wh)


# -- decision curve ----------------------------------------------------------------------------
@dataclass(frozen=True)
class NetBenefitRelease:
    """Release of :class:`NetBenefitSite`: the decision curve at released edges and the cells."""

    column: str
    curve: pd.DataFrame | None
    cells: dict[str, list] | None
    withheld: tuple[Withheld, ...] = field(default_factory=tuple)


class NetBenefitSite(SiteComputedProtocol):
    """Decision curve from merged display cells (see module docstring).

    Parameters
    ----------
    column : str
    display_bins : int
        One of :data:`~shared.stats.sc_common.DISPLAY_BINS`.
    """

    name: ClassVar[str] = "net_benefit"
    max_rounds: ClassVar[int] = 1

    def __init__(self, column: str, display_bins: int = 100) -> None:
        super().__init__()
        self._keep(column=check_column("column", column),
                   display_bins=int(check_choice("display_bins", display_bins, DISPLAY_BINS)))
        self.column = self.params["column"]
        self.display_bins = int(self.params["display_bins"])

    def layout(self, state: State) -> dict[str, dict[str, Any]]:
        return {"counts": {"shape": (self.display_bins, 2), **COUNT_SPEC}}

    def local(self, data: CohortData, state: State) -> dict[str, np.ndarray]:
        p = check_probabilities(column_of(data, self.column), self.column)
        return {"counts": class_hist(display_bin(p, self.display_bins), data.y, self.display_bins)}

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        return {"round": 1, "counts": np.rint(np.asarray(totals["counts"])).astype(np.int64)}, True

    def release(self, state: State, min_count: int) -> Released:
        k = check_min_count(min_count)
        counts = np.asarray(state["counts"], dtype=np.int64)
        out: Released = {"protocol": self.name, "column": self.column, "display_bins": self.display_bins}
        if counts[:, 1].sum() < k or counts[:, 0].sum() < k:
            return {**out, "released": False, "withheld": [_withheld_small(k, "net_benefit")]}
        ranges = released_cells(counts, k)
        assert ranges is not None
        cells = cells_payload(counts, ranges, display_edges(self.display_bins))
        nb = net_benefit_from_cells(cells)
        notes = [withheld("net_benefit.cells", f"display cells merged so each holds 0 or >= k={k} positives and "
                                               "negatives; net benefit given at merged-cell edges only")] \
            if coarsened(counts, ranges) else []
        return {**out, "released": True, "cells": cells,
                "curve": {c: [fnum(v) for v in nb[c]] for c in nb.columns}, "withheld": notes}

    def result(self, released: Released) -> NetBenefitRelease:
        wh = _results_withheld(released)
        if not released.get("released"):
            return NetBenefitRelease(released["column"], None, None, wh)
        curve = pd.DataFrame({c: [fnan(v) for v in vals] for c, vals in released["curve"].items()})
        return NetBenefitRelease(released["column"], curve, dict(released["cells"]), wh)
