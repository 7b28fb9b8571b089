"""Site-computed Table 1 (shared.stats.sc_tableone) vs the pooled table_one; disclosure of categorical cells."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from shared.stats import table_one
from shared.stats.sc_common import run_encoded
from shared.stats.sc_tableone import WITHHELD, TableOneSite, suppress
from shared.stats.sitecomputed import CohortData, run_plain

SEEDS = st.integers(0, 2**31 - 1)
N_SITES = st.integers(1, 8)
AGE_EDGES = list(np.arange(17.5, 100.5, 1.0))  # integer ages are on this grid


def cohort(rng, n, off_grid=False):
    y = (rng.uniform(size=n) < rng.uniform(0.3, 0.7)).astype(np.int64)
    y[:2] = [0, 1]
    age = np.clip(np.round(rng.normal(60 + 4 * y, 10)), 18, 99)
    cea = np.clip(np.exp(rng.normal(1 + 0.4 * y, 0.7)), 0, 99.9)
    cea = cea if off_grid else np.round(cea)
    t = rng.choice([2.0, 3.0, 4.0], size=n, p=[0.3, 0.5, 0.2])
    return y, pd.DataFrame({"age": age, "cea": cea, "t": t})


SPEC = [
    {"name": "age", "kind": "normal", "edges": AGE_EDGES},
    {"name": "cea", "kind": "nonnormal", "edges": list(np.arange(-0.5, 100.5, 1.0))},
    {"name": "t", "kind": "categorical", "levels": [2, 3, 4], "labels": ["T2", "T3", "T4"]},
]


def sites_of(df, y, parts):
    cols = tuple(df.columns)
    X = df.to_numpy(dtype=np.float64)
    return {f"site{i}": CohortData(y[q], X[q], cols) for i, q in enumerate(parts)}


def pooled(df, y):
    d = df.copy()
    d["t"] = d["t"].map({2.0: "T2", 3.0: "T3", 4.0: "T4"})
    d["y"] = y
    return table_one(d, "y", ["age", "cea", "t"], nonnormal=["cea"])


@settings(max_examples=10, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES)
def test_equal_pooled_on_grid(seed, n_sites, make_split):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 300))
    y, df = cohort(rng, n)
    run = run_plain(TableOneSite(SPEC), sites_of(df, y, make_split(rng, n, n_sites)), min_count=1)
    got, ref = run.result, pooled(df, y)
    for g in ("overall", "0", "1"):
        for c in ("n", "mean", "sd"):
            assert got.stats.loc[("age", "", g), c] == pytest.approx(ref.stats.loc[("age", "", g), c], rel=1e-10)
            assert got.stats.loc[("cea", "", g), c] == pytest.approx(ref.stats.loc[("cea", "", g), c], rel=1e-10)
        for lev in ("T2", "T3", "T4"):
            assert got.stats.loc[("t", lev, g), "count"] == ref.stats.loc[("t", lev, g), "count"]
    for v in ("age", "cea", "t"):  # t-test, Mann-Whitney (integer data, unit grid: exact), chi-square
        assert got.tests.loc[v, "test"] == ref.tests.loc[v, "test"]
        assert got.tests.loc[v, "statistic"] == pytest.approx(ref.tests.loc[v, "statistic"], rel=1e-9)
        assert got.tests.loc[v, "p"] == pytest.approx(ref.tests.loc[v, "p"], rel=1e-7, abs=1e-14)


@settings(max_examples=10, deadline=None)
@given(seed=SEEDS, n_sites=N_SITES, k=st.integers(1, 10))
def test_quantiles_enclose_pooled_and_u_within_bound(seed, n_sites, k, make_split):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3 * k + 10, 300))
    y, df = cohort(rng, n, off_grid=True)
    y[: 2 * k] = np.repeat([0, 1], k)
    run = run_plain(TableOneSite(SPEC), sites_of(df, y, make_split(rng, n, n_sites)), min_count=k)
    rec = next(v for v in run.released["variables"] if v["name"] == "cea")
    for g, mask in (("overall", np.ones(n, bool)), ("g0", y == 0), ("g1", y == 1)):
        raw = np.quantile(df["cea"].to_numpy()[mask], [0.5, 0.25, 0.75])
        for name, r in zip(("median", "q1", "q3"), raw, strict=True):
            lo, hi, est = rec["groups"][g][f"{name}_lo"], rec["groups"][g][f"{name}_hi"], rec["groups"][g][name]
            assert lo - 1e-12 <= r <= hi + 1e-12
            assert lo - 1e-12 <= est <= hi + 1e-12
    u_raw = stats.mannwhitneyu(df["cea"][y == 0], df["cea"][y == 1], method="asymptotic").statistic
    assert abs(rec["statistic"] - u_raw) <= rec["u_bound"] + 1e-9


def test_encoded_run_agrees(make_split):
    rng = np.random.default_rng(3)
    y, df = cohort(rng, 200)
    sites = sites_of(df, y, make_split(rng, 200, 5))
    a = run_plain(TableOneSite(SPEC), sites, min_count=5).result
    b = run_encoded(TableOneSite(SPEC), sites, min_count=5).result
    np.testing.assert_allclose(b.stats[["n", "mean", "sd", "median", "q1", "q3", "count"]].to_numpy(dtype=float),
                               a.stats[["n", "mean", "sd", "median", "q1", "q3", "count"]].to_numpy(dtype=float),
                               rtol=1e-8, equal_nan=True)


def feasible_values(counts: np.ndarray, w: np.ndarray) -> dict[tuple[int, int], set[int]]:
    """Brute force the attacker: every table with the published group totals, the released group
    cells and released overall cells; the values each withheld group cell takes."""
    L = counts.shape[0]
    n0, n1 = counts.sum(axis=0)
    out: dict[tuple[int, int], set[int]] = {(i, j): set() for i in range(L) for j in range(2) if w[i, j]}

    def compositions(total):
        for cuts in itertools.combinations(range(total + L - 1), L - 1):
            prev, parts = -1, []
            for c in (*cuts, total + L - 1):
                parts.append(c - prev - 1)
                prev = c
            yield parts

    for c0 in compositions(int(n0)):
        if any(not w[i, 0] and c0[i] != counts[i, 0] for i in range(L)):
            continue
        for c1 in compositions(int(n1)):
            if any(not w[i, 1] and c1[i] != counts[i, 1] for i in range(L)):
                continue
            if any(not w[i, 2] and c0[i] + c1[i] != counts[i].sum() for i in range(L)):
                continue
            for (i, j) in out:
                out[(i, j)].add((c0, c1)[j][i])
    return out


@settings(max_examples=40, deadline=None)
@given(table=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=2, max_size=3),
       k=st.integers(2, 6))
def test_suppression_never_pins_a_small_cell(table, k):
    counts = np.array(table, dtype=np.int64)
    if (counts.sum(axis=0) < k).any():
        return  # the table would be withheld entirely
    w = suppress(counts, k)
    small = (counts > 0) & (counts < k)
    assert (w[:, :2] | ~small).all()  # every small group cell is withheld
    if not small.any():
        assert not w.any()
        return
    values = feasible_values(counts, w)
    for (i, j), vals in values.items():
        if small[i, j]:
            assert len(vals) >= 2, (counts.tolist(), k, w.tolist(), (i, j), vals)


def test_rare_level_shows_marker_and_no_test():
    y = np.r_[np.zeros(60, int), np.ones(40, int)]
    t = np.r_[np.full(3, 4.0), np.full(57, 3.0), np.full(2, 4.0), np.full(38, 3.0)]  # T4: 3 and 2
    df = pd.DataFrame({"age": np.full(100, 60.0), "cea": np.full(100, 3.0), "t": t})
    run = run_plain(TableOneSite(SPEC), sites_of(df, y, np.array_split(np.arange(100), 3)), min_count=5)
    rec = next(v for v in run.released["variables"] if v["name"] == "t")
    assert rec["groups"]["g0"]["counts"][2] == WITHHELD and rec["groups"]["g1"]["counts"][2] == WITHHELD
    assert 3 not in rec["groups"]["g0"]["counts"] and 2 not in rec["groups"]["g1"]["counts"]
    assert rec["test"] == "not computed" and rec["p"] is None
    table = run.result.table
    assert (table == WITHHELD).any().any()
    assert "nan" not in " ".join(table.to_numpy().ravel().astype(str))
    assert any(w["quantity"] == "table_one.t" for w in run.released["withheld"])


def test_withheld_when_a_group_is_small():
    y = np.r_[np.zeros(30, int), np.ones(3, int)]
    df = pd.DataFrame({"age": np.full(33, 50.0), "cea": np.full(33, 2.0), "t": np.full(33, 3.0)})
    rel = run_plain(TableOneSite(SPEC), sites_of(df, y, [np.arange(33)]), min_count=5).released
    assert rel["released"] is False and "variables" not in rel and "n" not in rel


def test_values_outside_grid_or_levels_are_errors():
    y = np.r_[np.zeros(5, int), np.ones(5, int)]
    df = pd.DataFrame({"age": np.r_[np.full(9, 50.0), 120.0], "cea": np.full(10, 2.0), "t": np.full(10, 3.0)})
    with pytest.raises(ValueError, match="'age'.*outside the agreed grid"):
        run_plain(TableOneSite(SPEC), sites_of(df, y, [np.arange(10)]))
    df["age"] = 50.0
    df.loc[0, "t"] = 5.0
    with pytest.raises(ValueError, match="'t'.*outside the agreed levels"):
        run_plain(TableOneSite(SPEC), sites_of(df, y, [np.arange(10)]))
