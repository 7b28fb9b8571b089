"""Flower process helpers both sides use (no other project package): the Flower executables next to
this Python, the environment every Flower process the project starts gets, and the error type.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


class DeployError(RuntimeError):
    """A deployment step failed; the message names what and what to do."""


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DeployError(f"address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def tool(name: str) -> str:
    """Path of a Flower executable installed next to this Python (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found; install rectalfl with `bash scripts/setup.sh` and use .venv/bin/rectalfl")
    return found


def flwr_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: the venv's bin first on PATH (the SuperLink starts
    ``flower-superexec`` by name), no telemetry, no update checks, no runtime installs."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    return env
