"""Shared tiny cohorts for the synthetic-cohort tests (generated once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import SiteSpec, SynthConfig
from simulations.synth import CohortSummary, generate_cohort

TINY_SEED = 7


def tiny_config(**overrides: object) -> SynthConfig:
    """2 sites x 6 patients at 32 x 32 x 6, every optional feature switched on."""
    base: dict[str, object] = {
        "sites": [
            SiteSpec(name="site_a", patients=6, prevalence=0.4, scanner="siemens_like"),
            SiteSpec(name="ext", patients=6, prevalence=0.3, scanner="legacy_1p5t", external=True),
        ],
        "shape": (32, 32, 6),
        "signal": 1.0,
        "missing_mask_fraction": 0.25,
        "second_rater_fraction": 0.5,
        "dicom_fraction": 0.34,
        "include_adc": True,
    }
    base.update(overrides)
    return SynthConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_cfg() -> SynthConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory, tiny_cfg: SynthConfig) -> tuple[Path, CohortSummary]:
    out = tmp_path_factory.mktemp("cohort") / "data"
    calls: list[tuple[int, int, str]] = []
    summary = generate_cohort(tiny_cfg, out, seed=TINY_SEED, workers=1, progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == list(range(1, 13)) and all(c[1] == 12 for c in calls)
    return out, summary


@pytest.fixture(scope="session")
def make_config():
    """``make_config(**overrides)``: the tiny config with some fields changed."""
    return tiny_config
