"""Site-computed fusion SVM (shared.fusion): estimator conventions, pooled optimum, folds on site,
parameter bounds a server cannot leave, disclosure, convergence, SHAP sums, payload."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from shared.fusion import (
    FederatedSVC,
    FusionSVMSite,
    PooledSVC,
    ShapSumsSite,
    SVMModel,
    assign_folds,
    models_from_payload,
    models_to_payload,
    shapley_values,
)
from shared.fusion.model import FeatureMap
from shared.fusion.newton import INTERCEPT_RIDGE
from shared.stats.sitecomputed import CohortData, check_contribution, run_plain

COLS = ["a", "b", "c", "d", "e"]
SMALL = {"C_grid": [0.1, 1.0], "gamma_factors": [0.5, 2.0], "n_components": 48, "n_folds": 3, "min_count": 3}


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


def site_data(X, y, sites, cols=COLS) -> dict[str, CohortData]:
    return {s: CohortData(y[sites == s], X[sites == s], tuple(cols),
                          {"patient_id": [f"{s}-{i}" for i in range((sites == s).sum())], "site": s})
            for s in dict.fromkeys(sites.tolist())}


@pytest.fixture(scope="module")
def fitted(data):
    X, y, sites, _, _ = data
    return FederatedSVC(**SMALL, seed=1).fit(X, y, sites)


# --------------------------------------------------------------------------- estimator
def test_estimator_conventions(fitted, data):
    X, y, sites, Xt, _ = data
    est = FederatedSVC(**SMALL, seed=1)
    assert not hasattr(est, "model_")
    assert clone(est).get_params() == est.get_params()
    assert est.fit(X, y, sites) is est
    for attr in ("model_", "fit_", "C_", "gamma_", "cv_auc_", "cv_results_", "convergence_", "n_folds_",
                 "n_rounds_", "bytes_sent_", "classes_", "n_features_in_"):
        assert hasattr(est, attr), attr
    proba = est.predict_proba(Xt)
    assert proba.shape == (len(Xt), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert set(np.unique(est.predict(Xt))) <= {0, 1}
    assert est.C_ in SMALL["C_grid"] and len(est.cv_results_) == 4
    assert set(est.bytes_sent_) == {"a", "b", "c"} and min(est.bytes_sent_.values()) > 0


def test_deterministic_and_independent_of_row_order(fitted, data):
    X, y, sites, Xt, _ = data
    ids = np.array([f"p{i}" for i in range(len(y))])
    a = FederatedSVC(**SMALL, seed=1).fit(X, y, sites, patient_ids=ids)
    perm = np.random.default_rng(0).permutation(len(y))
    b = FederatedSVC(**SMALL, seed=1).fit(X[perm], y[perm], sites[perm], patient_ids=ids[perm])
    # the folds follow the patient ids, not the row order: the same model up to summation order
    assert (a.C_, a.gamma_) == (b.C_, b.gamma_)
    np.testing.assert_allclose(a.decision_function(Xt), b.decision_function(Xt), atol=1e-7)
    c = FederatedSVC(**SMALL, seed=1).fit(X, y, sites, patient_ids=ids)
    np.testing.assert_array_equal(a.model_.coef, c.model_.coef)


@pytest.mark.parametrize(("loss", "kernel"), [("squared_hinge", "landmarks"), ("huber_hinge", "landmarks"),
                                              ("squared_hinge", "rff")])
def test_final_fit_is_the_pooled_optimum(data, loss, kernel):
    """With one candidate, the federated final fit minimises the pooled objective (checked with scipy)."""
    X, y, sites, _, _ = data
    est = FederatedSVC(C_grid=[1.0], gamma_factors=[1.0], n_components=32, n_folds=3, seed=2, min_count=3,
                       loss=loss, huber_h=0.2, kernel=kernel).fit(X, y, sites)
    m = est.model_
    np.testing.assert_allclose(m.mean, X.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(m.scale, X.std(axis=0), rtol=1e-9)
    fmap = (FeatureMap("landmarks", [m.gamma], m.omega) if kernel == "landmarks"
            else FeatureMap.from_seed(kernel, 5, 32, 2, [m.gamma]))
    Z = np.column_stack([fmap.features((X - m.mean) / m.scale, 0), np.ones(len(y))])
    ys = 2.0 * y - 1
    h = 0.2

    def objective(w):
        s = 1 - ys * (Z @ w)
        if loss == "squared_hinge":
            loss_i = np.maximum(s, 0.0) ** 2
        else:
            loss_i = np.where(s > h, s, np.where(np.abs(s) <= h, (s + h) ** 2 / (4 * h), 0.0))
        return 0.5 * w[:-1] @ w[:-1] + 0.5 * INTERCEPT_RIDGE * w[-1] ** 2 + loss_i.sum()

    ref = minimize(objective, np.zeros(Z.shape[1]), method="L-BFGS-B", options={"gtol": 1e-11, "maxiter": 20000})
    # the released model is a kernel expansion; evaluate it on the pooled rows and compare decision values
    f_fed = m.decision_function(X)
    f_ref = Z @ ref.x
    w_fed = np.linalg.lstsq(Z, f_fed, rcond=None)[0]
    assert objective(w_fed) <= ref.fun + 1e-6 * max(1.0, ref.fun)
    np.testing.assert_allclose(f_fed, f_ref, atol=2e-3)
    assert m.convergence["final_converged"] and m.convergence["final_grad_norm"] < 1e-6


def test_close_to_sklearn_svc(fitted, data):
    X, y, sites, Xt, yt = data
    est = FederatedSVC(n_folds=3, seed=1, min_count=3).fit(X, y, sites)
    ref = PooledSVC(n_folds=3, seed=1).fit(X, y)
    auc_fed = roc_auc_score(yt, est.predict_proba(Xt)[:, 1])
    auc_ref = roc_auc_score(yt, ref.predict_proba(Xt)[:, 1])
    assert auc_ref > 0.7
    assert abs(auc_fed - auc_ref) <= 0.01, (auc_fed, auc_ref)
    # Platt scaling: probabilities increase with f and their mean is near the prevalence
    p = est.model_.predict_proba(Xt)
    assert abs(p.mean() - yt.mean()) < 0.1
    f = est.decision_function(Xt)
    assert np.all(np.diff(p[np.argsort(f)]) >= -1e-12)


# --------------------------------------------------------------------------- folds on site
def test_folds_follow_the_keyed_hash_and_are_stable_across_processes():
    ids = [f"pt-{i}" for i in range(37)]
    y = np.array([0, 1] * 18 + [1])
    here = assign_folds(ids, y, 5, 11)
    code = ("import json, numpy as np; from shared.fusion import assign_folds; "
            f"print(json.dumps(assign_folds({ids!r}, np.array({y.tolist()!r}), 5, 11).tolist()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                      env=env).stdout)
    assert here.tolist() == there
    assert not np.array_equal(here, assign_folds(ids, y, 5, 12))  # the seed changes them
    perm = np.random.default_rng(1).permutation(37)  # row order does not
    assert np.array_equal(assign_folds([ids[i] for i in perm], y[perm], 5, 11), here[perm])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n0=st.integers(0, 40), n1=st.integers(0, 40), k=st.integers(2, 10))
def test_no_seed_makes_an_unbalanced_fold(seed, n0, n1, k):
    """Whatever seed a server picks, each class is spread evenly: every fold gets floor or ceil of n/K."""
    y = np.array([0] * n0 + [1] * n1)
    f = assign_folds([f"id{i}" for i in range(y.size)], y, k, seed)
    for c, n in ((0, n0), (1, n1)):
        counts = np.bincount(f[y == c], minlength=k)
        assert counts.min() == n // k and counts.max() == -(-n // k)


# --------------------------------------------------------------------------- what a server may ask
@pytest.mark.parametrize("bad", [
    {"cv_folds": 1000}, {"cv_folds": 1}, {"n_components": 4096}, {"C_grid": [1e9]}, {"C_grid": []},
    {"gamma_factors": [0.0]}, {"loss": "hinge"}, {"max_iter": 1000}, {"seed": -1}, {"min_count": 0},
    {"kernel": "exact"}, {"huber_h": 5.0}, {"C_grid": [float("nan")]}, {"cv_folds": True},
    {"C_grid": [0.1 * i + 0.1 for i in range(8)], "gamma_factors": [0.5 * i + 0.5 for i in range(8)],
     "n_components": 1024, "cv_folds": 10},
])
def test_parameters_outside_the_allowed_ranges_are_refused(bad):
    with pytest.raises(ValueError):
        FusionSVMSite(COLS, **bad)


@pytest.mark.parametrize("extra", [{"omega": [[1.0]]}, {"folds": [0, 1, 2]}, {"weights": [0.0]}, {"mean": [0.0]}])
def test_a_server_cannot_pass_folds_omega_or_iterates(extra):
    with pytest.raises(TypeError):
        FusionSVMSite.from_params({"columns": COLS, **extra})


def test_a_thousand_folds_is_refused_before_any_data_is_read():
    with pytest.raises(ValueError, match="cv_folds"):
        FusionSVMSite.from_params({"columns": COLS, "cv_folds": 1000})


def test_folds_hold_k_per_class_in_the_consortium_or_fewer_folds_are_used(data):
    X, y, sites, _, _ = data
    rng = np.random.default_rng(5)
    keep = np.concatenate([np.flatnonzero(y == 0), rng.choice(np.flatnonzero(y == 1), 14, replace=False)])
    Xs, ys, ss = X[keep], y[keep], sites[keep]  # 14 positives: 5 folds of >= 3 fail, 4 folds hold 3-4
    proto = FusionSVMSite(COLS, [1.0], [1.0], "landmarks", 16, 5, "squared_hinge", seed=0, min_count=4)
    run = run_plain(proto, site_data(Xs, ys, ss), min_count=4)
    fit = run.result
    assert fit.fitted
    assert fit.counts["n_folds"] < 5 and fit.counts["min_fold_pos"] >= 4
    assert any("instead of 5-fold" in n for n in fit.notes)
    # fewer than k positives per fold even with 2 folds: refused, with the reason
    few = np.concatenate([np.flatnonzero(ys == 0), np.flatnonzero(ys == 1)[:7]])
    run = run_plain(FusionSVMSite(COLS, [1.0], [1.0], "landmarks", 16, 5, seed=0, min_count=4),
                    site_data(Xs[few], ys[few], ss[few]), min_count=4)
    assert not run.released["released"] and "fold" in run.released["reason"]
    assert "model" not in run.released and not run.result.fitted
    with pytest.raises(ValueError, match="refused: .*fold"):
        FederatedSVC([1.0], [1.0], 16, 5, 0, 4).fit(Xs[few], ys[few], ss[few])


def test_release_rechecks_the_sites_own_floor(data):
    """A server that builds the folds for k=2 gets nothing from sites whose floor is 30."""
    X, y, sites, _, _ = data
    proto = FusionSVMSite(COLS, [1.0], [1.0], "landmarks", 16, 5, "squared_hinge", seed=0, min_count=2)
    run = run_plain(proto, site_data(X, y, sites), min_count=30)
    assert not run.released["released"]
    assert "k=30" in run.released["reason"] and "model" not in run.released
    assert json.dumps(run.released)


def test_layout_depends_on_state_not_data_and_contributions_fit_their_bounds(data):
    X, y, sites, _, _ = data
    proto = FusionSVMSite(COLS, [0.1, 10.0], [1.0], "landmarks", 24, 3, "huber_hinge", seed=4, min_count=3)
    sd = site_data(X, y, sites)
    rng = np.random.default_rng(9)
    other = CohortData(rng.integers(0, 2, 11), rng.normal(size=(11, 5)) * 50, tuple(COLS),
                       {"patient_id": [str(i) for i in range(11)]})
    state = proto.init_state()
    phases = set()
    for _ in range(proto.max_rounds):
        parts = [proto.local(d, state) for d in sd.values()]
        alien = proto.local(other, state)
        for c in [*parts, alien]:
            check_contribution(proto, state, c)
            assert {k: v.shape for k, v in c.items()} == {k: v.shape for k, v in parts[0].items()}
        phases.add(state["phase"])
        state, done = proto.advance(state, {k: sum(p[k] for p in parts) for k in parts[0]})
        for v in state.values():  # the state persists as JSON values and arrays
            assert isinstance(v, np.ndarray) or json.loads(json.dumps(v, allow_nan=False)) == v
        if done:
            break
    assert done and phases == {"counts", "margins", "newton", "score"}


def test_fit_survives_secure_aggregation_encoding(data):
    """The totals through the 64-bit ring encoding (as shared.secagg sums them) give the same model."""
    from shared.secagg import ArraySpec, decode, encode

    X, y, sites, Xt, _ = data
    proto = FusionSVMSite(COLS, [0.1, 1.0], [1.0], "landmarks", 24, 3, "squared_hinge", seed=4, min_count=3)
    sd = site_data(X, y, sites)
    state = proto.init_state()
    for _ in range(proto.max_rounds):
        parts = [proto.local(d, state) for d in sd.values()]
        totals = {}
        for key, spec in proto.layout(state).items():
            s = ArraySpec(bound=float(spec["bound"]), frac_bits=int(spec["frac_bits"]))
            ring = sum(encode(key, p[key], s, len(parts)) for p in parts)
            totals[key] = decode(key, ring, s, tuple(spec["shape"]))
        state, done = proto.advance(state, totals)
        if done:
            break
    enc = proto.result(proto.release(state, 3)).model
    plain = run_plain(FusionSVMSite(**proto.params), sd, min_count=3).result.model
    assert (enc.C, enc.gamma) == (plain.C, plain.gamma)
    np.testing.assert_allclose(enc.decision_function(Xt), plain.decision_function(Xt), atol=1e-5)


# --------------------------------------------------------------------------- release contents
def test_release_has_model_convergence_and_counts(fitted, data):
    X, y, *_ = data
    m = fitted.model_
    conv = fitted.convergence_
    for key in ("final_converged", "final_iterations", "final_grad_norm", "platt_converged", "platt_iterations",
                "platt_grad_norm", "cv_fits", "cv_fits_converged"):
        assert key in conv, key
    assert conv["final_converged"] and conv["platt_converged"] and conv["cv_fits_converged"] == conv["cv_fits"]
    assert 0 < conv["final_iterations"] <= 100
    assert m.counts["n_pos"] == y.sum() and m.counts["n_neg"] == (1 - y).sum()
    assert min(m.counts["min_fold_pos"], m.counts["min_fold_neg"], m.counts["active_pos"],
               m.counts["active_neg"]) >= 3
    assert fitted.n_folds_ == 3
    assert m.kernel == "landmarks" and m.omega.shape[1] == 5 and m.omega.shape[0] <= 48


def first_rounds(proto: FusionSVMSite, sd: dict[str, CohortData]) -> dict:
    """Run the protocol until the Newton rounds start; returns the state."""
    state = proto.init_state()
    while state["phase"] in ("counts", "margins"):
        parts = [proto.local(d, state) for d in sd.values()]
        state, _ = proto.advance(state, {k: sum(p[k] for p in parts) for k in parts[0]})
    return state


def test_landmarks_depend_on_the_data_only_through_pooled_marginal_histograms(data):
    """Shuffling each column independently across all patients (same marginals, no rows kept)
    leaves the landmarks unchanged: no landmark is, or is built from, a patient's row."""
    X, y, sites, _, _ = data
    proto = FusionSVMSite(COLS, [1.0], [1.0], "landmarks", 64, 3, seed=3, min_count=5)
    a = first_rounds(proto, site_data(X, y, sites))
    rng = np.random.default_rng(0)
    Xp = np.column_stack([rng.permutation(X[:, j]) for j in range(5)])
    b = first_rounds(proto, site_data(Xp, y, sites))
    np.testing.assert_array_equal(a["landmarks"], b["landmarks"])
    assert a["margin_min_cell"] >= 5
    # the landmarks follow the data's marginals: a binary column gets landmarks at its two values only
    Xb = X.copy()
    Xb[:, 1] = (X[:, 1] > 0).astype(float)
    c = first_rounds(proto, site_data(Xb, y, sites))
    xs1 = np.unique(np.round((Xb[:, 1] - c["mean"][1]) / c["scale"][1], 6))
    assert np.all(np.min(np.abs(c["landmarks"][:, 1][:, None] - xs1[None]), axis=1) <= 0.025 + 1e-9)
    assert np.unique(c["landmarks"][:, 1]).size == 2


def test_quantile_landmark_coordinates_are_means_of_k_patient_cells():
    """Every landmark coordinate is the mean of a merged cell of >= k patients; a lone patient in the
    tail never has a coordinate of its own."""
    from shared.fusion.model import halton, quantile_landmarks
    from shared.stats.sitecomputed import merge_cells

    points = np.arange(201) - 100.0
    counts = np.zeros((1, 201), dtype=np.int64)
    counts[0, 95:106] = 4
    counts[0, 190] = 1  # a lone patient far out
    cells = [merge_cells(counts[0], 5)]
    L = quantile_landmarks(halton(1, 64, 0), cells, counts, points)
    means = {float(points[a:b] @ counts[0, a:b] / counts[0, a:b].sum()) for a, b in cells[0]}
    assert set(L[:, 0].tolist()) <= means
    assert all(counts[0, a:b].sum() >= 5 for a, b in cells[0])
    assert 90.0 not in L[:, 0]


def test_platt_matches_a_direct_fit_on_the_out_of_fold_values(data):
    """Platt's A, B from the pooled histogram equal a direct fit on the exact out-of-fold values."""
    X, y, sites, _, _ = data
    proto = FusionSVMSite(COLS, [1.0], [1.0], "landmarks", 32, 3, "squared_hinge", seed=6, min_count=3)
    sd = site_data(X, y, sites)
    run = run_plain(proto, sd, min_count=3)
    st8 = run.state
    K = st8["n_folds"]
    f, lab = [], []
    for d in sd.values():  # out-of-fold decision values, as each site computes them
        folds = assign_folds(d.extra["patient_id"], d.y, K, 6)
        Z = proto.fmap(st8).features((d.X - st8["mean"]) / st8["scale"], 0)
        for k in range(K):
            w = st8["w"][k]
            f.append(Z[folds == k] @ w[:Z.shape[1]] + w[-1])
            lab.append(d.y[folds == k])
    f, lab = np.concatenate(f), np.concatenate(lab)
    n1, n0 = lab.sum(), (1 - lab).sum()
    t = np.where(lab == 1, (n1 + 1) / (n1 + 2), 1 / (n0 + 2))

    def nll(ab):
        u = ab[0] * f + ab[1]
        return np.sum(t * np.logaddexp(0, u) + (1 - t) * np.logaddexp(0, -u))

    ref = minimize(nll, np.array([-1.0, 0.0]), method="BFGS", options={"gtol": 1e-10}).x
    m = run.result.model
    assert m.platt_a < 0  # larger decision values, higher probability
    np.testing.assert_allclose([m.platt_a, m.platt_b], ref, atol=5e-3)
    assert m.convergence["platt_converged"] and m.convergence["platt_grad_norm"] < 1e-6 * len(y)
    # the CV AUC of the chosen candidate is the pooled out-of-fold AUC (ties within a grid bin aside)
    assert abs(m.cv_auc - roc_auc_score(lab, f)) < 2e-3


def test_bad_input_names_the_site(data):
    X, y, sites, _, _ = data
    Xbad = X.copy()
    Xbad[np.flatnonzero(sites == "b")[0], 0] = np.nan
    with pytest.raises(ValueError, match="site 'b'"):
        FederatedSVC(**SMALL).fit(Xbad, y, sites)
    with pytest.raises(ValueError, match="0/1"):
        FederatedSVC(**SMALL).fit(X, y + 1, sites)
    proto = FusionSVMSite(COLS, seed=0)
    no_ids = CohortData(y[:5], X[:5], tuple(COLS), {"site": "c"})
    with pytest.raises(ValueError, match="site 'c'.*patient_id"):
        proto.local(no_ids, proto.init_state())
    wrong_cols = CohortData(y[:5], X[:5], ("a", "b", "c", "d", "z"), {"site": "c", "patient_id": list("abcde")})
    with pytest.raises(ValueError, match="site 'c'.*columns"):
        proto.local(wrong_cols, proto.init_state())


# --------------------------------------------------------------------------- scoring, SHAP
def test_payload_roundtrip(fitted, data):
    Xt = data[3]
    m = fitted.model_
    m2 = models_from_payload(*models_to_payload({"FDL": m}))["FDL"]
    assert m2.kernel == "landmarks"
    np.testing.assert_array_equal(m2.predict_proba(Xt), m.predict_proba(Xt))
    np.testing.assert_array_equal(SVMModel.from_json(json.loads(json.dumps(m.to_json()))).predict_proba(Xt),
                                  m.predict_proba(Xt))
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


def test_shap_sums_protocol(fitted, data):
    X, y, sites, _, _ = data
    m = fitted.model_
    m.columns = list(COLS)
    sd = site_data(X, y, sites)
    for d in sd.values():
        d.extra["fusion_model"] = m
    proto = ShapSumsSite(COLS, m.digest())
    run = run_plain(proto, sd, min_count=5)
    assert run.released["released"] and run.released["n"] == len(y)
    expected = np.abs(shapley_values(m, X, m.mean)).mean(axis=0)
    np.testing.assert_allclose(run.released["mean_abs_shap"], expected, rtol=1e-10)
    # fewer than k patients in the cohort: nothing but the reason
    tiny = {"a": CohortData(y[:3], X[:3], tuple(COLS), {"fusion_model": m, "site": "a"})}
    held = run_plain(proto, tiny, min_count=5).released
    assert not held["released"] and "mean_abs_shap" not in held
    # a model the site did not derive (another digest) is refused, naming the site
    crafted = SVMModel(**{**m.__dict__, "coef": m.coef * 0 + 1.0})
    bad = {"a": CohortData(y[:30], X[:30], tuple(COLS), {"fusion_model": crafted, "site": "a"})}
    with pytest.raises(ValueError, match="site 'a'.*not one this site derived"):
        run_plain(proto, bad, min_count=5)
    with pytest.raises(ValueError, match="model_digest"):
        ShapSumsSite(COLS, "x" * 64)
