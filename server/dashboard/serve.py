"""Serving the dashboard with uvicorn: in the foreground (the CLI) or in a background thread (tests, benchmark)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

logger = logging.getLogger(__name__)

__all__ = ["is_loopback", "running", "serve", "uvicorn_config"]

GRACEFUL_SHUTDOWN_S = 3
"""Open live streams are cut after this long when the dashboard stops (Ctrl-C)."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def uvicorn_config(app: Any, *, host: str = "127.0.0.1", port: int = 8050, tls_cert: Path | None = None,
                   tls_key: Path | None = None, log_level: str = "warning") -> uvicorn.Config:
    """The uvicorn configuration used to serve ``app`` (TLS when both ``tls_cert`` and ``tls_key`` are given).

    Raises
    ------
    ValueError
        Only one of ``tls_cert``/``tls_key`` given, or a port outside 0-65535.
    FileNotFoundError
        A TLS file does not exist.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both --tls-cert and --tls-key (e.g. the consortium's server.crt and server.key)")
    for p in (tls_cert, tls_key):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"TLS file {p} does not exist")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be in 0-65535, got {port}")
    return uvicorn.Config(app, host=host, port=int(port), ssl_certfile=str(tls_cert) if tls_cert else None,
                          ssl_keyfile=str(tls_key) if tls_key else None, log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, lifespan="off", ws="none", proxy_headers=False,
                          server_header=False)


def serve(app: Any, **kwargs: Any) -> None:
    """Serve ``app`` in the foreground until interrupted (keyword arguments as :func:`uvicorn_config`)."""
    uvicorn.Server(uvicorn_config(app, **kwargs)).run()


@contextlib.contextmanager
def running(app: Any, *, host: str = "127.0.0.1", port: int = 0, tls_cert: Path | None = None,
            tls_key: Path | None = None, timeout: float = 20.0) -> Iterator[str]:
    """Serve ``app`` in a background thread; yields the base URL (``http://127.0.0.1:PORT``).

    ``port=0`` picks a free port. The server is stopped when the block ends.

    Raises
    ------
    RuntimeError
        The server did not start within ``timeout`` seconds.
    """
    server = uvicorn.Server(uvicorn_config(app, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key))
    thread = threading.Thread(target=server.run, name="rectalfl-dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the dashboard did not start on {host}:{port}")
        time.sleep(0.05)
    sock = server.servers[0].sockets[0].getsockname()
    scheme = "https" if tls_cert else "http"
    shown = "localhost" if tls_cert and is_loopback(host) else sock[0]
    try:
        yield f"{scheme}://{shown}:{sock[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=GRACEFUL_SHUTDOWN_S + 10)
