"""Pooled functions against published / established implementations, values cited.

pROC values: pROC's own test suite (github.com/xrobin/pROC, tests/testthat/test-auc.R,
test-var.R, test-cov.R, test-ci.auc.R, test-roc.test.R), computed with R pROC on ``aSAH``.
Logistic regression: Stata 11 on the Spector & Mazzeo data, as stored in statsmodels'
``statsmodels/discrete/tests/results/results_discrete.py`` (class ``Spector.logit``).
scipy is the reference for the table-one tests; dcurves' net-benefit formula and the DeLong
placement values are re-implemented here from first principles (O(n^2)).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, special, stats

from shared.stats import (
    auc_ci,
    binary_metrics,
    calibration,
    delong_test,
    logistic_regression,
    net_benefit,
    select_predictors,
    table_one,
    youden_threshold,
)

# --- pROC on aSAH -------------------------------------------------------------------------------
# test-auc.R: auc(r.wfns) 0.823678861788618, auc(r.ndka) 0.611957994579946;
# helper-roc-expected.R: auc(r.s100b) 0.73136856368563685 (printed "Area under the curve: 0.7314").
# test-var.R: var(r.wfns) 0.00146991470882363, var(r.ndka) 0.0031908105493913,
#             var(r.s100b) 0.00266868245717244.
PROC_AUC = {"wfns": 0.823678861788618, "ndka": 0.611957994579946, "s100b": 0.73136856368563685}
PROC_VAR = {"wfns": 0.00146991470882363, "ndka": 0.0031908105493913, "s100b": 0.00266868245717244}
# test-ci.auc.R: ci.auc(r.ndka) = c(0.501244999271703, 0.611957994579946, 0.722670989888189).
PROC_CI_NDKA = (0.501244999271703, 0.722670989888189)
# pROC documentation / print(ci(r.s100b)): "95% CI: 0.6301-0.8326 (DeLong)".
PROC_CI_S100B = (0.6301, 0.8326)
# test-roc.test.R: roc.test(r.wfns, r.s100b) etc. (paired DeLong): Z, p, conf.int.
PROC_ROCTEST = {
    ("wfns", "s100b"): (2.20898359144091, 0.0271757822291882, 0.0104061769564846, 0.174214419249478),
    ("wfns", "ndka"): (2.79777591868904, 0.00514557970691098, 0.0634011709339876, 0.3600405634833566),
    ("ndka", "s100b"): (-1.39077002573558, 0.164295175223054, -0.2876917446341914, 0.0488706064228094),
}
# test-cov.R: cov(r.wfns, r.ndka), cov(r.ndka, r.s100b), cov(r.s100b, r.wfns).
PROC_COV = {("wfns", "ndka"): -0.000532967856762438, ("ndka", "s100b"): -0.000756164938056579,
            ("s100b", "wfns"): 0.00119615567376754}


@pytest.mark.parametrize("marker", ["wfns", "ndka", "s100b"])
def test_auc_and_delong_variance_match_proc(asah: pd.DataFrame, marker: str) -> None:
    r = auc_ci(asah["y"], asah[marker])
    assert r.auc == pytest.approx(PROC_AUC[marker], abs=1e-12)
    assert r.var == pytest.approx(PROC_VAR[marker], rel=1e-10)
    assert (r.n_pos, r.n_neg) == (41, 72)


def test_delong_ci_matches_proc(asah: pd.DataFrame) -> None:
    r = auc_ci(asah["y"], asah["ndka"])
    assert (r.lo, r.hi) == pytest.approx(PROC_CI_NDKA, abs=1e-12)
    r = auc_ci(asah["y"], asah["s100b"])
    assert (round(r.lo, 4), round(r.hi, 4)) == PROC_CI_S100B


@pytest.mark.parametrize("pair", list(PROC_ROCTEST))
def test_paired_delong_matches_proc_roc_test(asah: pd.DataFrame, pair: tuple[str, str]) -> None:
    z, p, lo, hi = PROC_ROCTEST[pair]
    r = delong_test(asah["y"], asah[pair[0]], asah[pair[1]])
    assert r.z == pytest.approx(z, rel=1e-10)
    assert r.p == pytest.approx(p, rel=1e-9)
    assert (r.diff_lo, r.diff_hi) == pytest.approx((lo, hi), abs=1e-12)
    assert r.diff == pytest.approx(PROC_AUC[pair[0]] - PROC_AUC[pair[1]], abs=1e-12)


@pytest.mark.parametrize("pair", list(PROC_COV))
def test_delong_covariance_matches_proc(asah: pd.DataFrame, pair: tuple[str, str]) -> None:
    assert delong_test(asah["y"], asah[pair[0]], asah[pair[1]]).cov == pytest.approx(PROC_COV[pair], rel=1e-10)


def test_identical_scores_give_z0_p1_as_proc(asah: pd.DataFrame) -> None:
    # test-roc.test.R: roc.test(r.wfns, r.wfns) has statistic 0 and p-value 1.
    r = delong_test(asah["y"], asah["wfns"], asah["wfns"])
    assert (r.z, r.p, r.diff) == (0.0, 1.0, 0.0)


def test_site_computed_roc_reproduces_proc_on_asah(asah: pd.DataFrame) -> None:
    """Three sites, the site-computed ROC (fine grid 1e-4): pROC's numbers.

    The protocol takes probabilities in [0, 1]; the aSAH markers (2 decimals, up to 5) divided by 5
    stay on the 1e-4 grid and keep their order, so AUC, variance and the paired test are exact.
    """
    from shared.stats.sc_roc import ROCSite
    from shared.stats.sitecomputed import CohortData, run_plain

    parts = np.array_split(np.random.default_rng(3).permutation(len(asah)), 3)
    X = np.column_stack([asah["wfns"].to_numpy() / 5, asah["s100b"].to_numpy() / 5])
    y = asah["y"].to_numpy()
    sites = {f"s{j}": CohortData(y[i], X[i], ("wfns", "s100b")) for j, i in enumerate(parts)}
    res = run_plain(ROCSite(["wfns", "s100b"]), sites, min_count=1).result
    r = res.aucs["s100b"]
    assert r.auc == pytest.approx(PROC_AUC["s100b"], abs=1e-12)
    assert r.var == pytest.approx(PROC_VAR["s100b"], rel=1e-9)
    assert (round(r.lo, 4), round(r.hi, 4)) == PROC_CI_S100B
    z, p, lo, hi = PROC_ROCTEST[("wfns", "s100b")]
    t = res.delong("wfns", "s100b")
    assert (t.z, t.p, t.diff_lo, t.diff_hi) == pytest.approx((z, p, lo, hi), rel=1e-9)


def test_youden_matches_proc_best_coords(asah: pd.DataFrame) -> None:
    # pROC: coords(r.s100b, "best") -> threshold 0.205, specificity 0.8055556, sensitivity 0.6341463.
    # pROC reports the midpoint between consecutive distinct scores; we report the score itself.
    r = youden_threshold(asah["y"], asah["s100b"])
    assert r.specificity == pytest.approx(58 / 72) and r.sensitivity == pytest.approx(26 / 41)
    below = np.unique(asah["s100b"])[np.unique(asah["s100b"]) < r.threshold].max()
    assert (below + r.threshold) / 2 == pytest.approx(0.205)


def _auc_first_principles(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """O(n^2) AUC and DeLong placement values (DeLong et al. 1988)."""
    pos, neg = s[y == 1], s[y == 0]
    k = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return float(k.mean()), k.mean(axis=1), k.mean(axis=0)


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_variance_against_first_principles_and_mann_whitney(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 40 + 10 * seed
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = np.round(rng.normal(y * 0.8, 1), 1)  # ties
    auc, v10, v01 = _auc_first_principles(y, s)
    var = v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size
    r = auc_ci(y, s)
    assert r.auc == pytest.approx(auc, abs=1e-12) and r.var == pytest.approx(var, rel=1e-10)
    u = stats.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert r.auc == pytest.approx(u / (v10.size * v01.size), abs=1e-12)


def test_bootstrap_ci_contains_auc_and_is_reproducible(asah: pd.DataFrame) -> None:
    a = auc_ci(asah["y"], asah["s100b"], method="bootstrap", n_boot=500, seed=1)
    b = auc_ci(asah["y"], asah["s100b"], method="bootstrap", n_boot=500, seed=1)
    assert a == b and a.lo < a.auc < a.hi and a.method == "bootstrap"
    # bootstrap SE close to DeLong's (pROC's var(method="bootstrap") is of the same order)
    assert np.sqrt(a.var) == pytest.approx(np.sqrt(PROC_VAR["s100b"]), rel=0.25)


# --- logistic regression: Stata 11 on Spector & Mazzeo (statsmodels results_discrete.Spector.logit)
STATA_PARAMS = {"GPA": 2.82611297201, "TUCE": 0.0951576702557, "PSI": 2.37868772835, "intercept": -13.0213483201}
STATA_BSE = {"GPA": 1.26294114526, "TUCE": 0.141554207662, "PSI": 1.06456430165, "intercept": 4.93132462871}
# statsmodels 0.15.0 ``Logit(GRADE, add_constant(X)).fit()`` (Newton to tol 1e-8), run at development
# time: tighter than Stata's printed convergence.
SM_PARAMS = {"intercept": -13.021346858115699, "GPA": 2.826112594889323, "TUCE": 0.095157661317909,
             "PSI": 2.378687655093354}
SM_BSE = {"intercept": 4.931324213602725, "GPA": 1.262941075629075, "TUCE": 0.141554205673696,
          "PSI": 1.064564254497131}
SM_P = {"intercept": 0.008277461435488, "GPA": 0.025239108802562, "TUCE": 0.501434238081926,
        "PSI": 0.025455204361278}


def test_logistic_regression_matches_stata(spector: pd.DataFrame) -> None:
    t = logistic_regression(spector[["GPA", "TUCE", "PSI"]], spector["GRADE"])
    assert list(t.index) == ["intercept", "GPA", "TUCE", "PSI"]
    for term in STATA_PARAMS:
        assert t.loc[term, "coef"] == pytest.approx(STATA_PARAMS[term], rel=1e-6)
        assert t.loc[term, "se"] == pytest.approx(STATA_BSE[term], rel=1e-6)
        assert t.loc[term, "coef"] == pytest.approx(SM_PARAMS[term], rel=1e-9)
        assert t.loc[term, "se"] == pytest.approx(SM_BSE[term], rel=1e-8)
        assert t.loc[term, "p"] == pytest.approx(SM_P[term], rel=1e-8)
    assert t["odds_ratio"].to_numpy() == pytest.approx(np.exp(t["coef"].to_numpy()))
    q = stats.norm.ppf(0.975)
    assert t["or_lo"].to_numpy() == pytest.approx(np.exp(t["coef"] - q * t["se"]).to_numpy())
    assert t["p"].to_numpy() == pytest.approx(2 * stats.norm.sf(np.abs(t["coef"] / t["se"])))


def test_select_predictors_screens_then_fits(spector: pd.DataFrame) -> None:
    X = spector[["GPA", "TUCE", "PSI"]]
    r = select_predictors(X, spector["GRADE"], p_univariate=0.10, p_multivariate=0.05)
    for c in X.columns:  # univariate rows are the single-predictor fits
        assert r.univariate.loc[c, "coef"] == pytest.approx(logistic_regression(X[[c]], spector["GRADE"]).loc[c, "coef"])
    entered = [c for c in X.columns if r.univariate.loc[c, "p"] < 0.10]
    assert list(r.multivariate.index) == ["intercept", *entered]
    assert r.selected == tuple(t for t in entered if r.multivariate.loc[t, "p"] < 0.05)


# --- classification -----------------------------------------------------------------------------
def test_binary_metrics_against_sklearn() -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.uniform(size=200), 2)
    pred = (p >= 0.5).astype(int)
    r = binary_metrics(y, p, 0.5)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert (r.tp, r.fp, r.tn, r.fn) == (tp, fp, tn, fn)
    assert r.accuracy == pytest.approx(accuracy_score(y, pred))
    assert r.sensitivity == pytest.approx(recall_score(y, pred))
    assert r.specificity == pytest.approx(recall_score(1 - y, 1 - pred))
    assert r.ppv == pytest.approx(precision_score(y, pred)) and r.f1 == pytest.approx(f1_score(y, pred))
    assert r.npv == pytest.approx(tn / (tn + fn))


def test_net_benefit_first_principles() -> None:
    # dcurves (R/test_consequences.R): tp_rate = mean(risk[outcome] >= t) * pos_rate,
    # net_benefit = tp_rate - t / (1 - t) * fp_rate; "all" treats everyone, "none" is 0.
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 150)
    p = np.round(rng.uniform(size=150), 2)
    t = np.arange(0, 1, 0.01)
    d = net_benefit(y, p, t)
    for i, ti in enumerate(t):
        tp = np.mean((p >= ti) & (y == 1))
        fp = np.mean((p >= ti) & (y == 0))
        assert d["model"][i] == pytest.approx(tp - ti / (1 - ti) * fp, abs=1e-12)
        assert d["treat_all"][i] == pytest.approx(y.mean() - ti / (1 - ti) * (1 - y.mean()), abs=1e-12)
    assert (d["treat_none"] == 0).all()


def test_calibration_against_independent_optimiser() -> None:
    rng = np.random.default_rng(2)
    p = rng.uniform(0.02, 0.98, 400)
    y = (rng.uniform(size=400) < special.expit(1.5 * special.logit(p) - 0.3)).astype(int)
    r = calibration(y, p, n_bins=10)
    lg = special.logit(p)

    def nll(b: np.ndarray, X: np.ndarray, off: np.ndarray) -> float:
        eta = X @ b + off
        return float(np.logaddexp(0, eta).sum() - y @ eta)

    X2 = np.column_stack([np.ones_like(lg), lg])
    a, s = optimize.minimize(nll, [0.0, 1.0], args=(X2, 0 * lg), method="BFGS", options={"gtol": 1e-10}).x
    (c,) = optimize.minimize(nll, [0.0], args=(np.ones((400, 1)), lg), method="BFGS", options={"gtol": 1e-10}).x
    assert r.slope == pytest.approx(s, abs=1e-5) and r.slope_model_intercept == pytest.approx(a, abs=1e-5)
    assert r.intercept == pytest.approx(c, abs=1e-5)
    assert r.brier == pytest.approx(np.mean((p - y) ** 2))
    b = np.minimum((p * 10).astype(int), 9)
    ece = sum(np.sum(b == k) / 400 * abs(p[b == k].mean() - y[b == k].mean()) for k in range(10) if (b == k).any())
    assert r.ece == pytest.approx(ece)
    assert r.bins["count"].sum() == 400


# --- table one against scipy ----------------------------------------------------------------------
def test_table_one_against_scipy(asah: pd.DataFrame) -> None:
    t = table_one(asah, "outcome", ["age", "gender", "s100b"], nonnormal=["s100b"])
    good, poor = asah[asah.outcome == "Good"], asah[asah.outcome == "Poor"]
    w = stats.ttest_ind(good.age, poor.age, equal_var=False)
    assert t.tests.loc["age", "p"] == pytest.approx(w.pvalue, rel=1e-10)
    assert t.tests.loc["age", "statistic"] == pytest.approx(w.statistic, rel=1e-10)
    m = stats.mannwhitneyu(good.s100b, poor.s100b, method="asymptotic")
    assert t.tests.loc["s100b", "p"] == pytest.approx(m.pvalue, rel=1e-10)
    ct = pd.crosstab(asah.gender, asah.outcome).to_numpy()
    assert t.tests.loc["gender", "p"] == pytest.approx(stats.chi2_contingency(ct).pvalue, rel=1e-10)
    assert t.stats.loc[("age", "", "Good"), "mean"] == pytest.approx(good.age.mean())
    assert t.stats.loc[("age", "", "Good"), "sd"] == pytest.approx(good.age.std())
    assert t.stats.loc[("s100b", "", "Poor"), "median"] == pytest.approx(poor.s100b.median())
    assert t.stats.loc[("gender", "Male", "Poor"), "count"] == (poor.gender == "Male").sum()
    assert t.table.loc["n", "overall"] == "113"
    st = table_one(asah, "outcome", ["age"], equal_var=True)
    assert st.tests.loc["age", "p"] == pytest.approx(stats.ttest_ind(good.age, poor.age).pvalue, rel=1e-10)


def test_table_one_uses_fisher_for_sparse_2x2() -> None:
    df = pd.DataFrame({"g": [0] * 10 + [1] * 10, "x": ["a"] * 2 + ["b"] * 8 + ["a"] * 7 + ["b"] * 3})
    t = table_one(df, "g", ["x"])
    assert t.tests.loc["x", "test"] == "Fisher exact"
    assert t.tests.loc["x", "p"] == pytest.approx(stats.fisher_exact([[2, 7], [8, 3]]).pvalue)
