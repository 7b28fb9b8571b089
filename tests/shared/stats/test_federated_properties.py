"""Property tests: random data, random split into 1-8 sites of unequal size, federated == pooled.

Exactness (to 1e-9) is asserted where the protocol is exact: values on the grid and no cell
merging (``min_count=1``). Elsewhere the certified bounds returned in ``Federated.bound`` are
checked against the pooled computation on the raw data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.stats import (
    Grid,
    auc_ci,
    binary_metrics,
    calibration,
    delong_test,
    federated_auc_ci,
    federated_binary_metrics,
    federated_calibration,
    federated_delong_test,
    federated_logistic_regression,
    federated_net_benefit,
    federated_select_predictors,
    federated_table_one,
    federated_youden_threshold,
    logistic_regression,
    net_benefit,
    select_predictors,
    table_one,
    youden_threshold,
)

TOL = 1e-9
SEEDS = st.integers(0, 2**31 - 1)
N_SITES = st.integers(1, 8)
FEW = settings(max_examples=25, deadline=None)


def _sites(make_binary, make_split, seed: int, n_sites: int, off_grid: bool = False, n: int | None = None):
    rng = np.random.default_rng(seed)
    n = n if n is not None else int(rng.integers(max(20, 2 * n_sites), 400))
    y, a, b = make_binary(rng, n, step=int(rng.choice([10, 100, 1000])), off_grid=off_grid)
    parts = make_split(rng, n, n_sites)
    return y, a, b, parts


@FEW
@given(seed=SEEDS, n_sites=N_SITES)
def test_auc_delong_exact_on_grid(make_binary, make_split, seed: int, n_sites: int) -> None:
    y, a, _, parts = _sites(make_binary, make_split, seed, n_sites)
    fed = federated_auc_ci([(y[i], a[i]) for i in parts], min_count=1)
    ref = auc_ci(y, a)
    for f in ("auc", "var", "lo", "hi"):
        assert getattr(fed.result, f) == pytest.approx(getattr(ref, f), abs=TOL)
    assert (fed.result.n_pos, fed.result.n_neg) == (ref.n_pos, ref.n_neg)
    assert fed.n_rounds == 2 and not fed.suppressed
    # the certified bound is half the fraction of same-bin pairs
    same = (a[y == 1][:, None] == a[y == 0][None, :]).mean()
    assert fed.bound["auc"] == pytest.approx(0.5 * same, abs=TOL)


@FEW
@given(seed=SEEDS, n_sites=N_SITES)
def test_paired_delong_exact_on_grid(make_binary, make_split, seed: int, n_sites: int) -> None:
    y, a, b, parts = _sites(make_binary, make_split, seed, n_sites)
    fed = federated_delong_test([(y[i], a[i], b[i]) for i in parts], min_count=1).result
    ref = delong_test(y, a, b)
    for f in ("auc_a", "auc_b", "diff", "var_a", "var_b", "cov", "diff_lo", "diff_hi", "p"):
        assert getattr(fed, f) == pytest.approx(getattr(ref, f), abs=TOL), f
    assert fed.z == pytest.approx(ref.z, abs=1e-6)


@settings(max_examples=10, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES)
def test_bootstrap_same_seed_same_ci_on_grid(make_binary, make_split, seed: int, n_sites: int) -> None:
    y, a, _, parts = _sites(make_binary, make_split, seed, n_sites)
    fed = federated_auc_ci([(y[i], a[i]) for i in parts], method="bootstrap", n_boot=200, seed=seed,
                           min_count=1).result
    ref = auc_ci(y, a, method="bootstrap", n_boot=200, seed=seed)
    for f in ("auc", "lo", "hi", "var"):
        assert getattr(fed, f) == pytest.approx(getattr(ref, f), abs=TOL)


@FEW
@given(seed=SEEDS, n_sites=N_SITES)
def test_youden_exact_on_grid(make_binary, make_split, seed: int, n_sites: int) -> None:
    y, a, _, parts = _sites(make_binary, make_split, seed, n_sites)
    fed = federated_youden_threshold([(y[i], a[i]) for i in parts], min_count=1)
    ref = youden_threshold(y, a)
    assert fed.result.threshold == pytest.approx(ref.threshold, abs=TOL)
    assert fed.result.j == pytest.approx(ref.j, abs=TOL) and fed.bound["j"] == 0


@settings(max_examples=40, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES, min_count=st.sampled_from([1, 3, 5, 10]))
def test_auc_within_certified_bound_off_grid_and_merged(make_binary, make_split, seed, n_sites, min_count) -> None:
    """|AUC_fed - AUC_pooled(raw)| <= bound, for off-grid scores, with or without merged cells."""
    y, a, b, parts = _sites(make_binary, make_split, seed, n_sites, off_grid=True)
    grid = Grid.probability(1e-2)  # coarse: many same-bin pairs

    def ok(c: int) -> bool:
        return c == 0 or c >= min_count

    keep = [i for i in parts if ok(int(y[i].sum())) and ok(int((1 - y[i]).sum()))]
    idx = np.concatenate(keep) if keep else np.zeros(0, int)
    sites = [(y[i], a[i]) for i in parts]
    if idx.size == 0 or y[idx].sum() in (0, idx.size):
        with pytest.raises(ValueError, match="no (positive|negative) patient in the included sites"):
            federated_auc_ci(sites, grid=grid, min_count=min_count)
        return
    fed = federated_auc_ci(sites, grid=grid, min_count=min_count)
    assert {s.site for s in fed.suppressed if s.quantity == "roc"} == {
        f"site{k}" for k, i in enumerate(parts) if not any(i is j for j in keep)}
    ref = auc_ci(y[idx], a[idx])
    assert abs(fed.result.auc - ref.auc) <= fed.bound["auc"] + 1e-12
    d = federated_delong_test([(y[i], a[i], b[i]) for i in parts], grid=grid, min_count=min_count)
    r2 = delong_test(y[idx], a[idx], b[idx])
    assert abs(d.result.diff - r2.diff) <= d.bound["diff"] + 1e-12
    assert abs(d.result.auc_b - r2.auc_b) <= d.bound["auc_b"] + 1e-12
    yd = federated_youden_threshold(sites, grid=grid, min_count=min_count)
    assert 0 <= yd.bound["j"] <= 1


@FEW
@given(seed=SEEDS, n_sites=N_SITES)
def test_binary_metrics_and_calibration_exact(make_binary, make_split, seed: int, n_sites: int) -> None:
    y, a, _, parts = _sites(make_binary, make_split, seed, n_sites, off_grid=True)
    sites = [(y[i], a[i]) for i in parts]
    assert federated_binary_metrics(sites, 0.45, min_count=1).result == binary_metrics(y, a, 0.45)
    fed, ref = federated_calibration(sites, n_bins=7, min_count=1).result, calibration(y, a, n_bins=7)
    for f in ("brier", "ece", "slope", "intercept", "slope_model_intercept"):
        assert getattr(fed, f) == pytest.approx(getattr(ref, f), abs=TOL, nan_ok=True), f
    pd.testing.assert_frame_equal(fed.bins, ref.bins, rtol=0, atol=TOL)


def _class_ok(y: np.ndarray, k: int) -> bool:
    n1, n0 = int(y.sum()), int(y.size - y.sum())
    return (n1 == 0 or n1 >= k) and (n0 == 0 or n0 >= k)


@FEW
@given(seed=SEEDS, n_sites=N_SITES, min_count=st.sampled_from([1, 5]))
def test_net_benefit_exact_or_within_bound(make_binary, make_split, seed, n_sites, min_count) -> None:
    y, a, _, parts = _sites(make_binary, make_split, seed, n_sites, off_grid=True)
    t = np.round(np.arange(0.0, 0.96, 0.05), 2)
    if not any(_class_ok(y[i], min_count) for i in parts):
        with pytest.raises(ValueError, match="every site was excluded"):
            federated_net_benefit([(y[i], a[i]) for i in parts], t, min_count=min_count)
        return
    fed = federated_net_benefit([(y[i], a[i]) for i in parts], t, min_count=min_count)
    excluded = {s.site for s in fed.suppressed if s.quantity == "net_benefit"}
    idx = np.concatenate([i for k, i in enumerate(parts) if f"site{k}" not in excluded])
    ref = net_benefit(y[idx], a[idx], t)
    err = np.abs(fed.result["model"].to_numpy() - ref["model"].to_numpy())
    assert (err <= fed.bound["model"] + 1e-12).all()
    assert fed.result["treat_all"].to_numpy() == pytest.approx(ref["treat_all"].to_numpy(), abs=TOL)
    if min_count == 1:
        assert err.max() <= TOL and fed.bound["model"].max() == 0


def _design(rng: np.random.Generator, n: int) -> tuple[pd.DataFrame, np.ndarray]:
    X = pd.DataFrame({"age": rng.normal(60, 10, n), "size": rng.gamma(2, 1.5, n), "male": rng.integers(0, 2, n),
                      "noise": rng.normal(0, 1, n)})
    eta = -0.5 + 0.04 * (X["age"] - 60) + 0.3 * X["size"] - 0.4 * X["male"]
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-eta))).astype(int)
    return X, y.to_numpy()


@settings(max_examples=15, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES)
def test_logistic_regression_and_selection_exact(make_split, seed: int, n_sites: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(80, 400))
    X, y = _design(rng, n)
    parts = make_split(rng, n, n_sites)
    sites = [(X.iloc[i], y[i]) for i in parts]
    ref = logistic_regression(X, y)
    fed = federated_logistic_regression(sites, min_count=1)
    pd.testing.assert_frame_equal(fed.result, ref, rtol=1e-9, atol=TOL)
    rs, fs = select_predictors(X, y), federated_select_predictors(sites, min_count=1).result
    assert fs.selected == rs.selected
    pd.testing.assert_frame_equal(fs.univariate, rs.univariate, rtol=1e-9, atol=TOL)
    if len(rs.multivariate):
        pd.testing.assert_frame_equal(fs.multivariate, rs.multivariate, rtol=1e-9, atol=TOL)


def _cohort(rng: np.random.Generator, n: int) -> pd.DataFrame:
    resp = rng.integers(0, 2, n)
    return pd.DataFrame({
        "response": np.where(resp == 1, "yes", "no"),
        "age": rng.integers(30, 90, n).astype(float),
        "cea": np.round(rng.lognormal(1 + 0.3 * resp, 0.8), 1),
        "stage": rng.choice(["T2", "T3", "T4"], n, p=[0.2, 0.6, 0.2]),
        "male": rng.integers(0, 2, n).astype(bool),
    })


GRIDS = {"age": Grid.from_points(np.arange(0, 121)), "cea": Grid.from_points(np.round(np.arange(0, 2000.1, 0.1), 1))}


@settings(max_examples=15, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES, min_count=st.sampled_from([1, 5]))
def test_table_one_exact_or_enclosed(make_split, seed: int, n_sites: int, min_count: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(max(40, 12 * n_sites), 400))
    df = _cohort(rng, n)
    parts = make_split(rng, n, n_sites)
    cols = ["age", "cea", "stage", "male"]
    yes = (df["response"] == "yes").to_numpy().astype(int)
    if not any(_class_ok(yes[i], min_count) for i in parts):
        with pytest.raises(ValueError, match="every site was excluded"):
            federated_table_one([df.iloc[i] for i in parts], "response", cols, nonnormal=["age", "cea"],
                                grids=GRIDS, min_count=min_count)
        return
    fed = federated_table_one([df.iloc[i] for i in parts], "response", cols, nonnormal=["age", "cea"],
                              grids=GRIDS, min_count=min_count)
    if min_count == 1:
        ref = table_one(df, "response", cols, nonnormal=["age", "cea"])
        pd.testing.assert_frame_equal(fed.result.stats, ref.stats, rtol=1e-9, atol=TOL)
        pd.testing.assert_frame_equal(fed.result.tests, ref.tests, rtol=1e-9, atol=TOL)
        assert fed.result.table.equals(ref.table)
        return
    # merged cells: the certified enclosure holds against the pooled quantiles of the included sites
    for col in ("age", "cea"):
        gone = {s.site for s in fed.suppressed if s.quantity in ("table_one", f"table_one.{col}")}
        keep = [i for k, i in enumerate(parts) if f"site{k}" not in gone]
        if not keep:
            continue
        sub = df.iloc[np.concatenate(keep)]
        ref = table_one(sub, "response", [col], nonnormal=[col]).stats
        for g in ("overall", "no", "yes"):
            for q in ("median", "q1", "q3"):
                e = fed.result.stats.loc[(col, "", g), q]
                r = ref.loc[(col, "", g), q]
                if np.isfinite(r):
                    assert abs(e - r) <= fed.bound[f"{col}.{g}.{q}"] + 1e-9
