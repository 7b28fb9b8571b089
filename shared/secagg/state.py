"""A site's persisted protocol state: one JSON file per live session, plus a ledger of used names.

On Flower's Deployment Engine every message is handled by a fresh process, so what a site must
remember between rounds (its ephemeral secret, group seed, participants, later the group key) is
kept in a site-owned folder::

    <state_dir>/               mode 0700
      sessions/<h>.json        live session state, mode 0600 from creation, replaced atomically,
                               deleted after unmask, on any refusal, or once older than the TTL
      ledger/session-<h>       "this session id was used" (no secrets), kept ``ledger_ttl_s``
      ledger/query-<h>         "this query was unmasked" (no secrets), kept ``ledger_ttl_s``

``<h>`` is the SHA-256 of the session id / query id. Files are created with ``O_CREAT | O_EXCL``
and mode 0600 (never world- or group-readable, whatever the umask), written and renamed
into place. Deleting a file does not scrub the disk: the folder belongs on an encrypted volume
like the rest of the site's data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700


def _h(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_private(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Create ``path`` (must not exist) with mode 0600 from the first syscall, write and (``durable``) fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # the umask may only have narrowed it; make it exact
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


class SessionStore:
    """Session files and the ledger under a site-owned ``root`` (see the module docstring).

    Parameters
    ----------
    root : Path
        The site's secure-aggregation state folder (created with mode 0700).
    ttl_s : float
        A session older than this (since its advert) is refused and its state destroyed.
    ledger_ttl_s : float
        How long "used session" / "unmasked query" records are kept (> ``ttl_s``).
    clock : callable
        Seconds since the epoch (``time.time``; injectable for tests).
    """

    def __init__(self, root: Path, *, ttl_s: float, ledger_ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        if not ttl_s > 0 or not ledger_ttl_s >= ttl_s:
            raise ValueError(f"need 0 < ttl_s <= ledger_ttl_s, got ttl_s={ttl_s}, ledger_ttl_s={ledger_ttl_s}")
        self.root = Path(root)
        self.ttl_s = float(ttl_s)
        self.ledger_ttl_s = float(ledger_ttl_s)
        self.clock = clock
        for d in (self.root, self.root / "sessions", self.root / "ledger"):
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            if d.stat().st_mode & 0o077:
                logger.info("secagg state folder %s was accessible to others; setting mode 0700", d)
                os.chmod(d, DIR_MODE)

    # -------------------------------------------------------------------------- ledger
    def _ledger(self, kind: str, name: str) -> Path:
        return self.root / "ledger" / f"{kind}-{_h(name)}"

    def claim(self, kind: str, name: str) -> bool:
        """Record ``kind``/``name`` as used; ``False`` if it already was (atomic: O_EXCL)."""
        try:
            create_private(self._ledger(kind, name), json.dumps({"at": self.clock()}).encode())
        except FileExistsError:
            return False
        _fsync_dir(self.root / "ledger")
        return True

    def claimed(self, kind: str, name: str) -> bool:
        return self._ledger(kind, name).exists()

    # ------------------------------------------------------------------------ sessions
    def _path(self, session_id: str) -> Path:
        return self.root / "sessions" / f"{_h(session_id)}.json"

    def save(self, session_id: str, state: dict[str, Any]) -> None:
        """Write the session's state atomically (temporary 0600 file, rename).

        Not fsynced: a session lost to a power cut is only a session that cannot finish (the query is
        re-run in a fresh one); what must survive a crash, the ledger of used sessions and unmasked
        queries, is fsynced (:meth:`claim`).
        """
        final = self._path(session_id)
        tmp = final.with_name(f".{final.stem}.{os.urandom(6).hex()}.tmp")
        try:
            create_private(tmp, json.dumps(state, sort_keys=True).encode(), durable=False)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, session_id: str) -> dict[str, Any] | None:
        """The session's state, or ``None`` if there is none (never advertised, finished or destroyed)."""
        try:
            return json.loads(self._path(session_id).read_bytes())
        except FileNotFoundError:
            return None

    def delete(self, session_id: str) -> None:
        self._path(session_id).unlink(missing_ok=True)

    def expired(self, state: dict[str, Any]) -> bool:
        age = self.clock() - float(state.get("active", state["created"]))  # a kept session: since its last round
        return not -60.0 <= age <= self.ttl_s  # a clock stepped back by > 1 min counts as expired too

    def purge(self) -> int:
        """Delete expired session files, stray temporary files and old ledger records; returns how many."""
        now, n = self.clock(), 0
        for p in (self.root / "sessions").iterdir():
            try:
                if p.suffix == ".tmp":  # a crashed writer's; leave a live writer's alone
                    stale = time.time() - p.stat().st_mtime > 60
                else:
                    stale = self.expired(json.loads(p.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError):
                stale = True  # unreadable state is useless: its session can never complete
            if stale:
                p.unlink(missing_ok=True)
                n += 1
        for p in (self.root / "ledger").iterdir():
            try:
                old = now - float(json.loads(p.read_bytes())["at"]) > self.ledger_ttl_s
            except (OSError, ValueError, KeyError, TypeError):
                old = False  # keep what cannot be read: forgetting it could allow a replay
            if old:
                p.unlink(missing_ok=True)
                n += 1
        if n:
            logger.info("secagg: purged %d stale state file(s) under %s", n, self.root)
        return n
