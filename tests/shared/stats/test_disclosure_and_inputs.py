"""Disclosure control, bad inputs and the protocol interface."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.stats import (
    PROTOCOLS,
    BinaryMetricsProtocol,
    CalibrationProtocol,
    Cells,
    Grid,
    LogisticProtocol,
    NetBenefitProtocol,
    ROCProtocol,
    TableOneProtocol,
    auc_ci,
    calibration,
    delong_test,
    federated_auc_ci,
    federated_binary_metrics,
    federated_calibration,
    federated_delong_test,
    federated_logistic_regression,
    federated_table_one,
    federated_youden_threshold,
    join_summary,
    logistic_regression,
    run_protocol,
    split_summary,
    table_one,
    youden_threshold,
)
from shared.stats.fed_tableone import make_spec
from shared.stats.protocol import check_summary, payload_bytes


def _data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1), 3)


# --- cells ----------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 12), min_size=1, max_size=60), k=st.integers(1, 10))
def test_cells_never_hold_a_small_count_and_keep_every_patient(counts: list[int], k: int) -> None:
    c = np.array(counts)
    if 0 < c.sum() < k:
        with pytest.raises(ValueError):
            Cells.from_counts(c, k)
        return
    cells, merged = Cells.from_counts(c, k)
    assert cells.n == c.sum() and ((cells.count == 0) | (cells.count >= k)).all()
    assert (cells.stop > cells.start).all() and (cells.start[1:] >= cells.stop[:-1]).all()
    for s, e, n in zip(cells.start, cells.stop, cells.count, strict=True):
        assert c[s:e].sum() == n and c[s] > 0 and c[e - 1] > 0  # tight cells
    assert merged == bool(((c > 0) & (c < k)).any())


def test_site_messages_only_hold_aggregates_of_at_least_k() -> None:
    y, s = _data(0, 400)
    k = 5
    for rnd_params in (ROCProtocol(min_count=k).start(),):
        out = ROCProtocol.site_step((y, s), rnd_params, site="a", min_count=k)
        counts = np.concatenate([v for key, v in out.items() if key.endswith(".count")])
        assert ((counts == 0) | (counts >= k)).all()
        assert max(v.size for v in out.values() if isinstance(v, np.ndarray)) < y.size
        assert "supp.roc.s0.pos" in out


# --- disclosure log -------------------------------------------------------------------------------
def test_site_below_k_is_excluded_recorded_and_result_is_pooled_of_the_rest() -> None:
    y, s = _data(1, 300)
    small_y, small_s = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0]), np.linspace(0.1, 0.9, 10)
    fed = federated_auc_ci({"big": (y, s), "tiny": (small_y, small_s)}, grid=Grid.probability(1e-3))
    assert [(x.site, x.quantity) for x in fed.suppressed if x.site == "tiny"] == [("tiny", "roc")]
    assert "min_count=5" in fed.suppressed[-1].reason and "3" not in fed.suppressed[-1].reason
    assert fed.result.auc == pytest.approx(auc_ci(y, s).auc, abs=fed.bound["auc"] + 1e-12)
    assert fed.result.n_pos == y.sum()
    bm = federated_binary_metrics({"big": (y, s), "tiny": (small_y, small_s)})
    assert any(x.site == "tiny" and x.quantity == "binary_metrics" for x in bm.suppressed)


def test_merged_histograms_are_recorded() -> None:
    y, s = _data(2, 200)
    fed = federated_auc_ci([(y[:100], s[:100]), (y[100:], s[100:])])
    assert {x.quantity for x in fed.suppressed} == {"roc.s0.pos", "roc.s0.neg"}
    assert all("merged" in x.reason for x in fed.suppressed)


def test_site_keeps_its_own_stricter_threshold() -> None:
    y, s = _data(3, 100)
    sites = {"a": (y[:50], s[:50]), "b": (y[50:], s[50:])}
    fed = run_protocol(ROCProtocol(min_count=1), sites, site_min_count={"a": 1000, "b": 1})
    assert [x.site for x in fed.suppressed] == ["a"] and "min_count=1000" in fed.suppressed[0].reason
    assert fed.result.n_pos + fed.result.n_neg == 50


def test_calibration_bins_withheld_are_recorded_other_numbers_exact() -> None:
    y, p = _data(4, 120)
    sites = [(y[:20], p[:20]), (y[20:], p[20:])]
    fed = federated_calibration(sites, n_bins=10)
    ref = calibration(y, p, n_bins=10)
    assert any(x.quantity.startswith("calibration.bin") for x in fed.suppressed)
    assert fed.result.brier == pytest.approx(ref.brier) and fed.result.slope == pytest.approx(ref.slope, abs=1e-9)
    assert fed.result.bins["count"].sum() < 120


def test_table_one_small_group_or_cell_excludes_site() -> None:
    rng = np.random.default_rng(5)
    df = pd.DataFrame({"g": rng.integers(0, 2, 200), "age": rng.integers(40, 80, 200).astype(float),
                       "sex": rng.choice(["F", "M"], 200)})
    tiny = pd.DataFrame({"g": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1], "age": np.arange(10.0) + 50, "sex": ["F"] * 10})
    fed = federated_table_one({"a": df, "b": tiny}, "g", ["age", "sex"])
    assert [(x.site, x.quantity) for x in fed.suppressed] == [("b", "table_one")]
    ref = table_one(df, "g", ["age", "sex"])
    pd.testing.assert_frame_equal(fed.result.stats, ref.stats, atol=1e-9)


# --- bad input ------------------------------------------------------------------------------------
def test_one_class_absent_at_a_site_is_fine() -> None:
    y, s = _data(6, 200)
    neg_only = (np.zeros(30, int), np.round(np.linspace(0, 1, 30), 3))
    yy, ss = np.concatenate([y, neg_only[0]]), np.concatenate([s, neg_only[1]])
    for mc in (1, 5):
        fed = federated_auc_ci([(y, s), neg_only], min_count=mc)
        if mc == 1:
            assert fed.result.auc == pytest.approx(auc_ci(yy, ss).auc, abs=1e-12)
    lr = federated_logistic_regression([(pd.DataFrame({"s": s}), y), (pd.DataFrame({"s": neg_only[1]}), neg_only[0])])
    pd.testing.assert_frame_equal(lr.result, logistic_regression(pd.DataFrame({"s": ss}), yy), atol=1e-9)


def test_all_scores_equal_is_defined() -> None:
    y = np.array([0, 1] * 20)
    s = np.full(40, 0.3)
    r = auc_ci(y, s)
    assert (r.auc, r.var, r.lo, r.hi) == (0.5, 0.0, 0.5, 0.5)
    f = federated_auc_ci([(y[:20], s[:20]), (y[20:], s[20:])], min_count=1).result
    assert (f.auc, f.var, f.lo, f.hi) == (0.5, 0.0, 0.5, 0.5)
    d = delong_test(y, s, s)
    assert (d.z, d.p) == (0.0, 1.0)
    assert federated_delong_test([(y, s, s)], min_count=1).result.p == 1.0
    c = calibration(y, s)
    assert np.isnan(c.slope) and np.isfinite(c.intercept)
    fc = federated_calibration([(y[:20], s[:20]), (y[20:], s[20:])]).result
    assert np.isnan(fc.slope) and fc.intercept == pytest.approx(c.intercept)


def test_nan_and_shape_errors_name_the_argument_and_site() -> None:
    y, s = _data(7, 50)
    bad = s.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="score contains NaN"):
        auc_ci(y, bad)
    with pytest.raises(ValueError, match="score at site 'site1' contains NaN"):
        federated_auc_ci([(y, s), (y, bad)])
    with pytest.raises(ValueError, match="y_true at site 'site0' contains NaN"):
        federated_auc_ci([(np.where(np.arange(50) == 0, np.nan, y), s)])
    with pytest.raises(ValueError, match="only 0 and 1"):
        auc_ci(y * 2, s)
    with pytest.raises(ValueError, match="has length"):
        auc_ci(y, s[:-1])
    with pytest.raises(ValueError, match="outside the grid"):
        federated_auc_ci([(y, s * 3)])
    with pytest.raises(ValueError, match="no positive"):
        auc_ci(np.zeros(10), s[:10])
    with pytest.raises(ValueError, match="no negative patient in the included sites"):
        federated_auc_ci([(np.ones(10, int), s[:10])])
    with pytest.raises(ValueError, match="prob at site 'site0' must lie in"):
        federated_calibration([(y, s + 1)])
    with pytest.raises(ValueError, match="min_count"):
        federated_auc_ci([(y, s)], min_count=0)


def test_logistic_errors_name_column_and_site() -> None:
    y, s = _data(8, 60)
    with pytest.raises(ValueError, match="column 'c' is not numeric"):
        logistic_regression(pd.DataFrame({"c": ["a"] * 60}), y)
    X = pd.DataFrame({"s": s})
    Xb = X.copy()
    Xb.iloc[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"\['s'\] at site 'site1' contain NaN"):
        federated_logistic_regression([(X, y), (Xb, y)])
    sep = pd.DataFrame({"x": np.arange(40.0)})
    with pytest.raises(ValueError, match="separation"):
        logistic_regression(sep, (np.arange(40) >= 20).astype(int))
    with pytest.raises(ValueError, match="separation"):
        federated_logistic_regression([(sep.iloc[:20], np.zeros(20, int)), (sep.iloc[20:], np.ones(20, int))])


def test_table_one_errors() -> None:
    df = pd.DataFrame({"g": [0, 1, 2] * 5, "x": np.arange(15.0)})
    with pytest.raises(ValueError, match="exactly 2 values"):
        table_one(df, "g", ["x"])
    a = pd.DataFrame({"g": [0, 1] * 10, "s": ["F", "M"] * 10})
    b = pd.DataFrame({"g": [0, 1] * 10, "s": ["F", "X"] * 10})
    spec = make_spec([a], "g", ["s"])
    with pytest.raises(ValueError, match="column 's' at site 'b' has values outside"):
        run_protocol(TableOneProtocol(spec, min_count=1), {"a": (a, spec), "b": (b, spec)})
    with pytest.raises(ValueError, match="need a grid"):
        federated_table_one([a.assign(x=1.0)], "g", ["x"], nonnormal=["x"])


# --- protocol interface -----------------------------------------------------------------------------
def test_messages_are_flat_numeric_dicts_and_round_trip() -> None:
    y, s = _data(9, 200)
    X = pd.DataFrame({"s": s})
    cases = [
        (ROCProtocol(2, output="delong", min_count=1), (y, s, s)),
        (LogisticProtocol(["s"], min_count=1), (X, y)),
        (BinaryMetricsProtocol(min_count=1), (y, s)),
        (CalibrationProtocol(min_count=1), (y, s)),
        (NetBenefitProtocol(np.array([0.1, 0.5]), min_count=1), (y, s)),
    ]
    for proto, data in cases:
        assert PROTOCOLS[proto.name] is type(proto)
        params = proto.start()
        check_summary(params, "server")
        out = type(proto).site_step(data, params, site="x", min_count=1)
        check_summary(out, "site")
        arrays, scalars = split_summary(out)
        assert all(isinstance(v, np.ndarray) for v in arrays.values())
        assert all(isinstance(v, int | float) for v in scalars.values())
        back = join_summary(arrays, scalars)
        assert back.keys() == out.keys() and payload_bytes(back) == payload_bytes(out)


def test_site_rejects_non_monotone_round2_tables() -> None:
    y, s = _data(10, 100)
    proto = ROCProtocol(min_count=1)
    params = proto.server_step({"a": ROCProtocol.site_step((y, s), proto.start(), site="a", min_count=1)})
    evil = dict(params)
    evil["s0.v10"] = np.zeros_like(params["s0.v10"])
    evil["s0.v10"][1234] = 1.0  # an indicator table would count patients in one bin
    with pytest.raises(ValueError, match="not a monotone table"):
        ROCProtocol.site_step((y, s), evil, site="a", min_count=1)


def test_federated_result_reports_rounds_and_bytes() -> None:
    y, s = _data(11, 300)
    fed = federated_auc_ci([(y[:150], s[:150]), (y[150:], s[150:])])
    assert fed.n_rounds == 2 and set(fed.bytes_sent) == {"site0", "site1"}
    assert all(b > 0 for b in fed.bytes_sent.values())


def test_bootstrap_and_youden_with_merged_cells_stay_within_bounds() -> None:
    y, s = _data(12, 600)
    sites = [(y[:200], s[:200]), (y[200:350], s[200:350]), (y[350:], s[350:])]
    fed = federated_auc_ci(sites, method="bootstrap", n_boot=300, seed=0)
    assert fed.suppressed and fed.result.lo <= fed.result.auc <= fed.result.hi
    assert abs(fed.result.auc - auc_ci(y, s).auc) <= fed.bound["auc"] + 1e-12
    yd = federated_youden_threshold(sites)  # scores have 3 decimals: on the default 1e-4 grid
    t = yd.result.threshold
    j_raw = np.mean(s[y == 1] >= t) - np.mean(s[y == 0] >= t)
    assert yd.suppressed and abs(yd.result.j - j_raw) <= yd.bound["j"] + 1e-12
    assert yd.result.j <= youden_threshold(y, s).j + yd.bound["j"] + 1e-12
