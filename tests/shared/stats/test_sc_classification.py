"""Site-computed threshold metrics, calibration, decision curve and cohort summary vs pooled references."""

from __future__ import annotations

from dataclasses import astuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.stats import binary_metrics, calibration, net_benefit
from shared.stats.sc_classification import CalibrationSite, NetBenefitSite, ThresholdMetricsSite, round_row
from shared.stats.sc_cohort import CohortSummarySite
from shared.stats.sc_common import run_encoded
from shared.stats.sitecomputed import CohortData, run_plain

SEEDS = st.integers(0, 2**31 - 1)
N_SITES = st.integers(1, 8)


def sites_of(y, p, parts, name="p"):
    return {f"site{i}": CohortData(y[q], p[q, None], (name,)) for i, q in enumerate(parts)}


def probs(rng, n):
    y = (rng.uniform(size=n) < rng.uniform(0.25, 0.75)).astype(np.int64)
    y[0], y[1] = 0, 1
    p = np.clip(rng.normal(0.4 + 0.25 * y, 0.2), 0, 1)
    return y, p


# -- threshold metrics -------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES, j=st.integers(1, 99))
def test_threshold_metrics_equal_pooled_when_exact(seed, n_sites, j, make_split):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 300))
    y, p = probs(rng, n)
    p[: n // 3] = np.round(p[: n // 3], 2)  # some scores exactly on thresholds
    run = run_plain(ThresholdMetricsSite("p", j / 100), sites_of(y, p, make_split(rng, n, n_sites)), min_count=1)
    assert run.result.approx is False
    got, ref = astuple(run.result.metrics), astuple(binary_metrics(y, p, j / 100))
    np.testing.assert_array_equal(np.array(got, dtype=float), np.array(ref, dtype=float))  # NaN == NaN here


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_row_rounding_never_pins_a_small_cell(k):
    """For every class total and count, the released row keeps the total, holds only 0 or >= k, and
    whenever the true row had a cell in (0, k) at least two true rows give the same release."""
    for n_c in range(k, 4 * k + 3):
        released = {a: round_row(a, n_c, k) for a in range(n_c + 1)}
        for a, r in released.items():
            assert 0 <= r <= n_c
            assert r in (0, n_c) or (r >= k and n_c - r >= k)
            small = 0 < a < k or 0 < n_c - a < k
            preimage = [b for b, rb in released.items() if rb == r]
            if small:
                assert len(preimage) >= 2, (n_c, a, r)
            else:
                assert r == a


def test_independent_base_k_rounding_would_pin_the_cell():
    """Why rows keep their totals: rounding tp and fn each to base k, with n_pos public, pins fn."""
    n_pos, k, fn = 14, 5, 2
    tp = n_pos - fn
    rnd = lambda c: k * int(np.floor(c / k + 0.5))  # noqa: E731
    consistent = [f for f in range(n_pos + 1) if rnd(f) == rnd(fn) and rnd(n_pos - f) == rnd(tp)]
    assert consistent == [fn]
    released = round_row(tp, n_pos, k)
    assert len([a for a in range(n_pos + 1) if round_row(a, n_pos, k) == released]) >= 2


def test_threshold_metrics_rounded_release():
    # positives: 2 below 0.5 (fn = 2 < k); negatives: 30 below, 10 above
    y = np.r_[np.ones(14, int), np.zeros(40, int)]
    p = np.r_[np.full(12, 0.8), np.full(2, 0.3), np.full(30, 0.2), np.full(10, 0.7)]
    run = run_plain(ThresholdMetricsSite("p", 0.5), sites_of(y, p, np.array_split(np.arange(54), 3)), min_count=5)
    rel = run.released
    assert rel["approx"] is True
    assert "rounded to base k" in rel["withheld"][0]["reason"]
    assert (rel["tp"], rel["fn"], rel["fp"], rel["tn"]) == (14, 0, 10, 30)
    m = run.result.metrics
    assert m.sensitivity == 1.0 and m.tp + m.fn == 14 and m.fp + m.tn == 40


@pytest.mark.parametrize("t", [0.0, 1.0, 0.555, 0.5 + 1e-7, -0.1, float("nan"), "0.5", True])
def test_threshold_off_grid_refused(t):
    with pytest.raises(ValueError, match="threshold"):
        ThresholdMetricsSite("p", t)


def test_threshold_metrics_withheld_for_small_class():
    y = np.r_[np.ones(3, int), np.zeros(30, int)]
    p = np.linspace(0, 1, 33)
    rel = run_plain(ThresholdMetricsSite("p", 0.5), sites_of(y, p, [np.arange(33)]), min_count=5).released
    assert rel["released"] is False and "tp" not in rel and "accuracy" not in rel


# -- calibration -------------------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES, n_bins=st.sampled_from([5, 10, 20]))
def test_calibration_equals_pooled_without_merging(seed, n_sites, n_bins, make_split):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 400))
    y, p = probs(rng, n)
    run = run_plain(CalibrationSite("p", n_bins=n_bins), sites_of(y, p, make_split(rng, n, n_sites)), min_count=1)
    got, ref = run.result.result, calibration(y, p, n_bins)
    assert run.result.merged is False
    assert got.brier == pytest.approx(ref.brier, rel=1e-12)
    assert got.ece == pytest.approx(ref.ece, rel=1e-9, abs=1e-12)
    assert got.slope == pytest.approx(ref.slope, rel=1e-8)
    assert got.intercept == pytest.approx(ref.intercept, rel=1e-8, abs=1e-10)
    assert got.slope_model_intercept == pytest.approx(ref.slope_model_intercept, rel=1e-8, abs=1e-10)
    rb = ref.bins[ref.bins["count"] > 0]
    np.testing.assert_allclose(got.bins["mean_predicted"], rb["mean_predicted"], rtol=1e-12)
    np.testing.assert_allclose(got.bins["observed_rate"], rb["observed_rate"], rtol=1e-12)
    for fit in run.result.fits.values():
        assert fit["converged"] and 1 <= fit["iterations"] <= 100 and fit["grad_norm"] < 1e-6


def test_calibration_merged_bins_hold_zero_or_k_and_encoding_agrees(make_split):
    rng = np.random.default_rng(7)
    y, p = probs(rng, 250)
    sites = sites_of(y, p, make_split(rng, 250, 5))
    run = run_plain(CalibrationSite("p"), sites, min_count=8)
    assert run.result.merged
    bins = run.result.result.bins
    neg = bins["count"] - bins["n_pos"]
    assert (((bins["n_pos"] == 0) | (bins["n_pos"] >= 8)) & ((neg == 0) | (neg >= 8))).all()
    assert bins["count"].sum() == 250
    ref = calibration(y, p)
    assert run.result.result.slope == pytest.approx(ref.slope, rel=1e-8)  # merging never touches the fits
    enc = run_encoded(CalibrationSite("p"), sites, min_count=8).result.result
    assert enc.slope == pytest.approx(ref.slope, rel=1e-8)
    assert enc.intercept == pytest.approx(ref.intercept, rel=1e-8, abs=1e-9)


def test_calibration_constant_predictions_slope_undefined():
    y = np.r_[np.ones(10, int), np.zeros(20, int)]
    p = np.full(30, 0.3)
    run = run_plain(CalibrationSite("p"), sites_of(y, p, np.array_split(np.arange(30), 3)), min_count=5)
    ref = calibration(y, p)
    assert run.result.fits["slope"]["converged"] is False
    assert "equal" in run.result.fits["slope"]["reason"]
    assert np.isnan(run.result.result.slope) and np.isnan(ref.slope)
    assert run.result.result.intercept == pytest.approx(ref.intercept, rel=1e-8)


def test_calibration_non_convergence_is_reported():
    rng = np.random.default_rng(3)
    y, p = probs(rng, 100)
    run = run_plain(CalibrationSite("p", max_iter=1), sites_of(y, p, [np.arange(100)]), min_count=5)
    fit = run.result.fits["slope"]
    assert fit["converged"] is False and fit["iterations"] == 1 and "no convergence" in fit["reason"]
    assert np.isnan(run.result.result.slope)
    assert any("did not converge" in w.reason for w in run.result.withheld)


# -- decision curve and cohort summary --------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES, k=st.integers(1, 10), bins=st.sampled_from([20, 100]))
def test_net_benefit_equals_pooled_at_released_edges(seed, n_sites, k, bins, make_split):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3 * k + 3, 300))
    y, p = probs(rng, n)
    y[: 2 * k] = np.repeat([0, 1], k)
    run = run_plain(NetBenefitSite("p", bins), sites_of(y, p, make_split(rng, n, n_sites)), min_count=k)
    curve = run.result.curve
    ref = net_benefit(y, p, curve["threshold"].to_numpy())
    np.testing.assert_allclose(curve["model"], ref["model"], atol=1e-12)
    for v in (*run.result.cells["n_neg"], *run.result.cells["n_pos"]):
        assert v == 0 or v >= k


def test_cohort_summary():
    y = np.r_[np.ones(6, int), np.zeros(9, int)]
    sites = sites_of(y, np.zeros(15), np.array_split(np.arange(15), 3))
    assert run_plain(CohortSummarySite(), sites, min_count=5).result.n == 15
    rel = run_plain(CohortSummarySite(), sites, min_count=7).released
    assert rel["released"] is False and "n_pos" not in rel and "n_neg" not in rel


def test_calibration_separation_fails_fast_and_is_reported():
    """Predictions that order the outcome perfectly: the ML slope does not exist (the pooled
    reference raises); the site protocol reports the failed fit after a few rounds."""
    rng = np.random.default_rng(8)
    y = np.r_[np.ones(30, int), np.zeros(30, int)]
    p = np.r_[rng.uniform(0.6, 0.9, 30), rng.uniform(0.1, 0.4, 30)]
    with pytest.raises(ValueError, match="separat|converge|singular"):
        calibration(y, p)
    run = run_plain(CalibrationSite("p"), sites_of(y, p, np.array_split(np.arange(60), 3)), min_count=5)
    fit = run.result.fits["slope"]
    assert fit["converged"] is False and fit["iterations"] < 30
    assert "separation" in fit["reason"] or "singular" in fit["reason"]
    assert run.rounds < 40 and np.isnan(run.result.result.slope)
