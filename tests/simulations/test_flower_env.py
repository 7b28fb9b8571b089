"""Flower telemetry, update checks and runtime installs are off in every process the project starts, and a
run says where its run directory is even under `flwr run` (issue 13)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEYS = ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION")


@pytest.mark.parametrize("entry", ["rectalfl", "simulations.runner"])
def test_flower_reads_telemetry_off(entry: str) -> None:
    # a fresh interpreter, with telemetry explicitly on in the environment it inherits
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "1"}
    env.pop("FLWR_DISABLE_UPDATE_CHECK", None)
    code = (f"import {entry}, os; from flwr.supercore import telemetry; "
            f"print(telemetry.FLWR_TELEMETRY_ENABLED, *(os.environ[k] for k in {KEYS!r}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0", "1", "1"]


def test_flower_processes_get_the_same_environment() -> None:
    from shared.flower import flwr_env

    env = flwr_env()
    assert [env[k] for k in KEYS] == ["0", "1", "1"]


def test_run_directory_is_announced_through_flowers_log_when_nothing_else_is_set_up(monkeypatch) -> None:
    from server.pipeline import announce

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    flwr = logging.getLogger("flwr")
    handler = Keep(level=logging.INFO)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in Flower's ServerApp process
    monkeypatch.setattr(flwr, "level", logging.INFO)
    flwr.addHandler(handler)
    try:
        announce("run directory: /runs/x")
    finally:
        flwr.removeHandler(handler)
    assert seen == ["rectalfl: run directory: /runs/x"]
