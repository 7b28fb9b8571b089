"""The legacy server-driven fusion protocol (shared.fusion.legacy), kept until the pipeline switches.

Only what the pipeline still relies on: it fits, its final fit is the pooled optimum, a small-class
site is excluded, and the model travels. The site-computed protocol is tested in test_fusion.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from shared.fusion import FusionSVMProtocol, SVMModel, models_from_payload, models_to_payload, rff, site_folds
from shared.stats import run_protocol


def cohort(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, 5)) + 0.7 * y[:, None] * np.array([1.0, 0.8, 0.5, 0.0, 0.3]) + shift
    return X, y


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    parts = [cohort(rng, n, s) for n, s in ((90, 0.0), (70, 0.3), (60, -0.2))]
    return {s: (p[1], *p[0].T) for s, p in zip("abc", parts, strict=True)}


def test_final_fit_is_the_pooled_optimum(data):
    res = run_protocol(FusionSVMProtocol(5, [1.0], [1.0], n_components=32, n_folds=3, seed=2), data)
    m: SVMModel = res.result
    X = np.vstack([np.column_stack(v[1:]) for v in data.values()])
    y = np.concatenate([v[0] for v in data.values()])
    Z = np.column_stack([rff((X - m.mean) / m.scale, m.omega, m.offset), np.ones(len(y))])
    ys = 2.0 * y - 1

    def objective(w):
        slack = np.maximum(0.0, 1 - ys * (Z @ w))
        return 0.5 * w[:-1] @ w[:-1] + slack @ slack

    ref = minimize(objective, np.zeros(Z.shape[1]), method="L-BFGS-B", options={"gtol": 1e-10, "maxiter": 5000})
    w_fed = np.concatenate([m.coef, [m.intercept]])
    assert objective(w_fed) <= ref.fun + 1e-6
    assert m.kernel == "rff"
    m2 = models_from_payload(*models_to_payload({"FDL": m}))["FDL"]
    np.testing.assert_array_equal(m2.predict_proba(X), m.predict_proba(X))


def test_small_class_site_is_excluded_and_recorded(data):
    rng = np.random.default_rng(0)
    sites = dict(data)
    sites["tiny"] = (np.array([1, 0, 0, 0, 0, 0]), *rng.normal(size=(6, 5)).T)  # one responder
    res = run_protocol(FusionSVMProtocol(5, [1.0], [1.0], n_components=16, n_folds=3, seed=1, min_count=3), sites)
    assert any(s.site == "tiny" for s in res.suppressed)
    assert res.bytes_sent["tiny"] <= 4 * 8 * res.n_rounds  # round, min_count and the exclusion flags only


def test_site_folds_stratified_and_seeded():
    y = np.array([0] * 23 + [1] * 12)
    f = site_folds(y, 5, 7, "a")
    assert np.array_equal(f, site_folds(y, 5, 7, "a"))
    assert not np.array_equal(f, site_folds(y, 5, 7, "b"))
    for c in (0, 1):
        counts = np.bincount(f[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1
