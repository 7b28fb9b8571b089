"""Shared fixtures: a tiny synthetic consortium, generated and preprocessed once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import RectalFLConfig, parse_config

# The modules that take longest (seconds in one process, measured with `--durations`), longest first.
# The suite runs on two workers (pyproject's addopts), a module at a time; starting these first keeps a
# long module from being the last thing one worker does while the other is idle.
LONGEST_FIRST = [
    "tests/simulations/federation/test_simulation.py",
    "tests/simulations/test_compare.py",
    "tests/deployment/test_deployment.py",
    "tests/simulations/test_signals.py",
    "tests/simulations/test_resume_baselines.py",
    "tests/client/test_explain.py",
    "tests/deployment/test_control_plane.py",
    "tests/simulations/test_dp_federation.py",
    "tests/client/test_dp.py",
    "tests/deployment/test_closed_setup_units.py",
    "tests/simulations/fusion/test_analysis.py",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest modules first (see LONGEST_FIRST); the rest keep their order."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = Path(str(config.rootpath))

    def key(item: pytest.Item) -> int:
        try:
            rel = Path(str(item.path)).relative_to(root).as_posix()
        except ValueError:
            return len(rank)
        return rank.get(rel, len(rank))

    items.sort(key=key)  # stable: the order within a module, and of the other modules, is kept


def tiny_config(root: Path, **overrides: object) -> RectalFLConfig:
    """A consortium small enough for CPU tests: 3 training sites + 1 external, 32x32 slices.

    Big enough that each site's test split has at least 3 patients of each class (the smallest
    disclosure floor a site policy allows), so every statistic can be released."""
    data = {
        "name": "tiny",
        "seed": 7,
        "data_root": str(root / "data"),
        "cache_root": str(root / "cache"),
        "runs_root": str(root / "runs"),
        "data": {"sequences": ["t2w", "dwi"], "timepoints": ["pre", "post"]},
        "preprocess": {"n4": {"enabled": True, "shrink_factor": 2, "iterations": [10]}, "slice_size": 32,
                       "workers": 1},
        "synth": {
            "shape": [48, 48, 6],
            "signal": 2.0,
            "missing_mask_fraction": 0.0,
            "second_rater_fraction": 0.0,
            "dicom_fraction": 0.0,
            "sites": [
                {"name": "site_a", "patients": 30, "prevalence": 0.4, "scanner": "siemens_like"},
                {"name": "site_b", "patients": 26, "prevalence": 0.4, "scanner": "ge_like"},
                {"name": "site_c", "patients": 24, "prevalence": 0.45, "scanner": "philips_like"},
                {"name": "ext", "patients": 20, "prevalence": 0.4, "scanner": "legacy_1p5t", "external": True},
            ],
        },
        "split": {"scheme": "7:3"},
        "train": {"backbone": "densenet_tiny", "batch_size": 8, "lr": 0.05, "local_epochs": 1},
        "federation": {"rounds": 2, "min_sites": 2},
        "privacy": {"min_cell_count": 3},
        # every simulated site's own policy: the smallest floor the schema allows, per-site numbers released
        "policy": {"min_cell_count": 3, "release_site_figures": True},
    }
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})  # type: ignore[assignment]
        node[parts[-1]] = value  # type: ignore[index]
    return parse_config(data)


@pytest.fixture(scope="session")
def tiny_consortium(tmp_path_factory: pytest.TempPathFactory) -> RectalFLConfig:
    """Generated and preprocessed once; tests must not modify its data or cache (copy them first)."""
    from simulations.runner import prepare_sites

    root = tmp_path_factory.mktemp("consortium")
    cfg = tiny_config(root)
    prepare_sites(cfg, workers=1)
    return cfg


@pytest.fixture
def run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are built inside a run; give this test process a run identity."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
