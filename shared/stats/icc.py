"""Intraclass correlation ICC(2,1) and ICC(3,1) between raters, pooled and federated (exact).

Two-way ANOVA on an ``n`` subjects x ``k`` raters table (Shrout & Fleiss 1979; McGraw & Wong
1996): with subject means ``m_i``, rater means ``r_j`` and grand mean ``mu``::

    SS_rows = k * sum_i (m_i - mu)^2        MSR = SS_rows / (n - 1)
    SS_cols = n * sum_j (r_j - mu)^2        MSC = SS_cols / (k - 1)
    SS_tot  = sum_ij (x_ij - mu)^2          MSE = (SS_tot - SS_rows - SS_cols) / ((n - 1)(k - 1))
    ICC(2,1) = (MSR - MSE) / (MSR + (k - 1) MSE + k (MSC - MSE) / n)   two-way random, absolute agreement
    ICC(3,1) = (MSR - MSE) / (MSR + (k - 1) MSE)                        two-way mixed, consistency

Confidence intervals and F tests as in McGraw & Wong (and pingouin). Everything is built from
sums, so the federated version is exact: round 1 sends ``n`` and per-rater sums (-> means),
round 2 sends the centred sums of squares ``sum_i (m_i - mu)^2`` and ``sum_ij (x_ij - mu)^2``
(centring at the pooled mean keeps the subtraction numerically stable). Many features are
handled at once (``x`` of shape (n, k, n_features)), as needed to screen radiomic features.

Disclosure: the release needs ``n >= min_count`` subjects (all features share ``n``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from scipy import stats

from .sc_legacy import (
    Contribution,
    SiteComputedProtocol,
    State,
    as_count,
    check_consistent,
    small_count,
    withheld,
)

ICC_KINDS = ("icc2", "icc3")


def check_ratings(x: Any, n_raters: int | None = None, n_features: int | None = None) -> np.ndarray:
    """Validate ratings: shape (n, k) or (n, k, n_features), finite; returns (n, k, n_features)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"ratings must have shape (n_subjects, n_raters[, n_features]), got {a.shape}")
    if a.shape[1] < 2:
        raise ValueError(f"ICC needs at least 2 raters, got {a.shape[1]}")
    if n_raters is not None and a.shape[1] != n_raters:
        raise ValueError(f"expected {n_raters} raters, got {a.shape[1]}")
    if n_features is not None and a.shape[2] != n_features:
        raise ValueError(f"expected {n_features} features, got {a.shape[2]}")
    if not np.all(np.isfinite(a)):
        bad = np.unique(np.argwhere(~np.isfinite(a))[:, 0])
        raise ValueError(f"ratings contain NaN/inf for subject rows {bad[:10].tolist()}; exclude those subjects "
                         "(ICC needs every rater's value)")
    return a


def icc_from_ss(n: int, k: int, ss_rows: np.ndarray, ss_cols: np.ndarray, ss_tot: np.ndarray,
                alpha: float = 0.05) -> dict[str, np.ndarray]:
    """ICC(2,1), ICC(3,1), their CIs and F tests from two-way ANOVA sums of squares.

    Parameters
    ----------
    n, k : int
        Subjects and raters.
    ss_rows, ss_cols, ss_tot : ndarray of shape (n_features,)
    alpha : float

    Returns
    -------
    dict of ndarray of shape (n_features,)
        ``icc2``, ``icc2_ci_lower``, ``icc2_ci_upper``, ``icc2_f``, ``icc2_p``, the same for
        ``icc3``, and ``msr``, ``msc``, ``mse``.
    """
    ss_rows, ss_cols, ss_tot = (np.asarray(v, dtype=np.float64) for v in (ss_rows, ss_cols, ss_tot))
    df_r, df_c, df_e = n - 1, k - 1, (n - 1) * (k - 1)
    msr = ss_rows / df_r
    msc = ss_cols / df_c
    mse = np.maximum(ss_tot - ss_rows - ss_cols, 0.0) / df_e
    with np.errstate(divide="ignore", invalid="ignore"):
        icc2 = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
        icc3 = (msr - mse) / (msr + (k - 1) * mse)
        f3 = msr / mse
        # ICC(3,1): exact F-based interval.
        fl = f3 / stats.f.ppf(1 - alpha / 2, df_r, df_e)
        fu = f3 * stats.f.ppf(1 - alpha / 2, df_e, df_r)
        icc3_lo = (fl - 1) / (fl + k - 1)
        icc3_hi = (fu - 1) / (fu + k - 1)
        # ICC(2,1): Satterthwaite approximation (McGraw & Wong 1996, case 2A).
        a = k * icc2 / (n * (1 - icc2))
        b = 1 + k * icc2 * (n - 1) / (n * (1 - icc2))
        v = (a * msc + b * mse) ** 2 / ((a * msc) ** 2 / df_c + (b * mse) ** 2 / df_e)
        fs = stats.f.ppf(1 - alpha / 2, df_r, v)
        fi = stats.f.ppf(1 - alpha / 2, v, df_r)
        icc2_lo = n * (msr - fs * mse) / (fs * (k * msc + (k * n - k - n) * mse) + n * msr)
        icc2_hi = n * (fi * msr - mse) / (k * msc + (k * n - k - n) * mse + n * fi * msr)
        f2 = msr / mse
    return {"icc2": icc2, "icc2_ci_lower": icc2_lo, "icc2_ci_upper": icc2_hi, "icc2_f": f2,
            "icc2_p": stats.f.sf(f2, df_r, df_e), "icc3": icc3, "icc3_ci_lower": icc3_lo, "icc3_ci_upper": icc3_hi,
            "icc3_f": f3, "icc3_p": stats.f.sf(f3, df_r, df_e), "msr": msr, "msc": msc, "mse": mse}


def icc(x: Any, alpha: float = 0.05) -> dict[str, np.ndarray]:
    """Pooled ICC(2,1) and ICC(3,1) per feature.

    Parameters
    ----------
    x : array-like of shape (n_subjects, n_raters) or (n_subjects, n_raters, n_features)
    alpha : float

    Returns
    -------
    dict
        As :func:`icc_from_ss`, plus ``n``.
    """
    a = check_ratings(x)
    n, k, _ = a.shape
    if n < 2:
        raise ValueError(f"ICC needs at least 2 subjects, got {n}")
    mu = a.mean(axis=(0, 1))
    ss_rows = k * ((a.mean(axis=1) - mu) ** 2).sum(axis=0)
    ss_cols = n * ((a.mean(axis=0) - mu) ** 2).sum(axis=0)
    ss_tot = ((a - mu) ** 2).sum(axis=(0, 1))
    return icc_from_ss(n, k, ss_rows, ss_cols, ss_tot, alpha) | {"n": n}


class ICCProtocol(SiteComputedProtocol):
    """Federated ICC(2,1)/ICC(3,1) per feature from two rounds of sums (exact).

    Parameters
    ----------
    feature_names : sequence of str
        One per feature (last axis of the site's ratings array).
    n_raters : int
        Raters (2 for rater 1 vs rater 2 VOIs).
    threshold : float
        Features with ICC (``select_on``) >= threshold are listed under ``"kept"``.
    select_on : {"icc2", "icc3"}
    alpha : float
    """

    name: ClassVar[str] = "icc"

    def __init__(self, feature_names: Sequence[str], n_raters: int = 2, *, threshold: float = 0.8,
                 select_on: str = "icc2", alpha: float = 0.05) -> None:
        if not feature_names:
            raise ValueError("feature_names must name at least one feature")
        if n_raters < 2:
            raise ValueError(f"n_raters must be >= 2, got {n_raters!r}")
        if select_on not in ICC_KINDS:
            raise ValueError(f"select_on must be one of {ICC_KINDS}, got {select_on!r}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.feature_names = [str(f) for f in feature_names]
        self.n_raters, self.threshold, self.select_on, self.alpha = int(n_raters), float(threshold), select_on, alpha

    def params(self) -> dict[str, Any]:
        return {"features": self.feature_names, "n_raters": self.n_raters, "threshold": self.threshold,
                "select_on": self.select_on, "alpha": self.alpha}

    def init_state(self) -> State:
        return {"phase": "means"}

    def local(self, data: Any, state: State) -> Contribution:
        a = check_ratings(data, self.n_raters, len(self.feature_names))
        if state["phase"] == "means":
            return {"n": np.array([a.shape[0]], dtype=np.float64), "rater_sums": a.sum(axis=0)}
        mu = np.asarray(state["mu"])
        return {"ss_subject_means": ((a.mean(axis=1) - mu) ** 2).sum(axis=0),
                "ss_total": ((a - mu) ** 2).sum(axis=(0, 1))}

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        if state["phase"] == "means":
            n = int(as_count(totals["n"], "n")[0])
            if n == 0:
                return {"phase": "done", "n": 0}, True
            rater_means = np.asarray(totals["rater_sums"]) / n  # (k, F)
            mu = rater_means.mean(axis=0)
            ss_cols = n * ((rater_means - mu) ** 2).sum(axis=0)
            return {"phase": "squares", "n": n, "mu": mu.tolist(), "ss_cols": ss_cols.tolist()}, False
        ssm, sst = np.asarray(totals["ss_subject_means"]), np.asarray(totals["ss_total"])
        check_consistent(bool(np.all(ssm >= 0) and np.all(sst >= 0)), "negative sums of squares")
        # sum_ij (x - mu)^2 >= k sum_i (m_i - mu)^2 + n sum_j (r_j - mu)^2 for honest totals
        check_consistent(bool(np.all(sst + 1e-9 * (1 + sst) >= self.n_raters * ssm + np.asarray(state["ss_cols"]))),
                         "total sum of squares smaller than its between-subject and between-rater parts")
        state["ss_rows"] = (self.n_raters * np.asarray(totals["ss_subject_means"])).tolist()
        state["ss_tot"] = np.asarray(totals["ss_total"]).tolist()
        state["phase"] = "done"
        return state, True

    def release(self, state: State, totals: Mapping[str, np.ndarray], min_count: int) -> dict[str, Any]:
        out: dict[str, Any] = {"method": "icc", "features": self.feature_names, "withheld": []}
        n = state.get("n", 0)
        if n < 2 or small_count(n, min_count):
            out["withheld"].append(withheld("icc", f"fewer than max(2, min_count={min_count}) subjects rated by "
                                                   "every rater"))
            return out
        res = icc_from_ss(n, self.n_raters, np.asarray(state["ss_rows"]), np.asarray(state["ss_cols"]),
                          np.asarray(state["ss_tot"]), self.alpha)
        out["n"] = n
        out.update({key: v.tolist() for key, v in res.items() if key not in ("msr", "msc", "mse")})
        sel = np.asarray(res[self.select_on])
        out["kept"] = [f for f, v in zip(self.feature_names, sel, strict=True) if np.isfinite(v) and v >= self.threshold]
        out["selection"] = {"on": self.select_on, "threshold": self.threshold}
        return out
