"""Batched federated-statistics queries over site signature tables: federated == pooled."""

import numpy as np
import pandas as pd
import pytest

from server.evaluation import POOLED_TEST, queries_to_table, signature_auc_queries
from shared.queries import local_transport, run_queries
from shared.stats import auc_ci


def _tables(seed: int = 0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    out = {}
    for i, n in enumerate([40, 25, 33]):
        y = rng.integers(0, 2, n)
        score = np.round(np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1), 4)  # on the 1e-4 grid
        out[f"s{i}"] = pd.DataFrame({"patient_id": [f"s{i}-{j}" for j in range(n)], "split": "test", "label": y,
                                     "pre_t2w": score})
    return out


def test_pooled_auc_over_sites_equals_the_auc_of_the_pooled_rows() -> None:
    tables = _tables()
    queries = signature_auc_queries(["pre_t2w"], dict.fromkeys(tables, "train"), min_count=1)
    run_queries(queries, local_transport(tables, min_count=1))
    table = queries_to_table(queries).set_index("site")
    pooled = pd.concat(tables.values())
    ref = auc_ci(pooled["label"].to_numpy(), pooled["pre_t2w"].to_numpy())
    assert table.loc[POOLED_TEST, "auc"] == pytest.approx(ref.auc, abs=1e-9)
    assert table.loc[POOLED_TEST, "lo"] == pytest.approx(ref.lo, abs=1e-9)
    assert table.loc[POOLED_TEST, "hi"] == pytest.approx(ref.hi, abs=1e-9)
    for s, t in tables.items():
        assert table.loc[s, "auc"] == pytest.approx(auc_ci(t["label"].to_numpy(), t["pre_t2w"].to_numpy()).auc,
                                                    abs=1e-9)


def test_a_site_that_never_answers_is_left_out_and_named() -> None:
    tables = _tables(1)
    answer = local_transport(tables, min_count=1)

    def lossy(payloads):
        return {s: v for s, v in answer(payloads).items() if s != "s2"}

    queries = signature_auc_queries(["pre_t2w"], dict.fromkeys(tables, "train"), min_count=1)
    run_queries(queries, lossy)
    table = queries_to_table(queries).set_index("site")
    assert np.isnan(table.loc["s2", "auc"]) and "no answer from s2" in table.loc["s2", "note"]
    assert "without s2" in table.loc[POOLED_TEST, "note"]
    pooled = pd.concat([tables["s0"], tables["s1"]])
    assert table.loc[POOLED_TEST, "auc"] == pytest.approx(
        auc_ci(pooled["label"].to_numpy(), pooled["pre_t2w"].to_numpy()).auc, abs=1e-9)


def test_disclosure_control_is_reported_not_silent() -> None:
    tables = _tables(2)
    queries = signature_auc_queries(["pre_t2w"], dict.fromkeys(tables, "train"), min_count=30)
    run_queries(queries, local_transport(tables, min_count=30))
    table = queries_to_table(queries).set_index("site")
    # Every site has fewer than 30 patients of some class: nothing may be computed, and it says so.
    assert table["auc"].isna().all()
    assert table["note"].str.len().gt(0).all()
