"""Federated RFF-SVM (shared.fusion): estimator conventions, pooled equivalence, disclosure, SHAP."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.metrics import roc_auc_score

from shared.fusion import (
    FederatedSVC,
    FusionSVMProtocol,
    PooledSVC,
    SVMModel,
    models_from_payload,
    models_to_payload,
    rff,
    shapley_values,
    site_folds,
)
from shared.stats import run_protocol


def cohort(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, 5)) + 0.7 * y[:, None] * np.array([1.0, 0.8, 0.5, 0.0, 0.3]) + shift
    X[:, 3] += 0.6 * np.sin(2 * X[:, 0]) * y  # some non-linearity
    return X, y


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    parts = [cohort(rng, n, s) for n, s in ((90, 0.0), (70, 0.3), (60, -0.2))]
    X = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    sites = np.repeat(["a", "b", "c"], [90, 70, 60])
    Xt, yt = cohort(rng, 800)
    return X, y, sites, Xt, yt


@pytest.fixture(scope="module")
def fitted(data):
    X, y, sites, _, _ = data
    return FederatedSVC(min_count=3, seed=1).fit(X, y, sites)


def test_estimator_conventions(fitted, data):
    X, y, sites, Xt, _ = data
    est = FederatedSVC(min_count=3, seed=1)
    assert not hasattr(est, "model_")
    assert est.fit(X, y, sites) is est
    for attr in ("model_", "C_", "gamma_", "cv_auc_", "cv_results_", "n_rounds_", "bytes_sent_", "classes_"):
        assert hasattr(est, attr), attr
    proba = est.predict_proba(Xt)
    assert proba.shape == (len(Xt), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert set(np.unique(est.predict(Xt))) <= {0, 1}
    assert est.C_ in est.C_grid and len(est.cv_results_) == 9
    assert set(est.bytes_sent_) == {"a", "b", "c"}


def test_deterministic(fitted, data):
    X, y, sites, Xt, _ = data
    again = FederatedSVC(min_count=3, seed=1).fit(X, y, sites)
    np.testing.assert_array_equal(again.model_.coef, fitted.model_.coef)


def test_final_fit_is_the_pooled_optimum(data):
    """With one candidate, the federated final fit minimises the pooled squared-hinge objective."""
    X, y, sites, _, _ = data
    est = FederatedSVC(C_grid=[1.0], gamma_factors=[1.0], n_components=32, seed=2).fit(X, y, sites)
    m = est.model_
    Z = np.column_stack([rff((X - m.mean) / m.scale, m.omega, m.offset), np.ones(len(y))])
    ys = 2.0 * y - 1

    def objective(w):
        slack = np.maximum(0.0, 1 - ys * (Z @ w))
        return 0.5 * w[:-1] @ w[:-1] + 1.0 * slack @ slack

    ref = minimize(objective, np.zeros(Z.shape[1]), method="L-BFGS-B", options={"gtol": 1e-10, "maxiter": 5000})
    w_fed = np.concatenate([m.coef, [m.intercept]])
    assert objective(w_fed) <= ref.fun + 1e-6
    np.testing.assert_allclose(w_fed, ref.x, atol=1e-3)
    # standardisation is the pooled one
    np.testing.assert_allclose(m.mean, X.mean(axis=0))
    np.testing.assert_allclose(m.scale, X.std(axis=0))


def test_close_to_sklearn_svc(fitted, data):
    X, y, _, Xt, yt = data
    ref = PooledSVC(seed=1).fit(X, y)
    auc_fed = roc_auc_score(yt, fitted.predict_proba(Xt)[:, 1])
    auc_ref = roc_auc_score(yt, ref.predict_proba(Xt)[:, 1])
    assert auc_ref > 0.7
    assert abs(auc_fed - auc_ref) <= 0.02, (auc_fed, auc_ref)
    # Platt scaling: probabilities are calibrated-ish (mean close to prevalence) and increase with f
    p = fitted.model_.predict_proba(Xt)
    assert abs(p.mean() - yt.mean()) < 0.1
    f = fitted.decision_function(Xt)
    assert np.all(np.diff(p[np.argsort(f)]) >= -1e-12)


def test_site_folds_stratified_and_seeded():
    y = np.array([0] * 23 + [1] * 12)
    f = site_folds(y, 5, 7, "a")
    assert np.array_equal(f, site_folds(y, 5, 7, "a"))
    assert not np.array_equal(f, site_folds(y, 5, 7, "b"))
    for c in (0, 1):
        counts = np.bincount(f[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1


def test_small_class_site_is_excluded_and_recorded(data):
    X, y, sites, _, _ = data
    rng = np.random.default_rng(0)
    tiny_X = rng.normal(size=(6, 5))
    tiny_y = np.array([1, 0, 0, 0, 0, 0])  # one responder
    sites_data = {s: (y[sites == s], *X[sites == s].T) for s in ("a", "b", "c")}
    sites_data["tiny"] = (tiny_y, *tiny_X.T)
    res = run_protocol(FusionSVMProtocol(5, seed=1, min_count=3), sites_data)
    assert any(s.site == "tiny" for s in res.suppressed)
    assert res.bytes_sent["tiny"] <= 4 * 8 * res.n_rounds  # round, min_count and the exclusion flags only


def test_bad_input_names_the_site(data):
    X, y, sites, _, _ = data
    Xbad = X.copy()
    Xbad[sites == "b"][0, 0] = np.nan
    Xbad[np.flatnonzero(sites == "b")[0], 0] = np.nan
    with pytest.raises(ValueError, match="at b"):
        FederatedSVC().fit(Xbad, y, sites)
    with pytest.raises(ValueError, match="0/1"):
        FederatedSVC().fit(X, y + 1, sites)


def test_too_few_patients_for_cv():
    X = np.random.default_rng(0).normal(size=(8, 2))
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="cross-validation"):
        FederatedSVC(n_folds=5).fit(X, y)


def test_payload_roundtrip(fitted, data):
    Xt = data[3]
    m = fitted.model_
    m2 = models_from_payload(*models_to_payload({"FDL": m}))["FDL"]
    np.testing.assert_array_equal(m2.predict_proba(Xt), m.predict_proba(Xt))
    with pytest.raises(ValueError, match="columns"):
        m.predict_proba(Xt[:, :3])


def test_shapley_efficiency_and_dummy(fitted, data):
    m: SVMModel = fitted.model_
    Xt = data[3][:20].copy()
    base = m.mean
    Xt[:, 2] = base[2]  # at the baseline: contributes nothing
    phi = shapley_values(m, Xt, base)
    np.testing.assert_allclose(phi.sum(axis=1), m.predict_proba(Xt) - m.predict_proba(base[None])[0], atol=1e-12)
    np.testing.assert_allclose(phi[:, 2], 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="12"):
        shapley_values(m, np.zeros((1, 13)), np.zeros(13))
