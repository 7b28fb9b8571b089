"""Survival protocols: federated == pooled == lifelines / statsmodels, and disclosure control."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test

from shared.stats import delong_test
from shared.stats.sc_legacy import run_site_computed
from shared.stats.survival import (
    CoxPHProtocol,
    KaplanMeierProtocol,
    SurvivalData,
    TimeDependentAUCProtocol,
    bin_scores,
    binned_times,
    censoring_survival,
    cox_ph,
    kaplan_meier,
    logrank_test,
    merge_blocks,
    time_dependent_auc,
)

# lifelines 0.30 calls pandas reductions positionally (deprecated in pandas 3); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Starting with pandas version 4.0")

EDGES = np.arange(0.0, 6.01, 0.5)
SPLITS = [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]  # (seed, number of sites): 2..6 unequal sites


def cohort(seed: int, n: int = 240, ties: bool = False) -> dict[str, np.ndarray]:
    """Exponential event times depending on covariates, uniform censoring; 3 subtypes."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 3, n)
    x = np.column_stack([rng.normal(size=n), (group == 1).astype(float), rng.normal(size=n)])
    t_event = rng.exponential(2.5 / np.exp(x @ np.array([0.6, -0.8, 0.3])))
    t_cens = rng.uniform(0.2, 8.0, n)
    time = np.minimum(t_event, t_cens)
    if ties:
        time = np.ceil(time * 4) / 4  # many tied times
    event = (t_event <= t_cens).astype(int)
    scores = np.column_stack([x[:, 0] + rng.normal(0, 1.0, n), x[:, 0] - 0.8 * x[:, 1] + rng.normal(0, 0.5, n)])
    return {"time": time, "event": event, "group": group, "x": x, "scores": scores}


def sites_of(c: dict[str, np.ndarray], parts: list[np.ndarray], **fields: str) -> dict[str, SurvivalData]:
    return {f"site{i}": SurvivalData(c["time"][ix], c["event"][ix],
                                     **{f: c[src][ix] for f, src in fields.items()}) for i, ix in enumerate(parts)}


# ---------------------------------------------------------------------------- Kaplan-Meier

@pytest.mark.parametrize("seed,n_sites", SPLITS)
def test_km_federated_equals_lifelines_on_binned_times(seed, n_sites, splitter):
    c = cohort(seed)
    parts = splitter(len(c["time"]), n_sites, seed)
    res = run_site_computed(KaplanMeierProtocol(EDGES, groups=[0, 1, 2]), sites_of(c, parts, group="group"), 1)
    assert res.n_rounds == 1
    bt, be = binned_times(c["time"], c["event"], EDGES)
    for g in (0, 1, 2):
        curve = res.released["curves"][str(g)]
        sel = c["group"] == g
        kmf = KaplanMeierFitter().fit(bt[sel], be[sel])
        assert curve["time"] == EDGES[1:].tolist()
        np.testing.assert_allclose(curve["survival"], kmf.survival_function_at_times(EDGES[1:]).values, atol=1e-12)
        ci = kmf.confidence_interval_.reindex(EDGES[1:], method="ffill")
        np.testing.assert_allclose(curve["ci_lower"], ci.iloc[:, 0].values, atol=1e-12)
        np.testing.assert_allclose(curve["ci_upper"], ci.iloc[:, 1].values, atol=1e-12)
        table = kmf.event_table.reindex(EDGES[1:])
        observed = table["observed"].fillna(0).values
        np.testing.assert_array_equal(curve["events"], observed)


def test_km_pooled_reference_equals_lifelines():
    c = cohort(11)
    km = kaplan_meier(c["time"], c["event"], EDGES)
    bt, be = binned_times(c["time"], c["event"], EDGES)
    kmf = KaplanMeierFitter().fit(bt, be)
    np.testing.assert_allclose(km["survival"], kmf.survival_function_at_times(EDGES[1:]).values, atol=1e-12)
    assert km["n_at_risk"][0] == len(c["time"])


def test_binning_puts_edges_in_the_lower_bin_and_censors_past_the_horizon():
    bt, be = binned_times(np.array([0.0, 0.5, 0.51, 6.0, 9.0]), np.array([1, 1, 1, 1, 1]), EDGES)
    assert bt.tolist() == [0.5, 0.5, 1.0, 6.0, 6.0]
    assert be.tolist() == [1, 1, 1, 1, 0]  # the event at 9 is after the horizon: censored at 6


@pytest.mark.parametrize("k", [3, 5, 10])
def test_km_release_merges_bins_so_every_count_is_zero_or_at_least_k(k, splitter):
    c = cohort(5, n=150)
    parts = splitter(150, 4, 5)
    res = run_site_computed(KaplanMeierProtocol(EDGES, groups=[0, 1, 2]), sites_of(c, parts, group="group"), k)
    bt, be = binned_times(c["time"], c["event"], EDGES)
    for g in ("0", "1", "2"):
        curve = res.released["curves"][g]
        assert curve is not None
        counts = np.array(curve["n_at_risk"] + curve["events"] + curve["censored"])
        assert not np.any((counts > 0) & (counts < k)), counts
        # Remaining at risk after the last block is derivable too: it must be 0.
        assert curve["n_at_risk"][-1] - curve["events"][-1] - curve["censored"][-1] == 0
        # The released curve is exactly KM on the times binned to the released (merged) edges.
        sel = c["group"] == int(g)
        edges = np.array([0.0] + curve["time"])
        bt2, be2 = binned_times(c["time"][sel], c["event"][sel], edges)
        kmf = KaplanMeierFitter().fit(bt2, be2)
        np.testing.assert_allclose(curve["survival"], kmf.survival_function_at_times(edges[1:]).values, atol=1e-12)
    assert any(w["quantity"].startswith("km.") and "merged" in w["reason"] for w in res.released["withheld"])
    # The fine-grid counts (what only sites see) never appear in the release.
    assert set(res.released) == {"method", "time_unit_edges", "curves", "withheld", "logrank"}


def test_merge_blocks_finest_valid_partition():
    d = np.array([6, 1, 0, 5, 0, 0])
    c = np.array([0, 0, 0, 0, 0, 0])
    assert merge_blocks(d, c, 5) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert merge_blocks(np.array([2, 1]), np.array([0, 0]), 5) is None


def test_km_small_group_is_withheld_with_reason():
    rng = np.random.default_rng(0)
    t = rng.uniform(0.1, 5, 40)
    e = rng.integers(0, 2, 40)
    g = np.array([0] * 37 + [1] * 3)
    res = run_site_computed(KaplanMeierProtocol(EDGES, groups=[0, 1]),
                            {"a": SurvivalData(t[:20], e[:20], group=g[:20]),
                             "b": SurvivalData(t[20:], e[20:], group=g[20:])}, 5)
    assert res.released["curves"]["1"] is None
    assert res.released["logrank"] is None
    reasons = {w["quantity"]: w["reason"] for w in res.released["withheld"]}
    assert "fewer than min_count=5" in reasons["km.1"]
    assert "3" not in reasons["km.1"]  # the small count itself is never stated


# ---------------------------------------------------------------------------- log-rank

@pytest.mark.parametrize("seed,n_sites", SPLITS)
def test_logrank_federated_equals_lifelines(seed, n_sites, splitter):
    c = cohort(seed)
    parts = splitter(len(c["time"]), n_sites, seed)
    res = run_site_computed(KaplanMeierProtocol(EDGES, groups=[0, 1, 2]), sites_of(c, parts, group="group"), 1)
    bt, be = binned_times(c["time"], c["event"], EDGES)
    ll = multivariate_logrank_test(bt, c["group"], be)
    lr = res.released["logrank"]
    assert lr["df"] == 2
    assert lr["chi2"] == pytest.approx(ll.test_statistic, rel=1e-10)
    assert lr["p"] == pytest.approx(ll.p_value, rel=1e-8)
    pooled = logrank_test(c["time"], c["event"], c["group"], EDGES)
    assert pooled["chi2"] == pytest.approx(lr["chi2"], rel=1e-12)


# ---------------------------------------------------------------------------- Cox

def lifelines_cox(c: dict[str, np.ndarray], parts: list[np.ndarray]) -> CoxPHFitter:
    site = np.empty(len(c["time"]), dtype=int)
    for i, ix in enumerate(parts):
        site[ix] = i
    df = pd.DataFrame(c["x"], columns=["a", "b", "c"]).assign(T=c["time"], E=c["event"], site=site)
    return CoxPHFitter().fit(df, "T", "E", strata=["site"], fit_options={"precision": 1e-12})


@pytest.mark.parametrize("seed,n_sites", SPLITS)
@pytest.mark.parametrize("ties", [False, True])
def test_cox_efron_federated_equals_lifelines_stratified(seed, n_sites, ties, splitter):
    c = cohort(seed, ties=ties)
    parts = splitter(len(c["time"]), n_sites, seed)
    res = run_site_computed(CoxPHProtocol(["a", "b", "c"], ties="efron"), sites_of(c, parts, covariates="x"), 5)
    cph = lifelines_cox(c, parts)
    r = res.released
    assert r["converged"] is True and r["gradient_norm"] < 1e-8
    np.testing.assert_allclose(r["coef"], cph.params_.values, atol=1e-6)
    np.testing.assert_allclose(r["se"], cph.standard_errors_.values, atol=1e-6)
    np.testing.assert_allclose(r["hr"], cph.hazard_ratios_.values, rtol=1e-6)
    np.testing.assert_allclose(r["p"], cph.summary["p"].values, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(r["hr_ci_lower"], cph.summary["exp(coef) lower 95%"].values, rtol=1e-6)
    assert r["loglik"] == pytest.approx(cph.log_likelihood_, abs=1e-6)


@pytest.mark.parametrize("seed,n_sites", SPLITS)
def test_cox_breslow_federated_equals_statsmodels_with_ties(seed, n_sites, splitter):
    c = cohort(seed, ties=True)
    parts = splitter(len(c["time"]), n_sites, seed)
    res = run_site_computed(CoxPHProtocol(["a", "b", "c"], ties="breslow"), sites_of(c, parts, covariates="x"), 5)
    site = np.empty(len(c["time"]), dtype=int)
    for i, ix in enumerate(parts):
        site[ix] = i
    m = sm.PHReg(c["time"], c["x"], status=c["event"], strata=site, ties="breslow").fit()
    np.testing.assert_allclose(res.released["coef"], m.params, atol=1e-6)
    np.testing.assert_allclose(res.released["se"], m.bse, atol=1e-6)


def test_cox_breslow_equals_efron_without_ties_and_pooled_equals_federated(splitter):
    c = cohort(3)
    parts = splitter(len(c["time"]), 4, 3)
    site = np.empty(len(c["time"]), dtype=int)
    for i, ix in enumerate(parts):
        site[ix] = i
    pooled = cox_ph(SurvivalData(c["time"], c["event"], covariates=c["x"], stratum=site), ties="breslow")
    fed = run_site_computed(CoxPHProtocol(["a", "b", "c"]), sites_of(c, parts, covariates="x"), 5).released
    np.testing.assert_allclose(fed["coef"], pooled.coef, atol=1e-12)
    np.testing.assert_allclose(fed["coef"], lifelines_cox(c, parts).params_.values, atol=1e-6)
    assert fed["iterations"] == pooled.iterations


def test_cox_within_site_strata_are_additive():
    c = cohort(8)
    half = len(c["time"]) // 2
    strat = np.arange(len(c["time"])) % 2
    sites = {"a": SurvivalData(c["time"][:half], c["event"][:half], covariates=c["x"][:half], stratum=strat[:half]),
             "b": SurvivalData(c["time"][half:], c["event"][half:], covariates=c["x"][half:], stratum=strat[half:])}
    fed = run_site_computed(CoxPHProtocol(["a", "b", "c"]), sites, 5).released
    combined = np.where(np.arange(len(c["time"])) < half, 0, 2) + strat
    pooled = cox_ph(SurvivalData(c["time"], c["event"], covariates=c["x"], stratum=combined))
    np.testing.assert_allclose(fed["coef"], pooled.coef, atol=1e-10)


def test_cox_singular_design_is_reported_not_crashed():
    c = cohort(2, n=60)
    x = np.column_stack([c["x"][:, 0], c["x"][:, 0] * 2.0])  # collinear
    sites = {"a": SurvivalData(c["time"][:30], c["event"][:30], covariates=x[:30]),
             "b": SurvivalData(c["time"][30:], c["event"][30:], covariates=x[30:])}
    r = run_site_computed(CoxPHProtocol(["u", "v"]), sites, 5).released
    assert r["converged"] is False
    assert "singular" in r["status"]


def test_cox_withheld_when_a_binary_level_is_small():
    c = cohort(4, n=120)
    x = c["x"].copy()
    x[:, 1] = 0.0
    x[[3, 70, 100], 1] = 1.0  # only 3 patients in the level "1" of covariate b
    sites = {"a": SurvivalData(c["time"][:60], c["event"][:60], covariates=x[:60]),
             "b": SurvivalData(c["time"][60:], c["event"][60:], covariates=x[60:])}
    r = run_site_computed(CoxPHProtocol(["a", "b", "c"]), sites, 5).released
    assert "coef" not in r and "se" not in r
    assert any("'b'" in w["reason"] for w in r["withheld"])
    r3 = run_site_computed(CoxPHProtocol(["a", "b", "c"]), sites, 1).released
    assert len(r3["coef"]) == 3


# ---------------------------------------------------------------------------- time-dependent AUC

SCORE_EDGES = np.linspace(-5, 5, 1001)


def test_td_auc_hand_computed_tiny_case():
    # Grid (0,1], (1,2], (2,3]; horizon t = 2.
    # A: 0.5 event  -> case, bin 0;  B: 0.8 censored -> drops out, censoring in bin 0
    # C: 1.8 event  -> case, bin 1;  D: 2.5 censored, E: 2.7 event, F: 5.0 (past 3: censored) -> controls
    # Censoring KM: bin 0: 6 at risk, 1 censored -> G_0 = 5/6; so w_A = 1/G(0-) = 1, w_C = 1/G_0 = 6/5.
    # Score bins (width 0.25): A 0.9 -> bin 3; C 0.4 -> 1; D 0.3 -> 1; E 0.6 -> 2; F 0.2 -> 0.
    # A beats D, E, F (V10 = 1); C ties D (1/2), loses to E, beats F (V10 = 1.5/3 = 1/2).
    # AUC = (1 * 1 + 6/5 * 1/2) / (1 + 6/5) = 1.6 / 2.2 = 8/11.
    t = np.array([0.5, 0.8, 1.8, 2.5, 2.7, 5.0])
    e = np.array([1, 0, 1, 0, 1, 1])
    s = np.array([0.9, 0.1, 0.4, 0.3, 0.6, 0.2])
    r = time_dependent_auc(t, e, s, 2.0, [0, 1, 2, 3], [0, 0.25, 0.5, 0.75, 1.0])
    assert r["n_cases"] == 2 and r["n_controls"] == 3
    assert r["weights_sum"] == pytest.approx(2.2)
    assert r["auc"][0] == pytest.approx(8 / 11, abs=1e-15)
    # Bound: half the weighted case-control pairs sharing a bin: 0.5 * (6/5 * 1) / (2.2 * 3) = 1/11;
    # on the raw scores C (0.4) beats D (0.3), so the raw AUC is (1 + 6/5 * 2/3) / 2.2 = 9/11: the bound is tight.
    assert r["grid_bound"][0] == pytest.approx(1 / 11)


@pytest.mark.parametrize("seed,n_sites", SPLITS)
def test_td_auc_federated_equals_pooled_reference(seed, n_sites, splitter):
    c = cohort(seed, n=300)
    parts = splitter(300, n_sites, seed)
    ref = time_dependent_auc(c["time"], c["event"], c["scores"], 2.0, EDGES, SCORE_EDGES, score_names=["clin", "clin+rs"])
    res = run_site_computed(TimeDependentAUCProtocol(2.0, EDGES, SCORE_EDGES, ["clin", "clin+rs"]),
                            sites_of(c, parts, scores="scores"), 5)
    r = res.released
    assert res.n_rounds == 3
    assert r["n_cases"] == ref["n_cases"] and r["n_controls"] == ref["n_controls"]
    np.testing.assert_allclose(r["auc"], ref["auc"], atol=1e-12)
    np.testing.assert_allclose(r["se"], ref["se"], atol=1e-12)
    np.testing.assert_allclose(r["grid_bound"], ref["grid_bound"], atol=1e-12)
    assert r["comparisons"][0]["p"] == pytest.approx(ref["comparisons"][0]["p"], abs=1e-10)
    assert r["comparisons"][0]["diff_b_minus_a"] == pytest.approx(ref["auc"][1] - ref["auc"][0], abs=1e-12)


def test_td_auc_grid_bound_holds_against_raw_scores():
    c = cohort(21, n=400)
    coarse = np.linspace(-5, 5, 41)
    r = time_dependent_auc(c["time"], c["event"], c["scores"], 2.0, EDGES, coarse)
    bt, be = binned_times(c["time"], c["event"], EDGES)
    idx = np.searchsorted(EDGES, bt) - 1
    g = censoring_survival(np.bincount(idx[be == 0], minlength=12), np.bincount(idx[be == 1], minlength=12))
    case = (be == 1) & (bt <= 2.0)
    ctrl = bt > 2.0
    w = 1.0 / np.concatenate([[1.0], g])[idx[case]]
    for s in range(2):
        a, b = c["scores"][case, s], c["scores"][ctrl, s]
        psi = (a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :])
        raw = float((w[:, None] * psi).sum() / (w.sum() * ctrl.sum()))
        assert abs(raw - r["auc"][s]) <= r["grid_bound"][s] + 1e-12
        assert r["grid_bound"][s] < 0.05


def test_td_auc_ipcw_censoring_curve_equals_lifelines():
    c = cohort(9)
    bt, be = binned_times(c["time"], c["event"], EDGES)
    idx = np.searchsorted(EDGES, bt) - 1
    g = censoring_survival(np.bincount(idx[be == 0], minlength=12), np.bincount(idx[be == 1], minlength=12))
    kmf = KaplanMeierFitter().fit(bt, 1 - be)
    np.testing.assert_allclose(g, kmf.survival_function_at_times(EDGES[1:]).values, atol=1e-12)


def test_td_auc_without_censoring_reduces_to_delong():
    rng = np.random.default_rng(5)
    n = 250
    x = rng.normal(size=n)
    t = rng.exponential(np.exp(-x))
    s = np.column_stack([x + rng.normal(0, 1, n), x + rng.normal(0, 0.6, n)])
    r = time_dependent_auc(t, np.ones(n), s, 1.0, EDGES, SCORE_EDGES)
    y = (t <= 1.0).astype(int)
    sb = [bin_scores(s[:, i], SCORE_EDGES).astype(float) for i in range(2)]
    dl = delong_test(y, sb[0], sb[1])
    assert r["auc"] == pytest.approx([dl.auc_a, dl.auc_b], abs=1e-12)
    assert r["se"][0] ** 2 == pytest.approx(dl.var_a, rel=1e-10)
    assert r["cov"][0, 1] == pytest.approx(dl.cov, rel=1e-10)
    assert r["comparisons"][0]["p"] == pytest.approx(dl.p, rel=1e-8)


def test_td_auc_withheld_when_cases_are_few():
    c = cohort(1, n=80)
    t = c["time"].copy()
    t[:] = np.maximum(t, 2.01)
    t[[0, 1, 2]] = 0.3  # 3 cases at most before the horizon
    ev = c["event"].copy()
    ev[[0, 1, 2]] = 1
    sites = {"a": SurvivalData(t[:40], ev[:40], scores=c["scores"][:40]),
             "b": SurvivalData(t[40:], ev[40:], scores=c["scores"][40:])}
    r = run_site_computed(TimeDependentAUCProtocol(2.0, EDGES, SCORE_EDGES, ["a", "b"]), sites, 5).released
    assert "auc" not in r
    assert "cases or controls" in r["withheld"][0]["reason"]
