"""Pooled ROC statistics: AUC with DeLong or bootstrap CI, paired DeLong test, Youden threshold.

These are the reference implementations the federated protocols must reproduce. They follow R's
pROC (Robin et al. 2011): AUC = P(positive score > negative score) with ties counted half,
DeLong placement values, ``var = S10/n_pos + S01/n_neg`` with ``n - 1`` denominators, CI clipped
to [0, 1]; ``roc.test``'s paired DeLong statistic. Unlike pROC, no direction is guessed: a
higher score must mean "more likely positive".
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import stats

from ._checks import as_binary, as_scores, check_alpha
from .histogram import Cells
from .results import AUCResult, DeLongResult, YoudenResult

logger = logging.getLogger(__name__)

_BOOT_CHUNK = 64


def _classes(y_true: np.ndarray, *scores: np.ndarray, names: tuple[str, ...] = ("score",)):
    y = as_binary(y_true)
    out = [as_scores(s, y.size, n) for s, n in zip(scores, names, strict=True)]
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        absent = "positive" if n_pos == 0 else "negative"
        raise ValueError(f"y_true has no {absent} patient; the AUC is undefined")
    return y, out


def placements(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong placement values in O(n log n) (midranks, Sun & Xu 2014).

    Parameters
    ----------
    y : ndarray of shape (n,), 0/1
    score : ndarray of shape (n,)

    Returns
    -------
    v10 : ndarray of shape (n_pos,)
        For each positive, the fraction of negatives below it (ties half).
    v01 : ndarray of shape (n_neg,)
        For each negative, the fraction of positives above it (ties half).
    """
    pos, neg = score[y == 1], score[y == 0]
    n1, n0 = pos.size, neg.size
    r_all = stats.rankdata(np.concatenate([pos, neg]))
    v10 = (r_all[:n1] - stats.rankdata(pos)) / n0
    v01 = 1.0 - (r_all[n1:] - stats.rankdata(neg)) / n1
    return v10, v01


def delong_from_moments(
    n1: int, n0: int, s10: np.ndarray, s01: np.ndarray, ss10: np.ndarray, ss01: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix from placement-value sums.

    Parameters
    ----------
    n1, n0 : int
        Positives, negatives.
    s10 : ndarray of shape (m,)
        Sum over positives of the placement values of each of ``m`` scores.
    s01 : ndarray of shape (m,)
        Same over negatives.
    ss10, ss01 : ndarray of shape (m, m)
        Sums of products of placement values (over positives / negatives).

    Returns
    -------
    auc : ndarray of shape (m,)
        ``(mean v10 + mean v01) / 2`` (the two means are equal for exact placement values).
    cov : ndarray of shape (m, m)
        ``S10/n1 + S01/n0`` with ``S = (sum of products - n mean mean') / (n - 1)``; NaN when a
        class has fewer than two patients.
    """
    m10, m01 = s10 / n1, s01 / n0
    auc = (m10 + m01) / 2
    if n1 < 2 or n0 < 2:
        return auc, np.full((auc.size, auc.size), np.nan)
    c10 = (ss10 - n1 * np.outer(m10, m10)) / (n1 - 1)
    c01 = (ss01 - n0 * np.outer(m01, m01)) / (n0 - 1)
    return auc, c10 / n1 + c01 / n0


def _normal_ci(auc: float, var: float, alpha: float) -> tuple[float, float]:
    if not np.isfinite(var):
        return float("nan"), float("nan")
    half = stats.norm.ppf(1 - alpha / 2) * np.sqrt(max(var, 0.0))
    return float(max(auc - half, 0.0)), float(min(auc + half, 1.0))


def bootstrap_aucs(pos: Cells, neg: Cells, n_boot: int, seed: int | None) -> np.ndarray:
    """Stratified bootstrap AUCs from pooled cells (multinomial resampling of each class).

    Resampling ``n`` patients with replacement is the same as drawing multinomial counts over
    the distinct cells, which is how both the pooled and the federated functions draw, so with
    the same ``seed`` and the same cells (on-grid data, no merging) they return the same draws.
    Unresolved (overlapping-cell) pairs count half.

    Returns
    -------
    ndarray of shape (n_boot,)
    """
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    rng = np.random.default_rng(seed)
    n1, n0 = pos.n, neg.n
    p1, p0 = pos.count / n1, neg.count / n0
    o_stop = np.argsort(neg.stop, kind="stable")
    o_start = np.argsort(neg.start, kind="stable")
    i_below = np.searchsorted(neg.stop[o_stop], pos.start, side="right")
    i_start_lt = np.searchsorted(neg.start[o_start], pos.stop, side="left")
    out = np.empty(n_boot)
    for lo in range(0, n_boot, _BOOT_CHUNK):
        k = min(_BOOT_CHUNK, n_boot - lo)
        w1 = rng.multinomial(n1, p1, size=k).astype(np.float64)
        w0 = rng.multinomial(n0, p0, size=k).astype(np.float64)
        z = np.zeros((k, 1))
        cum_stop = np.concatenate([z, np.cumsum(w0[:, o_stop], axis=1)], axis=1)
        cum_start = np.concatenate([z, np.cumsum(w0[:, o_start], axis=1)], axis=1)
        below = cum_stop[:, i_below]
        above = n0 - cum_start[:, i_start_lt]
        overlap = n0 - below - above
        out[lo : lo + k] = (w1 * (below + 0.5 * overlap)).sum(axis=1) / (n1 * n0)
    return out


def rank_cells(y: np.ndarray, score: np.ndarray) -> tuple[Cells, Cells]:
    """Exact cells of the raw scores on the grid of their distinct values (bootstrap atoms)."""
    uniq = np.unique(score)
    bins = np.searchsorted(uniq, score)
    pos, _ = Cells.from_bins(bins[y == 1], uniq.size)
    neg, _ = Cells.from_bins(bins[y == 0], uniq.size)
    return pos, neg


def auc_ci(
    y_true: np.ndarray,
    score: np.ndarray,
    alpha: float = 0.05,
    method: str = "delong",
    n_boot: int = 2000,
    seed: int | None = None,
) -> AUCResult:
    """AUC with a DeLong or stratified-bootstrap confidence interval.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        0/1 outcome, 1 = positive.
    score : array-like of shape (n_samples,)
        Higher = more likely positive.
    alpha : float
        1 - confidence level.
    method : {"delong", "bootstrap"}
    n_boot, seed : int
        Bootstrap replicates and seed (``method="bootstrap"`` only); percentile interval.

    Returns
    -------
    AUCResult

    Raises
    ------
    ValueError
        If a class is absent, scores are NaN/infinite or lengths differ.
    """
    alpha = check_alpha(alpha)
    y, (s,) = _classes(y_true, score)
    v10, v01 = placements(y, s)
    n1, n0 = v10.size, v01.size
    auc, cov = delong_from_moments(
        n1, n0, np.array([v10.sum()]), np.array([v01.sum()]),
        np.array([[v10 @ v10]]), np.array([[v01 @ v01]]),
    )
    a = float(auc[0])
    if method == "delong":
        var = float(cov[0, 0])
        lo, hi = _normal_ci(a, var, alpha)
        return AUCResult(a, lo, hi, var, n1, n0, alpha, "delong")
    if method == "bootstrap":
        pos, neg = rank_cells(y, s)
        boots = bootstrap_aucs(pos, neg, n_boot, seed)
        lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
        return AUCResult(a, float(lo), float(hi), float(boots.var(ddof=1)), n1, n0, alpha, "bootstrap")
    raise ValueError(f"method must be 'delong' or 'bootstrap', got {method!r}")


def delong_result(auc: np.ndarray, cov: np.ndarray, alpha: float) -> DeLongResult:
    """Paired DeLong test from two AUCs and their 2x2 covariance (pROC ``roc.test``)."""
    diff = float(auc[0] - auc[1])
    var_d = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    sig = np.sqrt(max(var_d, 0.0)) if np.isfinite(var_d) else float("nan")
    if sig == 0.0 and diff == 0.0:
        z = 0.0  # pROC: identical curves give Z = 0, p = 1
    elif sig == 0.0:
        z = float(np.copysign(np.inf, diff))
    else:
        z = diff / sig
    p = float(2 * stats.norm.sf(abs(z))) if np.isfinite(sig) else float("nan")
    half = stats.norm.ppf(1 - alpha / 2) * sig
    return DeLongResult(
        float(auc[0]), float(auc[1]), diff, float(z), p, float(diff - half), float(diff + half),
        float(cov[0, 0]), float(cov[1, 1]), float(cov[0, 1]), alpha,
    )


def delong_test(
    y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, alpha: float = 0.05
) -> DeLongResult:
    """Paired two-sided DeLong test of AUC(score_a) vs AUC(score_b) on the same patients.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
    score_a, score_b : array-like of shape (n_samples,)
    alpha : float
        For the confidence interval of the difference.

    Returns
    -------
    DeLongResult
    """
    alpha = check_alpha(alpha)
    y, (a, b) = _classes(y_true, score_a, score_b, names=("score_a", "score_b"))
    va10, va01 = placements(y, a)
    vb10, vb01 = placements(y, b)
    v10 = np.stack([va10, vb10])
    v01 = np.stack([va01, vb01])
    auc, cov = delong_from_moments(
        va10.size, va01.size, v10.sum(axis=1), v01.sum(axis=1), v10 @ v10.T, v01 @ v01.T
    )
    return delong_result(auc, cov, alpha)


def youden_from_counts(
    thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray, n1: int, n0: int
) -> YoudenResult:
    """Pick the threshold maximising ``tp/n1 - fp/n0`` (ties: largest threshold).

    Parameters
    ----------
    thresholds : ndarray of shape (m,)
        Increasing.
    tp, fp : ndarray of shape (m,)
        Positives / negatives with score >= threshold.
    """
    tpr = tp / n1
    fpr = fp / n0
    j = tpr - fpr
    i = int(np.flatnonzero(j == j.max())[-1])
    return YoudenResult(float(thresholds[i]), float(j[i]), float(tpr[i]), float(1.0 - fpr[i]))


def youden_threshold(y_true: np.ndarray, score: np.ndarray) -> YoudenResult:
    """Threshold maximising Youden's J on the empirical ROC curve.

    Candidates are the distinct scores; a patient is called positive when ``score >= t``.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
    score : array-like of shape (n_samples,)

    Returns
    -------
    YoudenResult
    """
    y, (s,) = _classes(y_true, score)
    uniq = np.unique(s)
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    tp = (pos.size - np.searchsorted(pos, uniq, side="left")).astype(np.float64)
    fp = (neg.size - np.searchsorted(neg, uniq, side="left")).astype(np.float64)
    return youden_from_counts(uniq, tp, fp, pos.size, neg.size)
