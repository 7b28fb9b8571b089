"""The signature AUC table from site-computed queries over in-process sites: federated == pooled."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from server.evaluation import POOLED_TEST, cohort_queries, signature_table
from shared.stats import auc_ci
from simulations.sites import InProcessConsortium


def _tables(seed: int = 0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    out = {}
    for i, n in enumerate([40, 25, 33]):
        y = rng.integers(0, 2, n)
        score = np.round(np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1), 4)  # on the 1e-4 grid
        out[f"s{i}"] = pd.DataFrame({"patient_id": [f"s{i}-{j}" for j in range(n)], "split": "test", "label": y,
                                     "pre_t2w": score})
    return out


def _run(tmp: Path, tables, **policy):
    roles = dict.fromkeys(tables, "train")
    cons = InProcessConsortium(tmp, tables, roles, [], run="r-eval", **policy)
    cohorts = cohort_queries(["pre_t2w"], roles)
    cons.run_stats([q for _, _, q in cohorts])
    return signature_table(["pre_t2w"], cohorts).set_index("site"), cons


def test_pooled_auc_over_sites_equals_the_auc_of_the_pooled_rows(tmp_path) -> None:
    tables = _tables()
    table, _ = _run(tmp_path, tables, min_cell_count=3, release_site_figures=True)
    pooled = pd.concat(tables.values())
    ref = auc_ci(pooled["label"].to_numpy(), pooled["pre_t2w"].to_numpy())
    assert table.loc[POOLED_TEST, "auc"] == pytest.approx(ref.auc, abs=1e-9)
    assert table.loc[POOLED_TEST, "lo"] == pytest.approx(ref.lo, abs=1e-9)
    assert table.loc[POOLED_TEST, "hi"] == pytest.approx(ref.hi, abs=1e-9)
    for s, t in tables.items():  # each site released its own numbers (its policy allows it here)
        assert table.loc[s, "auc"] == pytest.approx(auc_ci(t["label"].to_numpy(), t["pre_t2w"].to_numpy()).auc,
                                                    abs=1e-9)


def test_per_site_numbers_are_withheld_by_default_and_say_so(tmp_path) -> None:
    table, _ = _run(tmp_path, _tables(1), min_cell_count=3)
    for s in ("s0", "s1", "s2"):
        assert np.isnan(table.loc[s, "auc"]) and "release_site_figures" in table.loc[s, "note"]
    assert np.isfinite(table.loc[POOLED_TEST, "auc"])


def test_disclosure_control_is_reported_not_silent(tmp_path) -> None:
    table, _ = _run(tmp_path, _tables(2), min_cell_count=30, release_site_figures=True)
    # Every site has fewer than 30 patients of some class: it contributes nothing; nothing is released.
    assert table["auc"].isna().all()
    assert table["note"].str.len().gt(0).all()
