"""Shared fixtures for the fusion analysis and report tests: four in-process sites with planted signal.

The sites are :class:`simulations.sites.InProcessConsortium`: the real site statistics services
(policies, secure aggregation, state on site), held in this process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from server.analysis import run_analysis
from shared.config import parse_config
from simulations.sites import InProcessConsortium

SIGS = ["pre_t2w", "post_t2w", "pre_dwi", "post_dwi"]
ROLES = {"site_a": "train", "site_b": "train", "site_c": "train", "ext": "external"}


def site_table(rng: np.random.Generator, site: str, n: int, external: bool) -> pd.DataFrame:
    y = (rng.random(n) < 0.4).astype(int)
    df = pd.DataFrame({"patient_id": [f"{site}-{i:03d}" for i in range(n)], "label": y})
    df["split"] = "external" if external else np.where(rng.random(n) < 0.7, "train", "test")
    for j, s in enumerate(SIGS):
        df[s] = np.clip(0.5 + (0.15 + 0.05 * j) * (y - 0.5) + rng.normal(0, 0.18, n), 0, 1)
    for seq in ("t2w", "dwi"):
        df[f"delta_{seq}"] = df[f"pre_{seq}"] - df[f"post_{seq}"]
    df["age"] = rng.normal(60, 10, n).round()
    df["sex_male"] = (rng.random(n) < 0.6).astype(float)
    df["post_ld"] = rng.normal(35 - 12 * y, 8, n).round(1)
    df["cea"] = rng.lognormal(1.2, 0.8, n).round(2)
    df["t_stage"] = rng.choice([2.0, 3.0, 4.0], n)
    df["crm"] = (rng.random(n) < 0.3).astype(float)
    return df


def config(tmp: Path):
    return parse_config({
        "seed": 3, "data": {"sequences": ["t2w", "dwi"], "timepoints": ["pre", "post"]},
        "privacy": {"min_cell_count": 3},
        "fusion": {"variants": False, "clinical_predictors": ["age", "sex_male", "post_ld", "cea", "t_stage", "crm"],
                   "n_components": 32},
    }, source="test")


def tables(seed: int = 0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    return {s: site_table(rng, s, n, ROLES[s] == "external") for s, n in
            (("site_a", 90), ("site_b", 80), ("site_c", 70), ("ext", 60))}


CLINICAL = ["age", "sex_male", "post_ld", "cea", "t_stage", "crm"]


def analyse(tmp: Path, tabs: dict[str, pd.DataFrame], **policy: object):
    policy = {"min_cell_count": 3, "release_site_figures": True, **policy}
    sites = InProcessConsortium(tmp, tabs, ROLES, CLINICAL, run="run-test", **policy)
    return run_analysis(sites.run_stats, sites.fusion, config(tmp), ROLES, tmp / "run"), sites


@pytest.fixture(scope="session")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    tabs = tables()
    res, _ = analyse(tmp, tabs)
    return tmp, tabs, res


