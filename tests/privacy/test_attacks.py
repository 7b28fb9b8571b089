"""A malicious server against the real ClientApp (called exactly as Flower calls it).

Each test plays one attack from the privacy review (issue 11) or found while building the defence,
and asserts on what the server can reconstruct, not on data types:

1. lower the disclosure floor from the server;
2. feed server-made tables / parameters into a protocol round;
3. choose fold counts, random features or weights of the fusion fit (see also tests/shared/test_fusion*);
4. read per-fold or per-round sums;
5. difference two answers whose patient sets differ by one patient with a missing value;
6. read identifiers or data-driven cell edges; query an identifier column;
8. (identity: tests/deployment) 9. query stale files of another run;
plus: re-release a quantity with a site left out, ask one site alone, exhaust the budget, forge a
total, call the external cohort on a training site.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.stats.sc_cohort import CohortSummarySite
from shared.stats.sc_roc import ROCSite
from shared.stats_driver import SiteQuery, run_site_queries

from .flower_sites import RUN, SIGS, FlowerConsortium

SIZES = {"a": 50, "b": 44, "c": 40, "ext": 36}


@pytest.fixture
def fc(tmp_path: Path, run_identity) -> FlowerConsortium:
    return FlowerConsortium(tmp_path, SIZES, k=3, release_site_figures={"ext": True})


def spec(**kw):
    base = {"qid": "q", "protocol": "cohort_summary", "params": {}, "cohort": "training", "columns": list(SIGS),
            "participants": ["a", "b", "c"]}
    base.update(kw)
    return base


def open_one(fc, site, s, k=3, **kw):
    rep, raw = fc.call(site, {"op": "open", "k": k, "queries": [s], "advertise": {}}, **kw)
    return rep, raw


def test_1_server_cannot_lower_the_floor(fc) -> None:
    # the server's own recipe says k=1 and the query asks for k=1
    rep, _ = open_one(fc, "a", spec(), k=1, cfg_yaml=fc.cfg_yaml + "privacy: {min_cell_count: 1}\n")
    assert rep["refused"]["q"]["rule"] == "min_cell_count"
    entry = fc.audit("a")[-1]
    assert entry["policy_rule"] == "min_cell_count" and entry["run_id"] == RUN


@pytest.mark.parametrize("params", [
    {"columns": list(SIGS), "v10": [0.0] * 10001},            # a server-made placement table
    {"columns": list(SIGS), "n_neg": 10**9},                   # server-made class totals
    {"columns": list(SIGS), "display_bins": 10001},             # a display grid as fine as the data grid
    {"columns": ["patient_id"]},                                # an identifier as a score
])
def test_2_server_made_tables_and_grids_are_refused(fc, params) -> None:
    rep, _ = open_one(fc, "a", spec(protocol="roc", params=params))
    assert "q" in rep["refused"], rep


def test_5_a_missing_value_cannot_be_differenced(fc) -> None:
    """CEA missing for one patient: signature-only and signature+CEA answers differ by 0 or >= k per class."""
    pts = fc.patients["a"]
    pts.loc[3, "cea"] = np.nan  # one patient of site a lacks CEA
    pts.to_csv(fc.root / "data" / "a" / "patients.csv", index=False)
    q1 = SiteQuery("n_sig", CohortSummarySite(), "training", list(SIGS), ["a", "b", "c"])
    q2 = SiteQuery("n_full", CohortSummarySite(), "training", [*SIGS, "cea"], ["a", "b", "c"])
    run_site_queries([q1, q2], fc.send, run=RUN, k=3)
    assert q1.ok and q2.ok, (q1.error, q2.error)
    d_pos = q1.result.n_pos - q2.result.n_pos
    d_neg = q1.result.n_neg - q2.result.n_neg
    assert d_pos in (0,) or d_pos >= 3
    assert d_neg in (0,) or d_neg >= 3


def test_6_released_cells_have_grid_edges_and_k_patients(fc) -> None:
    q = SiteQuery("roc", ROCSite(list(SIGS), display_bins=20), "training", list(SIGS), ["a", "b", "c"])
    run_site_queries([q], fc.send, run=RUN, k=3)
    assert q.ok, q.error
    values = np.concatenate([fc.signatures[s][list(SIGS)].to_numpy().ravel() for s in ("a", "b", "c")])
    for cells in q.result.curves.values():
        edges = np.asarray([*cells["lo"], cells["hi"][-1]])
        assert np.allclose(edges * 20, np.round(edges * 20))  # grid edges only
        assert not np.isin(np.round(edges, 6), np.round(values, 6)[(values * 20) % 1 != 0]).any()
        for npos, nneg in zip(cells["n_pos"], cells["n_neg"], strict=True):
            assert npos == 0 or npos >= 3
            assert nneg == 0 or nneg >= 3


def test_9_statistics_on_another_runs_files_are_refused(fc) -> None:
    rep, _ = open_one(fc, "a", spec(), run="run-other")
    assert "q" in rep["failed"] and "signatures stage" in rep["failed"]["q"]


def test_one_site_alone_is_refused_by_default_allowed_where_released(fc) -> None:
    rep, _ = open_one(fc, "a", spec(participants=["a"]))
    assert rep["refused"]["q"]["rule"] == "release_site_figures"
    rep, _ = open_one(fc, "ext", spec(participants=["ext"], cohort="external"))
    assert "q" in rep["released"]
    assert rep["released"]["q"]["n_pos"] + rep["released"]["q"]["n_neg"] == SIZES["ext"]


def test_external_cohort_from_a_training_site_is_refused(fc) -> None:
    rep, _ = open_one(fc, "a", spec(cohort="external"))
    assert rep["refused"]["q"]["rule"] == "role"


def test_a_quantity_is_not_released_again_without_a_site(fc) -> None:
    q1 = SiteQuery("n1", CohortSummarySite(), "training", list(SIGS), ["a", "b", "c"])
    run_site_queries([q1], fc.send, run=RUN, k=3)
    assert q1.ok
    q2 = SiteQuery("n2", CohortSummarySite(), "training", list(SIGS), ["a", "b"])
    run_site_queries([q2], fc.send, run=RUN, k=3)
    assert not q2.ok and q2.released is None
    assert {r["rule"] for r in q2.refused.values()} == {"once"}


def test_forged_total_is_detected_and_nothing_is_released(fc) -> None:
    """The server adds a delta to the masked sum before sending it back: every site refuses to go on."""
    calls = []

    def tamper(requests):
        for req in requests.values():
            for total in (req.get("totals") or {}).values():
                for key, arr in total.items():
                    if key != "__tag__":
                        total[key] = arr + np.uint64(1 << 20)
        calls.append(requests)
        return fc.send(requests)

    q = SiteQuery("n", CohortSummarySite(), "training", list(SIGS), ["a", "b", "c"])
    run_site_queries([q], tamper, run=RUN, k=3)
    assert q.released is None
    errors = [raw.error.reason for _, _, rep, raw in fc.log if raw.has_error()]
    assert any("does not verify" in e for e in errors), errors


def test_audit_names_every_refusal(fc) -> None:
    open_one(fc, "b", spec(columns=["patient_id"]))
    entry = fc.audit("b")[-1]
    assert "columns" in entry["policy_rule"] and "q" in entry["refused"]


def test_every_released_count_is_zero_or_at_least_k(fc) -> None:
    q = SiteQuery("n", CohortSummarySite(), "internal_test", list(SIGS), ["a", "b", "c"])
    run_site_queries([q], fc.send, run=RUN, k=3)
    if q.ok:
        for v in (q.result.n_pos, q.result.n_neg):
            assert v is None or v == 0 or v >= 3
    pooled = pd.concat([fc.signatures[s] for s in ("a", "b", "c")])
    assert pooled["split"].eq("test").sum() > 0
