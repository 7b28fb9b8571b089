"""A small consortium of site statistics services with real keys, policies and tables (no Flower)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.site_policy import SIGNATURES_STAMP, write_stamp
from shared.config import PolicyConfig
from simulations.sites import make_consortium_keys, site_service

RUN = "run1"
SITES = ("a", "b", "c", "ext")
CLINICAL = ("age", "cea")


def site_table(rng: np.random.Generator, site: str, n: int) -> pd.DataFrame:
    y = (rng.random(n) < 0.4).astype(int)
    split = np.where(rng.random(n) < 0.7, "train", "test") if site != "ext" else np.full(n, "external")
    df = pd.DataFrame({
        "patient_id": [f"{site}-{i:04d}" for i in range(n)],
        "split": split, "label": y,
        "pre_t2w": np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.15, n), 0, 1),
        "post_t2w": np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.15, n), 0, 1),
        "age": rng.normal(60, 10, n).round(), "cea": rng.lognormal(1, 0.5, n),
    })
    return df


class Consortium:
    def __init__(self, root: Path, sizes: dict[str, int], seed: int = 0, **policy: object) -> None:
        rng = np.random.default_rng(seed)
        self.root = root
        self.keys = make_consortium_keys(root / "roster", list(sizes))
        self.tables = {s: site_table(rng, s, n) for s, n in sizes.items()}
        self.policies = {s: PolicyConfig(roster=root / "roster", identity_key=self.keys[s],
                                         role="external" if s == "ext" else "train",
                                         **policy) for s in sizes}
        self.services = {}
        for s in sizes:
            cache = root / "cache" / s
            cache.mkdir(parents=True, exist_ok=True)
            write_stamp(cache / SIGNATURES_STAMP, run=RUN, weights="w" * 64)
            self.services[s] = site_service(s, cache, self.policies[s], CLINICAL,
                                            (lambda s=s: self.tables[s]), self.keys[s])

    def cache(self, site: str) -> Path:
        return self.root / "cache" / site


@pytest.fixture
def consortium(tmp_path: Path) -> Consortium:
    return Consortium(tmp_path, {"a": 40, "b": 30, "c": 36, "ext": 30})
