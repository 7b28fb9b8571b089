"""Federated Spearman: exact on grid-snapped values, certified bound against raw values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from shared.stats.correlation import (
    SpearmanProtocol,
    bin_features,
    redundancy_filter,
    spearman_binned,
)
from shared.stats.sc_legacy import run_site_computed

SPLITS = [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]


def features(seed: int, n: int = 300) -> np.ndarray:
    """Radiomics-like columns: normal, log-normal (skewed), cubic (heavy tails), near-duplicate, discrete."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    return np.column_stack([z[:, 0], np.exp(1.5 * z[:, 0] + 0.4 * z[:, 1]), z[:, 1] ** 3,
                            z[:, 0] + 0.05 * z[:, 2], rng.integers(0, 4, n), z[:, 2]])


NAMES = [f"f{i}" for i in range(6)]


@pytest.mark.parametrize("seed,n_sites", SPLITS)
def test_federated_equals_spearman_of_grid_snapped_pooled_values(seed, n_sites, splitter):
    x = features(seed)
    parts = splitter(x.shape[0], n_sites, seed)
    res = run_site_computed(SpearmanProtocol(NAMES, n_bins=256), {f"s{i}": x[ix] for i, ix in enumerate(parts)}, 5)
    ref = spearman_binned(x, n_bins=256)
    assert res.n_rounds == 4
    np.testing.assert_allclose(res.released["rho"], ref["rho"], atol=1e-12)
    np.testing.assert_allclose(res.released["rho"], spearmanr(bin_features(x, ref["edges"])).statistic, atol=1e-12)
    np.testing.assert_allclose(res.released["bound"], ref["bound"], atol=1e-12)


@pytest.mark.parametrize("refine", [False, True])
@pytest.mark.parametrize("n_bins", [16, 64, 1024])
def test_bound_holds_against_raw_spearman(n_bins, refine):
    for seed in range(3):
        x = features(seed)
        ref = spearman_binned(x, n_bins=n_bins, refine=refine)
        raw = spearmanr(x).statistic
        assert np.all(np.abs(raw - ref["rho"]) <= ref["bound"] + 1e-12)


def test_refined_grid_tightens_the_bound_on_skewed_features():
    x = features(7)
    coarse = spearman_binned(x, n_bins=256, refine=False)["bound"]
    fine = spearman_binned(x, n_bins=256, refine=True)["bound"]
    continuous = [0, 1, 2, 3, 5]
    sub = np.ix_(continuous, continuous)
    assert fine[sub].max() < 0.05
    assert fine[sub].max() < coarse[sub].max()


def test_redundancy_filter_keeps_higher_priority_and_flags_ambiguous():
    rho = np.array([[1.0, 0.97, 0.2], [0.97, 1.0, 0.1], [0.2, 0.1, 1.0]])
    out = redundancy_filter(rho, 0.95, priority=[0.81, 0.92, 0.9])
    assert out["kept"] == [1, 2] and out["dropped"] == {0: 1}
    out2 = redundancy_filter(rho, 0.95, bound=np.full((3, 3), 0.03))
    assert (0, 1) in out2["ambiguous"]


def test_spearman_withheld_below_min_count():
    x = features(1, n=8)
    res = run_site_computed(SpearmanProtocol(NAMES), {"a": x[:4], "b": x[4:]}, 10)
    assert "rho" not in res.released
    assert "min_count=10" in res.released["withheld"][0]["reason"]
