"""Site-computed ROC (shared.stats.sc_roc): federated == pooled pROC-style references, bounds, disclosure."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.stats import auc_ci, delong_test, net_benefit
from shared.stats.sc_common import display_edges, released_cells, run_encoded
from shared.stats.sc_roc import ROCSite
from shared.stats.sitecomputed import CohortData, merge_cells, run_plain

SEEDS = st.integers(0, 2**31 - 1)
N_SITES = st.integers(1, 8)


def sites_of(y, X, cols, parts):
    return {f"site{i}": CohortData(y[p], X[p], tuple(cols)) for i, p in enumerate(parts)}


def scores(rng, n, off_grid=False, step=100):
    y = (rng.uniform(size=n) < rng.uniform(0.25, 0.75)).astype(np.int64)
    y[0], y[1] = 0, 1
    a = np.clip(rng.normal(0.45 + 0.2 * y * rng.uniform(0.2, 1), 0.2), 0, 1)
    b = np.clip(0.6 * a + 0.4 * rng.uniform(size=n), 0, 1)
    c = np.clip(rng.uniform(size=n) * 0.5 + 0.3 * y, 0, 1)
    X = np.column_stack([a, b, c])
    if not off_grid:
        X = np.round(X * step) / step
    return y, X


@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES, step=st.sampled_from([10, 100, 10000]))
def test_grid_scores_equal_pooled_exactly(seed, n_sites, step, make_split):
    """On-grid scores: every AUC, variance and pairwise DeLong test equals the pooled computation."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 200))
    y, X = scores(rng, n, step=step)
    cols = ["a", "b", "c"]
    res = run_plain(ROCSite(cols), sites_of(y, X, cols, make_split(rng, n, n_sites)), min_count=1).result
    for i, c in enumerate(cols):
        ref = auc_ci(y, X[:, i])
        got = res.aucs[c]
        assert got.auc == pytest.approx(ref.auc, abs=1e-12)
        assert got.var == pytest.approx(ref.var, rel=1e-9, abs=1e-15)
        assert (got.lo, got.hi) == pytest.approx((ref.lo, ref.hi), abs=1e-9)
        assert (got.n_pos, got.n_neg) == (ref.n_pos, ref.n_neg)
    for a, b in [("a", "b"), ("a", "c"), ("b", "c")]:
        ref = delong_test(y, X[:, cols.index(a)], X[:, cols.index(b)])
        got = res.delong(a, b)
        assert got.cov == pytest.approx(ref.cov, rel=1e-9, abs=1e-15)
        assert got.z == pytest.approx(ref.z, rel=1e-7, abs=1e-9)
        assert got.p == pytest.approx(ref.p, rel=1e-7, abs=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES)
def test_off_grid_auc_within_tie_bound(seed, n_sites, make_split):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 400))
    y, X = scores(rng, n, off_grid=True)
    X[:, 2] = np.round(X[:, 2], 5)  # many ties within a 1e-4 bin but distinct raw values
    cols = ["a", "b", "c"]
    res = run_plain(ROCSite(cols), sites_of(y, X, cols, make_split(rng, n, n_sites)), min_count=1).result
    for i, c in enumerate(cols):
        assert abs(res.aucs[c].auc - auc_ci(y, X[:, i]).auc) <= res.tie_bound[c] + 1e-12


def test_tie_bound_is_attained_by_same_bin_pairs():
    """Two scores 3e-5 apart fall in one 1e-4 bin: the grid counts the pair half, the bound says so."""
    y = np.array([1, 0, 1, 0, 0, 1])
    s = np.array([0.50003, 0.5, 0.9, 0.1, 0.2, 0.7])
    res = run_plain(ROCSite(["s"]), {"a": CohortData(y, s[:, None], ("s",))}, min_count=1).result
    raw = auc_ci(y, s).auc
    assert raw == pytest.approx(1.0)
    assert res.aucs["s"].auc == pytest.approx(1 - 0.5 / 9)
    assert res.tie_bound["s"] == pytest.approx(0.5 / 9)


@settings(max_examples=15, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES, k=st.integers(2, 12), bins=st.sampled_from([10, 20, 100]))
def test_display_cells_hold_zero_or_k_and_give_exact_net_benefit(seed, n_sites, k, bins, make_split):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2 * k + 2, 300))
    y, X = scores(rng, n, off_grid=True)
    y[: 2 * k] = np.repeat([0, 1], k)  # at least k of each class
    cols = ["a", "b"]
    run = run_plain(ROCSite(cols, display_bins=bins), sites_of(y, X[:, :2], cols, make_split(rng, n, n_sites)),
                    min_count=k)
    edges = set(display_edges(bins).tolist())
    for i, c in enumerate(cols):
        cells = run.result.curves[c]
        for v in (*cells["n_neg"], *cells["n_pos"]):
            assert v == 0 or v >= k
        assert set(cells["lo"]) | set(cells["hi"]) <= edges
        assert cells["lo"][0] == 0.0 and cells["hi"][-1] == 1.0
        assert sum(cells["n_pos"]) == y.sum() and sum(cells["n_neg"]) == (y == 0).sum()
        nb = run.result.net_benefit(c)
        ref = net_benefit(y, X[:, i], nb["threshold"].to_numpy())
        np.testing.assert_allclose(nb["model"], ref["model"], atol=1e-12)
        np.testing.assert_allclose(nb["treat_all"], ref["treat_all"], atol=1e-12)


def test_small_class_withholds_everything():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(40, int), np.ones(4, int)]
    X = rng.uniform(size=(44, 1))
    run = run_plain(ROCSite(["s"]), {"a": CohortData(y[:20], X[:20], ("s",)), "b": CohortData(y[20:], X[20:], ("s",))},
                    min_count=5)
    rel = run.released
    assert rel["released"] is False
    assert not {"auc", "var", "cov", "curves", "n_pos", "n_neg"} & set(rel)
    assert "fewer than k=5" in rel["withheld"][0]["reason"]
    assert run.result.aucs == {}
    with pytest.raises(ValueError, match="withheld"):
        run.result.delong("s", "s")


def test_one_column_is_one_round_and_release_is_json():
    rng = np.random.default_rng(2)
    y, X = scores(rng, 50)
    run = run_plain(ROCSite(["a"]), {"s": CohortData(y, X[:, :1], ("a",))}, min_count=5)
    assert run.rounds == 1
    json.dumps(run.released, allow_nan=False)


@pytest.mark.parametrize("n_sites", [3, 8])
def test_fixed_point_encoding_and_persistence_keep_results(n_sites, make_split):
    """Through the secagg ring encoding and a JSON/array round trip of the state, results agree."""
    rng = np.random.default_rng(n_sites)
    y, X = scores(rng, 300, off_grid=True)
    cols = ["a", "b", "c"]
    sites = sites_of(y, X, cols, make_split(rng, 300, n_sites))
    plain = run_plain(ROCSite(cols), sites, min_count=5).result
    enc = run_encoded(ROCSite(cols), sites, min_count=5).result
    for c in cols:
        assert enc.aucs[c].auc == plain.aucs[c].auc  # counts are exact integers in the ring
        assert enc.aucs[c].var == pytest.approx(plain.aucs[c].var, rel=1e-12)
    np.testing.assert_allclose(enc.cov, plain.cov, rtol=1e-8, atol=1e-14)
    assert enc.curves == plain.curves


def test_released_cells_repair_merge_cells_remainder():
    """A short remainder joining a cell that held 0 of a class must not leave (0, k) there."""
    counts = np.array([[5, 5], [0, 5], [2, 0]])
    assert merge_cells(counts, 5) == [(0, 3)]  # the remainder (2 of class 0) is merged leftwards
    assert released_cells(counts, 5) == [(0, 3)]
    assert released_cells(np.array([[3, 9]]), 5) is None
