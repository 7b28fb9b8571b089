"""Site-computed logistic regression, Firth's penalised regression and predictor selection.

References: :func:`shared.stats.logistic_regression` (ML, itself checked against statsmodels in
test_reference.py) and the pooled scipy Firth reference :func:`firth_logistic_regression`, which
is checked here against a closed form: for one 0/1 predictor (a saturated 2x2 table) the
Jeffreys penalty ``1/2 log det I`` splits into ``1/2 log(n0 p0 (1-p0)) + 1/2 log(n1 p1 (1-p1))``
(det of X'WX for two groups is n0 w0 n1 w1), so each group's fitted risk is ``(events + 1/2) /
(n + 1)``: the intercept is ``log((c + 1/2) / (d + 1/2))`` and the slope the log odds ratio with
1/2 added to every cell (the Haldane-Anscombe correction; Firth 1993, Heinze & Schemper 2002
discuss this case). The 2x2 table (20, 0 / 20, 200) is the Kleinman & Horton "SAS and R" Example
8.15 (2010) data with an empty cell, where ML diverges.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.stats import logistic_regression
from shared.stats.sc_common import run_encoded
from shared.stats.sc_logistic import (
    LogisticSite,
    SelectionSite,
    _firth_parts,
    firth_logistic_regression,
    pooled_selection,
)
from shared.stats.sitecomputed import CohortData, run_plain

SEEDS = st.integers(0, 2**31 - 1)
N_SITES = st.integers(1, 8)
COLS = ["coef", "se", "z", "p", "odds_ratio", "or_lo", "or_hi"]


def sites_of(df, y, parts):
    cols = tuple(df.columns)
    X = df.to_numpy(dtype=np.float64)
    return {f"site{i}": CohortData(y[q], X[q], cols) for i, q in enumerate(parts)}


def assert_tables(got: pd.DataFrame, ref: pd.DataFrame, tol: float = 1e-8) -> None:
    assert list(got.index) == list(ref.index)
    for c in COLS:
        g, r = got[c].to_numpy(), ref[c].to_numpy()
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol, err_msg=c)


def table_2x2(a, b, c, d):
    """x = 1: a events, b non-events; x = 0: c events, d non-events."""
    x = np.r_[np.ones(a + b), np.zeros(c + d)]
    y = np.r_[np.ones(a), np.zeros(b), np.ones(c), np.zeros(d)].astype(np.int64)
    return pd.DataFrame({"x": x}), y


def separated(rng, n):
    """Two informative covariates and one that separates the outcome quasi-completely."""
    x1 = rng.normal(size=n)
    x2 = rng.normal(50, 10, size=n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(-0.3 + x1)))).astype(np.int64)
    y[:2] = [0, 1]
    sep = np.where(y == 1, rng.uniform(0.5, 2.0, n), rng.uniform(-1.0, 0.5, n))
    return pd.DataFrame({"x1": x1, "x2": x2, "sep": sep}), y


# -- the pooled Firth reference ---------------------------------------------------------------
@pytest.mark.parametrize("cells", [(20, 0, 20, 200), (5, 0, 0, 5), (3, 7, 9, 2), (0, 22, 7, 356)])
def test_firth_reference_matches_closed_form_2x2(cells):
    a, b, c, d = cells
    X, y = table_2x2(*cells)
    t = firth_logistic_regression(X, y)
    assert t.loc["intercept", "coef"] == pytest.approx(np.log((c + 0.5) / (d + 0.5)), abs=1e-9)
    assert t.loc["x", "coef"] == pytest.approx(np.log((a + 0.5) * (d + 0.5) / ((b + 0.5) * (c + 0.5))), abs=1e-9)


def test_firth_reference_is_the_penalised_maximum():
    rng = np.random.default_rng(4)
    X, y = separated(rng, 80)
    D = np.column_stack([np.ones(80), X.to_numpy()])
    t = firth_logistic_regression(X, y)
    b = t["coef"].to_numpy()
    pll, u, _ = _firth_parts(D, y.astype(float), b)
    assert np.abs(u).max() < 1e-7
    for _ in range(20):  # a local maximum of l + 1/2 log det I
        assert _firth_parts(D, y.astype(float), b + rng.normal(scale=1e-3, size=b.size))[0] < pll


# -- federated fits == pooled -----------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES)
def test_ml_equals_pooled(seed, n_sites, spector, make_split):
    rng = np.random.default_rng(seed)
    X = spector[["GPA", "TUCE", "PSI"]]
    y = spector["GRADE"].to_numpy().astype(np.int64)
    run = run_plain(LogisticSite(list(X.columns), method="ml"), sites_of(X, y, make_split(rng, len(y), n_sites)),
                    min_count=3)
    assert_tables(run.result.table, logistic_regression(X, y))
    fit = run.result.fit
    assert fit["converged"] and fit["method"] == "ml" and fit["grad_norm"] < 1e-8 and fit["iterations"] >= 3


@settings(max_examples=8, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES)
def test_firth_equals_pooled_reference_on_separated_data(seed, n_sites, make_split):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 120))
    X, y = separated(rng, n)
    run = run_plain(LogisticSite(list(X.columns), method="firth", tol=1e-10),
                    sites_of(X, y, make_split(rng, n, n_sites)), min_count=3)
    assert run.result.fit["converged"] and run.result.fit["method"] == "firth"
    assert_tables(run.result.table, firth_logistic_regression(X, y))


@pytest.mark.parametrize("cells", [(20, 0, 20, 200), (6, 0, 5, 9)])
def test_auto_falls_back_to_firth_on_separation(cells):
    a, b, c, d = cells
    X, y = table_2x2(*cells)
    parts = np.array_split(np.random.default_rng(0).permutation(len(y)), 3)
    run = run_plain(LogisticSite(["x"], method="auto", tol=1e-10), sites_of(X, y, parts), min_count=1)
    fit = run.result.fit
    assert fit["method"] == "firth" and fit["converged"]
    assert any(why in fit["ml_failure"] for why in ("separation", "no convergence"))
    assert run.result.table.loc["x", "coef"] == pytest.approx(
        np.log((a + 0.5) * (d + 0.5) / ((b + 0.5) * (c + 0.5))), abs=1e-8)
    ml_only = run_plain(LogisticSite(["x"], method="ml"), sites_of(X, y, parts), min_count=1).result
    assert ml_only.table is None and ml_only.fit["converged"] is False
    assert any("did not converge" in w.reason for w in ml_only.withheld)


def test_encoded_fits_agree_with_pooled(spector, make_split):
    rng = np.random.default_rng(11)
    X = spector[["GPA", "TUCE", "PSI"]]
    y = spector["GRADE"].to_numpy().astype(np.int64)
    sites = sites_of(X, y, make_split(rng, len(y), 4))
    assert_tables(run_encoded(LogisticSite(list(X.columns), method="ml"), sites, min_count=3).result.table,
                  logistic_regression(X, y), tol=1e-7)
    assert_tables(run_encoded(LogisticSite(list(X.columns), method="firth"), sites, min_count=3).result.table,
                  firth_logistic_regression(X, y), tol=1e-7)


def test_max_iter_reported():
    rng = np.random.default_rng(2)
    X, y = separated(rng, 60)
    fit = run_plain(LogisticSite(["x1"], method="ml", max_iter=2), sites_of(X[["x1"]], y, [np.arange(60)]),
                    min_count=3).result.fit
    assert fit == {**fit, "converged": False, "iterations": 2}
    assert "no convergence in 2" in fit["reason"]


def test_constant_column_refused():
    X = pd.DataFrame({"c": np.ones(20), "x": np.arange(20.0)})
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    rel = run_plain(LogisticSite(["c", "x"]), sites_of(X, y, [np.arange(20)]), min_count=3).released
    assert rel["model"] is None and "constant" in rel["withheld"][0]["reason"]


# -- selection --------------------------------------------------------------------------------
@settings(max_examples=5, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES)
def test_selection_with_separated_candidate_equals_pooled(seed, n_sites, make_split):
    """One quasi-separated candidate does not stop the screen: it is fitted with Firth's penalty."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(60, 150))
    X, y = separated(rng, n)
    X["noise"] = rng.normal(size=n)
    run = run_plain(SelectionSite(list(X.columns)), sites_of(X, y, make_split(rng, n, n_sites)), min_count=5)
    res, ref = run.result, pooled_selection(X, y)
    assert res.univariate.loc["sep", "method"] == "firth"
    assert any(w.quantity == "univariate.sep" and "Firth" in w.reason for w in res.withheld)
    assert list(res.univariate["method"]) == list(ref["univariate"]["method"])
    assert_tables(res.univariate[COLS], ref["univariate"][COLS], tol=1e-6)
    assert res.selected == ref["selected"]
    assert len(res.models) == len(ref["models"])
    for got, exp in zip(res.models, ref["models"], strict=True):
        assert_tables(got, exp, tol=1e-6)
    assert all(f["converged"] for f in res.fits)
    for f, got in zip(res.fits, res.models, strict=True):
        if f["dropped"] is not None:
            assert got.loc[f["dropped"], "p"] >= 0.05
    assert all(res.models[-1].drop("intercept")["p"] < 0.05) or res.selected == ()


def test_selection_backward_elimination_spector(spector):
    X = spector[["GPA", "TUCE", "PSI"]]
    y = spector["GRADE"].to_numpy().astype(np.int64)
    parts = np.array_split(np.arange(len(y)), 3)
    res = run_plain(SelectionSite(list(X.columns), p_univariate=0.5, p_multivariate=0.05), sites_of(X, y, parts),
                    min_count=3).result
    ref = pooled_selection(X, y, p_univariate=0.5, p_multivariate=0.05)
    assert res.selected == ref["selected"]
    assert [f["dropped"] for f in res.fits][:-1] == [
        next(iter(set(a.index) - set(b.index))) for a, b in zip(ref["models"], ref["models"][1:], strict=False)]
    old = res.to_selection_result()
    assert old.selected == res.selected and list(old.univariate.columns) == COLS


def test_selection_nothing_screened():
    rng = np.random.default_rng(9)
    X = pd.DataFrame({"a": rng.normal(size=80), "b": rng.normal(size=80)})
    y = np.r_[np.zeros(40, int), np.ones(40, int)]
    res = run_plain(SelectionSite(["a", "b"], p_univariate=1e-6), sites_of(X, y, [np.arange(80)]),
                    min_count=5).result
    assert res.selected == () and res.models == []
    assert res.univariate["converged"].all()


def test_small_binary_cell_withholds_univariate_coefficients():
    """A 0/1 predictor with 3 events among x = 1 (k = 5): its 2x2 table would follow from the fit."""
    rng = np.random.default_rng(5)
    x = np.r_[np.ones(3), np.zeros(40), np.ones(20), np.zeros(37)]
    y = np.r_[np.ones(43, int), np.zeros(57, int)]
    X = pd.DataFrame({"x": x, "z": rng.normal(size=100) + y})
    run = run_plain(SelectionSite(["x", "z"], p_univariate=1.0, p_multivariate=1.0), sites_of(X, y, [np.arange(100)]),
                    min_count=5)
    uni = run.released["univariate"]
    assert uni[0]["term"] == "x" and uni[0]["table"] == [] and "2x2" in uni[0]["withheld"]
    assert uni[1]["table"]  # z is continuous: released
    assert np.isnan(run.result.univariate.loc["x", "coef"])
    assert run.released["models"][0]["table"]  # with z beside it, x's coefficient no longer fixes the counts
    assert "x" in run.result.selected
    rel1 = run_plain(SelectionSite(["x", "z"], p_univariate=1.0, p_multivariate=1.0),
                     sites_of(X, y, [np.arange(100)]), min_count=3).released
    assert rel1["univariate"][0]["table"]  # cells 3, 40, 20, 37 are all >= 3


def test_selection_withheld_for_small_cohort():
    X = pd.DataFrame({"a": np.arange(12.0)})
    y = np.r_[np.zeros(9, int), np.ones(3, int)]
    rel = run_plain(SelectionSite(["a"]), sites_of(X, y, [np.arange(12)]), min_count=5).released
    assert rel["released"] is False and "univariate" not in rel and "selected" not in rel
