"""Pooled classification metrics: confusion-matrix metrics, calibration, decision curves.

Conventions: a patient is predicted positive when ``prob >= threshold`` (as dcurves'
``test_consequences``); net benefit ``= TP/n - FP/n * t / (1 - t)`` (Vickers & Elkin 2006, dcurves
``dca``); calibration bins are equal-width on [0, 1] (bin ``b`` is ``[b/n_bins, (b+1)/n_bins)``,
the last one closed); calibration slope/intercept are logistic recalibration fits on
``logit(prob)`` with ``prob`` clipped to ``[1e-12, 1 - 1e-12]``.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy import special

from ._checks import as_binary, as_probabilities, as_scores
from .logistic import fit
from .results import BinaryMetrics, CalibrationResult

logger = logging.getLogger(__name__)

EPS = 1e-12
CONST_REL_VAR = 1e-12


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def metrics_from_counts(tp: int, fp: int, tn: int, fn: int, threshold: float) -> BinaryMetrics:
    """:class:`BinaryMetrics` from the four confusion counts."""
    n = tp + fp + tn + fn
    return BinaryMetrics(
        accuracy=_ratio(tp + tn, n), sensitivity=_ratio(tp, tp + fn), specificity=_ratio(tn, tn + fp),
        f1=_ratio(2 * tp, 2 * tp + fp + fn), ppv=_ratio(tp, tp + fp), npv=_ratio(tn, tn + fn),
        tp=int(tp), fp=int(fp), tn=int(tn), fn=int(fn), threshold=float(threshold),
    )


def confusion_counts(y: np.ndarray, prob: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """``(tp, fp, tn, fn)`` with positive prediction ``prob >= threshold``."""
    pred = prob >= threshold
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    return tp, fp, int((y == 0).sum()) - fp, int((y == 1).sum()) - tp


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> BinaryMetrics:
    """Accuracy, sensitivity, specificity, F1, PPV, NPV and the confusion counts.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
    prob : array-like of shape (n_samples,)
        Score or probability; positive prediction when ``prob >= threshold``.
    threshold : float

    Returns
    -------
    BinaryMetrics
        Ratios with a zero denominator are NaN.
    """
    y = as_binary(y_true)
    p = as_scores(prob, y.size, "prob")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return metrics_from_counts(*confusion_counts(y, p, threshold), threshold)


def calibration_bin_index(prob: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each probability, shape (n,), values in [0, n_bins)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, n_bins - 1)


def calibration_table(count: np.ndarray, sum_p: np.ndarray, sum_y: np.ndarray) -> tuple[pd.DataFrame, float]:
    """Bins DataFrame and ECE from per-bin sums (each of shape (n_bins,))."""
    n_bins = count.size
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mp = np.where(count > 0, sum_p / count, np.nan)
        obs = np.where(count > 0, sum_y / count, np.nan)
    total = count.sum()
    nz = count > 0
    ece = float((count[nz] / total * np.abs(mp[nz] - obs[nz])).sum()) if total else float("nan")
    bins = pd.DataFrame({"bin_lo": edges[:-1], "bin_hi": edges[1:], "count": count.astype(np.int64),
                         "mean_predicted": mp, "observed_rate": obs})
    return bins, ece


def logit_clipped(prob: np.ndarray) -> np.ndarray:
    return special.logit(np.clip(prob, EPS, 1.0 - EPS))


def is_constant(n: int, s: float, ss: float) -> bool:
    """True when values with sum ``s`` and sum of squares ``ss`` have (numerically) zero variance."""
    m = s / n
    return bool(ss / n - m * m <= CONST_REL_VAR * (1.0 + m * m))


def calibration(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> CalibrationResult:
    """Binned reliability table, Brier score, ECE, calibration slope and intercept.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
    prob : array-like of shape (n_samples,)
        Predicted probabilities in [0, 1].
    n_bins : int
        Equal-width bins on [0, 1].

    Returns
    -------
    CalibrationResult
        ``slope`` and ``slope_model_intercept`` are NaN when all probabilities are equal
        (the slope is then not identifiable).
    """
    y = as_binary(y_true)
    p = as_probabilities(prob, y.size)
    if y.size == 0:
        raise ValueError("y_true is empty")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    b = calibration_bin_index(p, n_bins)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    bins, ece = calibration_table(count, np.bincount(b, p, n_bins), np.bincount(b, y, n_bins))
    yf = y.astype(np.float64)
    lg = logit_clipped(p)
    if y.sum() in (0, y.size):
        raise ValueError("y_true has a single class; calibration slope and intercept are undefined")
    citl = fit(np.ones((y.size, 1)), yf, ["intercept"], offset=lg).beta[0]
    if is_constant(y.size, float(lg.sum()), float(lg @ lg)):
        logger.warning("all predicted probabilities are equal; calibration slope is NaN")
        a, s = float("nan"), float("nan")
    else:
        a, s = fit(np.column_stack([np.ones(y.size), lg]), yf, ["intercept", "logit_p"]).beta
    return CalibrationResult(bins, float(np.mean((p - yf) ** 2)), ece, float(s), float(citl), float(a))


def check_thresholds(thresholds: np.ndarray) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64).ravel()
    if t.size == 0 or not np.isfinite(t).all() or t.min() < 0 or t.max() >= 1:
        raise ValueError("thresholds must be a non-empty array of values in [0, 1)")
    return t


def net_benefit_frame(t: np.ndarray, tp: np.ndarray, fp: np.ndarray, n: int, n_pos: int) -> pd.DataFrame:
    """Decision-curve DataFrame from counts at each threshold (each of shape (m,))."""
    w = t / (1 - t)
    prev = n_pos / n
    return pd.DataFrame({"threshold": t, "model": tp / n - fp / n * w,
                         "treat_all": prev - (1 - prev) * w, "treat_none": np.zeros_like(t)})


def net_benefit(y_true: np.ndarray, prob: np.ndarray, thresholds: np.ndarray) -> pd.DataFrame:
    """Net benefit of the model, of treating all and of treating none (decision curve analysis).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
    prob : array-like of shape (n_samples,)
        Predicted risks in [0, 1]; treat when ``prob >= threshold``.
    thresholds : array-like of shape (m,)
        Threshold probabilities in [0, 1).

    Returns
    -------
    DataFrame of shape (m, 4)
        Columns ``threshold, model, treat_all, treat_none``.
    """
    y = as_binary(y_true)
    p = as_probabilities(prob, y.size)
    if y.size == 0:
        raise ValueError("y_true is empty")
    t = check_thresholds(thresholds)
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    tp = pos.size - np.searchsorted(pos, t, side="left")
    fp = neg.size - np.searchsorted(neg, t, side="left")
    return net_benefit_frame(t, tp.astype(np.float64), fp.astype(np.float64), y.size, pos.size)
