"""Result types: small frozen dataclasses shared by the pooled and the federated functions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import pandas as pd

T = TypeVar("T")


@dataclass(frozen=True)
class AUCResult:
    """Area under the ROC curve with its confidence interval.

    Attributes
    ----------
    auc : float
        P(score of a positive > score of a negative), ties counted half.
    lo, hi : float
        Confidence limits (DeLong: normal interval clipped to [0, 1] as in pROC; bootstrap:
        percentile interval). NaN when a class has a single patient (as pROC's NA).
    var : float
        DeLong variance, or the bootstrap variance (ddof=1) for ``method="bootstrap"``.
    n_pos, n_neg : int
        Patients in each class.
    alpha : float
        1 - confidence level.
    method : str
        ``"delong"`` or ``"bootstrap"``.
    """

    auc: float
    lo: float
    hi: float
    var: float
    n_pos: int
    n_neg: int
    alpha: float = 0.05
    method: str = "delong"


@dataclass(frozen=True)
class DeLongResult:
    """Paired two-sided DeLong test of two AUCs measured on the same patients (pROC's roc.test).

    ``diff = auc_a - auc_b``, ``z = diff / sqrt(var_a + var_b - 2 cov)``, ``p`` two-sided and
    ``[diff_lo, diff_hi]`` the normal confidence interval of the difference (not clipped).
    """

    auc_a: float
    auc_b: float
    diff: float
    z: float
    p: float
    diff_lo: float
    diff_hi: float
    var_a: float
    var_b: float
    cov: float
    alpha: float = 0.05


@dataclass(frozen=True)
class BinaryMetrics:
    """Confusion-matrix metrics at one threshold (positive prediction when ``prob >= threshold``).

    Ratios whose denominator is zero are NaN.
    """

    accuracy: float
    sensitivity: float
    specificity: float
    f1: float
    ppv: float
    npv: float
    tp: int
    fp: int
    tn: int
    fn: int
    threshold: float


@dataclass(frozen=True)
class YoudenResult:
    """Threshold maximising Youden's J = sensitivity + specificity - 1.

    ``threshold`` is a score value; patients with ``score >= threshold`` are called positive.
    Ties in J are broken towards the largest threshold.
    """

    threshold: float
    j: float
    sensitivity: float
    specificity: float


@dataclass(frozen=True)
class CalibrationResult:
    """Calibration of predicted probabilities.

    Attributes
    ----------
    bins : DataFrame
        One row per equal-width bin on [0, 1]: ``bin_lo``, ``bin_hi``, ``count``,
        ``mean_predicted``, ``observed_rate`` (NaN for empty bins).
    brier : float
        Mean of (prob - y)^2.
    ece : float
        Expected calibration error: sum over bins of count/n * |mean_predicted - observed_rate|.
    slope : float
        Coefficient of logit(prob) in the logistic model y ~ a + b logit(prob).
    intercept : float
        Calibration-in-the-large: intercept of y ~ 1 with offset logit(prob) (slope fixed at 1).
    slope_model_intercept : float
        The ``a`` of y ~ a + b logit(prob) (R rms ``val.prob``'s "Intercept").
    """

    bins: pd.DataFrame
    brier: float
    ece: float
    slope: float
    intercept: float
    slope_model_intercept: float


@dataclass(frozen=True)
class SelectionResult:
    """Two-step predictor selection.

    ``univariate``: one row per candidate (its coefficient in y ~ 1 + x), ``multivariate``: the
    model with the candidates whose univariate p < p_univariate (empty if none), ``selected``:
    the terms of that model with p < p_multivariate (one pass, no backward elimination).
    """

    univariate: pd.DataFrame
    multivariate: pd.DataFrame
    selected: tuple[str, ...]


@dataclass(frozen=True)
class TableOne:
    """Baseline table.

    Attributes
    ----------
    table : DataFrame
        Formatted strings; index = row labels, columns ``overall``, one per group, ``p``, ``test``.
    stats : DataFrame
        The numbers behind it in long format, indexed by (variable, level, group) with columns
        ``n, mean, sd, median, q1, q3, count, percent`` (NaN where not applicable).
    tests : DataFrame
        Indexed by variable: ``test`` (name), ``statistic``, ``p``.
    """

    table: pd.DataFrame
    stats: pd.DataFrame
    tests: pd.DataFrame


@dataclass(frozen=True)
class Suppression:
    """One disclosure-control action: what a site withheld or coarsened, and why.

    ``quantity`` names the summary (e.g. ``"auc.score_a.pos"``, ``"table_one.age"``); ``reason``
    never contains the small count itself.
    """

    site: str
    quantity: str
    reason: str


@dataclass(frozen=True)
class Federated(Generic[T]):
    """Outcome of a federated computation.

    Attributes
    ----------
    result : T
        The same type the pooled function returns.
    suppressed : tuple of Suppression
        Disclosure log; empty when nothing was withheld or merged.
    bound : Mapping[str, float | ndarray]
        Certified absolute error bounds of grid-based numbers against the pooled computation on
        the raw (unsnapped) data, e.g. ``{"auc": 0.0012}``; 0 where the number is exact.
    n_rounds : int
        Server-site round trips.
    bytes_sent : Mapping[str, int]
        Per site, bytes of everything it sent (array nbytes + 8 per scalar), all rounds.
    """

    result: T
    suppressed: tuple[Suppression, ...] = ()
    bound: Mapping[str, float | np.ndarray] = field(default_factory=dict)
    n_rounds: int = 0
    bytes_sent: Mapping[str, int] = field(default_factory=dict)
