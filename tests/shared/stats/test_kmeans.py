"""Federated k-means == pooled Lloyd from the same start; CH == scikit-learn; contingency under control."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2_contingency
from sklearn.cluster import KMeans
from sklearn.metrics import calinski_harabasz_score

from shared.stats.kmeans import (
    ContingencyProtocol,
    KMeansProtocol,
    assign,
    contingency_test,
    kmeans_select,
)
from shared.stats.sc_legacy import run_site_computed

SPLITS = [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]
NAMES = [f"f{i}" for i in range(5)]


def blobs(seed: int, n: int = 240, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (k, 5))
    lab = rng.integers(0, k, n)
    x = centers[lab] + rng.normal(size=(n, 5))
    x[:, 1] = x[:, 1] * 100 + 50  # a feature on another scale: standardisation matters
    return x, lab


@pytest.mark.parametrize("seed,n_sites", SPLITS)
def test_federated_kmeans_equals_pooled_lloyd_from_same_start(seed, n_sites, splitter):
    x, _ = blobs(seed)
    parts = splitter(x.shape[0], n_sites, seed)
    res = run_site_computed(KMeansProtocol(NAMES, ks=(2, 3, 4, 5)), {f"s{i}": x[ix] for i, ix in enumerate(parts)}, 5)
    ref = kmeans_select(x, ks=(2, 3, 4, 5))
    for k in (2, 3, 4, 5):
        np.testing.assert_allclose(res.state["inits"][str(k)], ref["inits"][k], atol=1e-12)
        fit = res.state["fits"][str(k)]
        np.testing.assert_allclose(fit["centroids"], ref["fits"][k]["centroids"], atol=1e-12)
        assert fit["counts"] == ref["fits"][k]["counts"].tolist()
        assert fit["iterations"] == ref["fits"][k]["iterations"]
        labels = np.empty(x.shape[0], dtype=int)
        for ix in parts:
            labels[ix] = assign(x[ix], res.state, k)
        np.testing.assert_array_equal(labels, ref["fits"][k]["labels"])
        assert fit["calinski_harabasz"] == pytest.approx(ref["fits"][k]["calinski_harabasz"], rel=1e-10)
    assert res.released["best_k"] == ref["best_k"]


def test_pooled_lloyd_equals_sklearn_and_ch_equals_sklearn():
    x, truth = blobs(11)
    ref = kmeans_select(x, ks=(2, 3, 4))
    z = (x - ref["mean"]) / ref["scale"]
    for k, fit in ref["fits"].items():
        sk = KMeans(k, init=ref["inits"][k], n_init=1, algorithm="lloyd", tol=0.0, max_iter=100).fit(z)
        np.testing.assert_array_equal(sk.labels_, fit["labels"])
        np.testing.assert_allclose(sk.cluster_centers_, fit["centroids"], atol=1e-12)
        assert fit["calinski_harabasz"] == pytest.approx(calinski_harabasz_score(z, fit["labels"]), rel=1e-10)
    assert ref["best_k"] == 3  # three generating blobs
    agree = max(np.mean(ref["fits"][3]["labels"] == np.array(p)[truth])
                for p in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]))
    assert agree > 0.95


def test_release_withholds_clusterings_with_small_clusters():
    x, _ = blobs(4, n=120)
    x[:2] += 40.0  # two far outliers: some k isolate them in a cluster of 2
    res = run_site_computed(KMeansProtocol(NAMES, ks=(2, 3, 4, 5)), {"a": x[:60], "b": x[60:]}, 5)
    per_k = res.released["per_k"]
    eligible = {}
    for k, fit in res.state["fits"].items():  # the state (never sent) holds every clustering's sizes
        counts = np.array(fit["counts"])
        eligible[k] = not np.any((counts > 0) & (counts < 5))
        assert per_k[k]["eligible"] is eligible[k]
        if not eligible[k]:
            assert per_k[k]["counts"] is None
            assert any(w["quantity"] == f"kmeans.k{k}" for w in res.released["withheld"])
    assert not all(eligible.values())
    ok = [int(k) for k, v in eligible.items() if v]
    if ok:
        best = max(ok, key=lambda k: (per_k[str(k)]["calinski_harabasz"], -k))
        assert res.released["best_k"] == best
        counts = np.array(res.released["counts"])
        assert not np.any((counts > 0) & (counts < 5))
        # Released centroids are in original units (the x100 feature is back on its scale).
        assert np.abs(np.array(res.released["centroids"])[:, 1]).max() > 20
    else:
        assert res.released["best_k"] is None and "centroids" not in res.released


@pytest.mark.parametrize("seed,n_sites", SPLITS[:3])
def test_contingency_federated_equals_scipy(seed, n_sites, splitter):
    rng = np.random.default_rng(seed)
    sub = rng.integers(0, 3, 200)
    resp = (rng.random(200) < np.array([0.2, 0.5, 0.7])[sub]).astype(int)
    parts = splitter(200, n_sites, seed)
    res = run_site_computed(ContingencyProtocol([0, 1, 2], [0, 1]),
                            {f"s{i}": {"rows": sub[ix], "cols": resp[ix]} for i, ix in enumerate(parts)}, 5)
    ref = contingency_test(sub, resp, [0, 1, 2], [0, 1])
    chi2, p, dof, _ = chi2_contingency(ref["table"], correction=False)
    assert res.released["table"] == ref["table"].astype(int).tolist()
    assert res.released["chi2"] == pytest.approx(chi2, rel=1e-12)
    assert res.released["p"] == pytest.approx(p, rel=1e-10)
    assert res.released["df"] == dof


def test_contingency_small_cell_withholds_table_and_test():
    sub = np.array([0] * 30 + [1] * 30 + [2] * 3)
    resp = np.array([0, 1] * 15 + [0, 1] * 15 + [1, 1, 1])
    res = run_site_computed(ContingencyProtocol([0, 1, 2], [0, 1], per_site=["a", "b"]),
                            {"a": {"rows": sub[:40], "cols": resp[:40], "site": "a"},
                             "b": {"rows": sub[40:], "cols": resp[40:], "site": "b"}}, 5)
    r = res.released
    assert "table" not in r and "chi2" not in r
    assert r["col_totals"] == [30, 33]
    assert "row_totals" not in r  # subtype 2 has 3 patients
    assert r["per_site"]["a"] == [30, 10, 0] and r["per_site"]["b"] is None
    assert {w["quantity"] for w in r["withheld"]} >= {"contingency.table", "contingency.row_totals",
                                                      "contingency.per_site.b"}
