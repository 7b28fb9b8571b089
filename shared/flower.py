"""Flower process helpers both sides use (no other project package): the Flower executables next to
this Python, the environment every Flower process the project starts gets, the Flower app's
identity (the hash of the app bundle ``flwr run`` ships), and the error type.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1]
"""The Flower app (pyproject.toml with [tool.flwr.app]) that `flwr run` ships to the federation."""


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


def app_hash(app_dir: Path = APP_DIR) -> str:
    """SHA-256 of the Flower app bundle (FAB) ``flwr run`` builds from ``app_dir``.

    Flower builds FABs deterministically (sorted files, fixed dates; ``[tool.flwr.app] fab-include``
    in pyproject.toml names the files), so two machines with the same release compute the same hash:
    a site pins the code it agreed to run by this number (``policy.allowed_apps``).
    """
    from flwr.cli.build import build_fab_from_disk

    try:
        return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()
    except (ValueError, OSError) as exc:
        raise DeployError(f"cannot build the Flower app bundle from {app_dir}: {exc}") from None


def new_secret(path: Path, nbytes: int = 32) -> Path:
    """A fresh random secret in ``path`` (mode 0600 from its first byte; replaces any old one)."""
    from shared.certs import write_file

    write_file(Path(path), secrets.token_hex(nbytes).encode(), private=True)
    return Path(path)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700: Flower's state, apps and secrets live there."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child receive ``sig`` when the process that started it dies (Linux
    ``PR_SET_PDEATHSIG``), so a killed wrapper never leaves an orphaned SuperLink or SuperNode.

    SIGKILL by default: this is the abnormal path (the wrapper was killed; a normal stop sends SIGTERM
    and waits), and a Flower server with open streaming connections can take minutes to shut down on
    SIGTERM. ``None`` on other systems (a service manager's process group handles it there)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call: do not linger
            os._exit(1)

    return preexec
