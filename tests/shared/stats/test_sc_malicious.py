"""A curious or malicious server against the site-computed protocols.

The server chooses only a protocol name and its parameters; everything a site computes comes from
its own data and the state it derived from securely summed totals. These tests check that (1)
parameters outside the allowed vocabulary are refused before any data is read, (2) what a site
contributes has keys and shapes fixed by the parameters and state, never by the data, (3) every
release is a function of the pooled data only (any split over sites gives the same release), and
(4) no release isolates a patient: every released count is 0 or >= k, an outlier patient is
never alone in a released cell, and a confusion cell of 1 is never released as 1.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.stats.sc_common import run_encoded
from shared.stats.sc_registry import SITE_PROTOCOLS, build
from shared.stats.sitecomputed import CohortData, check_contribution, run_plain

COLS = ("p", "q", "age", "t")
TABLE_SPEC = [
    {"name": "age", "kind": "nonnormal", "edges": list(np.arange(17.5, 100.5, 1.0))},
    {"name": "t", "kind": "categorical", "levels": [2, 3, 4]},
]
VALID = {
    "cohort_summary": {},
    "roc": {"columns": ["p", "q"], "alpha": 0.05, "display_bins": 20},
    "threshold_metrics": {"column": "p", "threshold": 0.5},
    "calibration": {"column": "p", "n_bins": 10},
    "net_benefit": {"column": "p", "display_bins": 20},
    "logistic": {"columns": ["age", "q"], "method": "auto"},
    "select_predictors": {"candidates": ["age", "q", "t"]},
    "table_one": {"variables": TABLE_SPEC},
}

INVALID = [
    ("roc", {"columns": []}), ("roc", {"columns": ["p"] * 2}), ("roc", {"columns": [f"c{i}" for i in range(33)]}),
    ("roc", {"columns": "p"}), ("roc", {"columns": ["p"], "alpha": 0.5}), ("roc", {"columns": ["p"], "alpha": 0}),
    ("roc", {"columns": ["p"], "alpha": float("nan")}), ("roc", {"columns": ["p"], "alpha": "0.05"}),
    ("roc", {"columns": ["p"], "display_bins": 1000}), ("roc", {"columns": ["p"], "display_bins": 200}),
    ("roc", {"columns": ["p"], "display_bins": 7}), ("roc", {"columns": ["p"], "lookup": [0.0, 1.0]}),
    ("threshold_metrics", {"column": "p", "threshold": 0.555}),
    ("threshold_metrics", {"column": "p", "threshold": 0.0}),
    ("threshold_metrics", {"column": "p", "threshold": 1.0}),
    ("threshold_metrics", {"column": "", "threshold": 0.5}),
    ("calibration", {"column": "p", "n_bins": 100}), ("calibration", {"column": "p", "n_bins": 7}),
    ("calibration", {"column": "p", "max_iter": 301}), ("calibration", {"column": "p", "max_iter": 0}),
    ("calibration", {"column": "p", "tol": 0.0}), ("calibration", {"column": "p", "tol": 1.0}),
    ("net_benefit", {"column": "p", "display_bins": 10000}),
    ("logistic", {"columns": [f"c{i}" for i in range(21)]}), ("logistic", {"columns": ["q"], "method": "newton"}),
    ("logistic", {"columns": ["q"], "max_iter": 1000}), ("logistic", {"columns": ["q"], "beta": [0.0, 1.0]}),
    ("select_predictors", {"candidates": ["q"], "p_univariate": 0.0}),
    ("select_predictors", {"candidates": ["q"], "p_multivariate": 1.5}),
    ("select_predictors", {"candidates": ["q"], "firth": "sometimes"}),
    ("select_predictors", {"candidates": ["q"], "folds": 1000}),
    ("table_one", {"variables": []}),
    ("table_one", {"variables": [{"name": "age", "kind": "normal", "edges": [3.0, 2.0, 1.0]}]}),
    ("table_one", {"variables": [{"name": "age", "kind": "normal", "edges": [0.0, float("inf")]}]}),
    ("table_one", {"variables": [{"name": "age", "kind": "normal", "edges": list(range(10003))}]}),
    ("table_one", {"variables": [{"name": "age", "kind": "normal", "edges": "data"}]}),
    ("table_one", {"variables": [{"name": "t", "kind": "categorical", "levels": [1, 1]}]}),
    ("table_one", {"variables": [{"name": "t", "kind": "categorical", "levels": [1]}]}),
    ("table_one", {"variables": [{"name": "t", "kind": "lookup", "levels": [1, 2]}]}),
    ("table_one", {"variables": [{"name": "t", "kind": "categorical", "levels": [1, 2], "where": "id"}]}),
    ("table_one", {"variables": TABLE_SPEC, "group_labels": ["a", "b", "c"]}),
    ("table_one", {"variables": TABLE_SPEC, "equal_var": "yes"}),
    ("cohort_summary", {"min_count": 1}),
    ("fusion_fold_moments", {"n_folds": 1000}),
]


@pytest.mark.parametrize(("name", "params"), INVALID)
def test_parameters_outside_the_vocabulary_are_refused(name, params):
    with pytest.raises(ValueError):
        build(name, params)


def test_registry_holds_every_protocol_and_params_round_trip():
    assert set(VALID) == set(SITE_PROTOCOLS)
    for name, params in VALID.items():
        proto = build(name, params)
        assert proto.name == name
        assert build(name, proto.params).params == proto.params  # what travels rebuilds the same protocol


def make_cohort(rng, n):
    y = (rng.uniform(size=n) < 0.45).astype(np.int64)
    y[:12] = np.repeat([0, 1], 6)
    p = np.clip(rng.normal(0.35 + 0.25 * y, 0.15), 0, 1)
    q = np.clip(0.5 * p + 0.5 * rng.uniform(size=n), 0, 1)
    age = np.clip(np.round(rng.normal(60 + 5 * y, 8)), 18, 99)
    t = rng.choice([2.0, 3.0, 4.0], size=n)
    return y, np.column_stack([p, q, age, t])


def split(y, X, parts):
    return {f"s{i}": CohortData(y[q], X[q], COLS) for i, q in enumerate(parts)}


def test_contributions_have_data_independent_layout():
    """Each round, sites with very different data (incl. an empty site and a one-patient site)
    contribute exactly the layout's keys and shapes."""
    rng = np.random.default_rng(0)
    y, X = make_cohort(rng, 120)
    sites = split(y, X, [np.arange(0, 100), np.arange(100, 119), np.arange(119, 120), np.arange(0)])
    for name, params in VALID.items():
        proto = build(name, params)
        state = proto.init_state()
        for _ in range(proto.max_rounds):
            shapes = None
            contribs = [proto.local(d, state) for d in sites.values()]
            for c in contribs:
                check_contribution(proto, state, c)
                s = {k: np.shape(v) for k, v in c.items()}
                assert shapes is None or s == shapes
                shapes = s
            totals = {k: np.sum([c[k] for c in contribs], axis=0) for k in contribs[0]}
            state, done = proto.advance(state, totals)
            if done:
                break
        assert done, name


def same(a, b, path=""):
    """Releases equal up to float rounding from summation order."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, z) in enumerate(zip(a, b, strict=True)):
            same(x, z, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-7, abs=1e-9), path
    else:
        assert a == b, path


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_sites=st.integers(2, 8))
def test_release_depends_on_pooled_data_only(seed, n_sites, make_split):
    rng = np.random.default_rng(seed)
    n = 150
    y, X = make_cohort(rng, n)
    one = split(y, X, [np.arange(n)])
    many = split(y, X, make_split(rng, n, n_sites))
    for name, params in VALID.items():
        same(run_plain(build(name, params), one, min_count=5).released,
             run_plain(build(name, params), many, min_count=5).released, name)


def released_counts(rel):
    """Every released patient count of a release (cells, confusion cells, categorical counts)."""
    out = []
    for cells in [*rel.get("curves", {}).values(), rel.get("cells"), rel.get("bins")]:
        if cells:
            out += [*cells["n_neg"], *cells["n_pos"]]
    out += [rel[c] for c in ("tp", "fp", "tn", "fn", "n_pos", "n_neg") if c in rel]
    for v in rel.get("variables", []):
        if v["kind"] == "categorical":
            out += [c for g in v["groups"].values() for c in g["counts"] if c != "withheld"]
        out += [g["n"] for g in v["groups"].values()]
    return out


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 10), n=st.integers(25, 90))
@example(seed=0, k=8, n=25)  # a level's overall count of 7 was released while its group cells were withheld
def test_every_released_count_is_zero_or_at_least_k(seed, k, n, make_split):
    rng = np.random.default_rng(seed)
    y, X = make_cohort(rng, n)
    sites = split(y, X, make_split(rng, n, 3))
    for name, params in VALID.items():
        if name in ("logistic", "select_predictors"):
            continue  # no counts released (their disclosure rule is tested in test_sc_logistic)
        rel = run_plain(build(name, params), sites, min_count=k).released
        for c in released_counts(rel):
            assert c == 0 or c >= k, (name, c)


def outlier_cohort(top: float):
    """40 negatives below 0.5, 20 positives below 0.6 and one positive outlier at ``top``."""
    rng = np.random.default_rng(42)
    y = np.r_[np.zeros(40, int), np.ones(21, int)]
    p = np.r_[rng.uniform(0.0, 0.5, 40), rng.uniform(0.2, 0.6, 20), top]
    X = np.column_stack([p, np.round(p, 1), np.r_[np.full(60, 60.0), 99.0], np.full(61, 3.0)])
    return split(y, X, [np.arange(0, 30), np.arange(30, 61)])


def test_outlier_is_never_alone_in_a_released_cell():
    k = 5
    for name in ("roc", "net_benefit", "calibration"):
        rel = run_plain(build(name, VALID[name]), outlier_cohort(0.99), min_count=k).released
        cells = rel["curves"]["p"] if name == "roc" else rel["cells" if name == "net_benefit" else "bins"]
        top = len(cells["lo"]) - 1
        assert cells["hi"][top] == 1.0
        assert cells["n_pos"][top] >= k  # the outlier shares its cell with at least k-1 other positives
        assert cells["lo"][top] <= 0.6  # ... which lie below 0.6


def test_moving_the_outlier_above_everyone_changes_no_released_cell_or_rank_statistic():
    a = run_plain(build("roc", VALID["roc"]), outlier_cohort(0.99), min_count=5).released
    b = run_plain(build("roc", VALID["roc"]), outlier_cohort(0.81), min_count=5).released
    same(a, b)
    for name in ("net_benefit", "calibration"):
        ra = run_plain(build(name, VALID[name]), outlier_cohort(0.99), min_count=5).released
        rb = run_plain(build(name, VALID[name]), outlier_cohort(0.81), min_count=5).released
        key = "cells" if name == "net_benefit" else "bins"
        for f in ("lo", "hi", "n_neg", "n_pos"):
            assert ra[key][f] == rb[key][f]


def test_a_confusion_cell_of_one_is_never_released_as_one():
    rel = run_plain(build("threshold_metrics", {"column": "p", "threshold": 0.9}), outlier_cohort(0.99),
                    min_count=5).released
    assert rel["approx"] is True
    assert rel["tp"] in (0, 5) and rel["tp"] + rel["fn"] == 21
    assert 1 not in (rel["tp"], rel["fp"], rel["tn"], rel["fn"])


def outlier_age_cohort(age: float):
    rng = np.random.default_rng(7)
    y = np.r_[np.zeros(40, int), np.ones(21, int)]
    ages = np.r_[np.round(rng.normal(60, 5, 60)), age]
    X = np.column_stack([np.full(61, 0.5), np.full(61, 0.5), ages, np.full(61, 3.0)])
    return split(y, X, [np.arange(0, 30), np.arange(30, 61)])


def test_table_one_quantiles_do_not_move_with_an_outlier():
    """The oldest patient at 99 or at 85: medians, quartiles, their enclosures and the rank test are
    the same (only the mean and SD, sums over >= k patients, change)."""
    a = run_plain(build("table_one", VALID["table_one"]), outlier_age_cohort(99.0), min_count=5).released
    b = run_plain(build("table_one", VALID["table_one"]), outlier_age_cohort(85.0), min_count=5).released
    va, vb = a["variables"][0], b["variables"][0]
    for g in va["groups"]:
        for f in ("median", "q1", "q3", "median_lo", "median_hi", "q1_lo", "q1_hi", "q3_lo", "q3_hi"):
            assert va["groups"][g][f] == vb["groups"][g][f]
        assert va["groups"][g]["mean"] != vb["groups"][g]["mean"] or g == "g0"
    assert va["statistic"] == vb["statistic"] and va["p"] == vb["p"]


def test_encoded_and_persisted_runs_release_the_same(make_split):
    """Through the secagg fixed-point encoding and a JSON/array round trip of the state every round
    (what a deployed site does), every protocol releases what the plain run releases."""
    rng = np.random.default_rng(5)
    y, X = make_cohort(rng, 160)
    sites = split(y, X, make_split(rng, 160, 4))
    for name, params in VALID.items():
        plain = run_plain(build(name, params), sites, min_count=5).released
        enc = run_encoded(build(name, params), sites, min_count=5).released
        same_loose(plain, enc, name)


def same_loose(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in ("grad_norm", "iterations"):  # the last iterate's residual differs at 2**-32
                same_loose(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, z) in enumerate(zip(a, b, strict=True)):
            same_loose(x, z, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-8), path
    else:
        assert a == b, path
