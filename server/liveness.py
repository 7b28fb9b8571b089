"""Site liveness in the run record: which node is online, and when it was last seen.

The orchestrator calls :func:`poll_grid` (or :func:`record_node_status` with node information it
already has) once per round. Each call writes one row per known site into the ``node_status`` table
of the run's own ``run.db``, so the operator dashboard can show online/offline and "last seen"
without ever talking to the SuperLink itself.

What Flower tells the ServerApp (flwr 1.41): ``Grid.get_nodes()`` returns a ``NodeInfo`` for every
node of the run's federation that is **online** now (``status='online'``), with ``online_until``
(a POSIX timestamp: the last heartbeat plus ``HEARTBEAT_PATIENCE`` heartbeat intervals) and
``heartbeat_interval`` (seconds). Offline nodes are simply absent. The base ``Grid`` (and the
simulation engine's grids) may return a bare ``NodeInfo(node_id=...)`` with no status: a node that
is listed at all is online. So a known site whose node is not listed is recorded offline and keeps
the ``last_seen`` of its last sighting.

Table ``node_status`` (created by this module, next to the run record's own tables; the
:class:`server.store.RunStore` schema is untouched)
    One row per ``(run_id, site)``: ``node_id`` (TEXT: Flower node ids are unsigned 64-bit and do not
    fit SQLite's signed INTEGER), ``role`` (``'train'``/``'external'`` or ``NULL``), ``status``
    (``'online'``/``'offline'``), ``online`` (1/0), ``last_seen`` (UTC ISO-8601: the last heartbeat
    Flower reports, else the time the node was last listed; ``NULL`` if never seen),
    ``online_until`` (UTC ISO-8601 or ``NULL``), ``heartbeat_interval`` (seconds or ``NULL``),
    ``updated_at`` (time of the last poll).

A change of state (online -> offline, offline -> online) is also recorded as a run-record event
(``'site_offline'``, ``'site_online'``) when a writable :class:`~server.store.RunStore` is given.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["NodeStatus", "poll_grid", "read_node_status", "record_node_status", "TABLE"]

TABLE = "node_status"
"""Name of the liveness table in ``run.db``."""

_HEARTBEAT_PATIENCE = 2
"""flwr.common.constant.HEARTBEAT_PATIENCE in flwr 1.41 (read from Flower when importable)."""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    run_id             TEXT NOT NULL,
    site               TEXT NOT NULL,
    node_id            TEXT,
    role               TEXT,
    status             TEXT NOT NULL CHECK (status IN ('online', 'offline')),
    online             INTEGER NOT NULL CHECK (online IN (0, 1)),
    last_seen          TEXT,
    online_until       TEXT,
    heartbeat_interval REAL,
    updated_at         TEXT NOT NULL,
    PRIMARY KEY (run_id, site)
)
"""


@dataclass(frozen=True)
class NodeStatus:
    """One site's liveness as recorded (a row of ``node_status``)."""

    run_id: str
    site: str
    node_id: str | None
    role: str | None
    status: str
    online: bool
    last_seen: str | None
    online_until: str | None
    heartbeat_interval: float | None
    updated_at: str

    def as_dict(self) -> dict[str, Any]:
        """The row as a JSON-ready dict."""
        return asdict(self)


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds")


def _patience() -> int:
    try:
        from flwr.common.constant import HEARTBEAT_PATIENCE

        return int(HEARTBEAT_PATIENCE)
    except (ImportError, AttributeError, TypeError, ValueError):  # pragma: no cover - other flwr versions
        return _HEARTBEAT_PATIENCE


def _db_path(store: Any) -> Path:
    path = getattr(store, "path", store)
    if not isinstance(path, str | Path):
        raise TypeError(f"store must be a RunStore or the path of a run.db, got {type(store).__name__}")
    return Path(path)


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"run record {path} does not exist; liveness is recorded into an existing run.db")
    if readonly:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
    else:
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 30000")
    if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
        conn.close()
        raise ValueError(f"{path} is not a rectalfl run record (no schema version); open it with RunStore first")
    return conn


_MAX_TS = 253402300799.0
"""Largest timestamp a datetime holds (9999-12-31): the simulation engine's nodes never expire (their
heartbeat interval is 1e300 s), so their ``online_until`` is beyond it and means "no expiry"."""


def _node_fields(node: Any, now: datetime) -> tuple[str, str, str | None, str | None, float | None]:
    """``(node_id, status, last_seen, online_until, heartbeat_interval)`` of a listed node."""
    node_id = str(int(node.node_id))
    status = str(getattr(node, "status", "") or "online")
    online = status == "online"
    until_ts = getattr(node, "online_until", None)
    interval = getattr(node, "heartbeat_interval", None)
    interval_f = float(interval) if interval else None
    until = None
    last_seen: str | None = _iso(now) if online else None
    if until_ts and float(until_ts) < _MAX_TS:  # 0.0 when unset (proto3); beyond _MAX_TS: never expires
        until_dt = datetime.fromtimestamp(float(until_ts), tz=UTC)
        until = _iso(until_dt)
        if interval_f:
            beat = datetime.fromtimestamp(float(until_ts) - _patience() * interval_f, tz=UTC)
            last_seen = _iso(min(beat, now))
    if not online:
        deactivated = getattr(node, "last_deactivated_at", None)
        if deactivated:
            last_seen = str(deactivated)
    return node_id, "online" if online else "offline", last_seen, until, interval_f


def record_node_status(
    store: Any,
    run_id: str,
    nodes: Iterable[Any],
    sites: Mapping[int, str],
    *,
    roles: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> list[NodeStatus]:
    """Record the liveness of every known site into ``run.db``.

    Parameters
    ----------
    store : server.store.RunStore or str or Path
        The run record (a :class:`~server.store.RunStore`, or the path of its ``run.db``). The file
        must already be a run record. With a writable ``RunStore``, state changes are also recorded
        as events (``'site_online'``, ``'site_offline'``).
    run_id : str
        The run.
    nodes : iterable of flwr.proto.node_pb2.NodeInfo
        What ``grid.get_nodes()`` returned (objects with ``node_id`` and optionally ``status``,
        ``online_until``, ``heartbeat_interval``, ``last_deactivated_at``). A listed node without a
        status counts as online.
    sites : mapping of int to str
        ``node_id -> site name`` of the sites the orchestrator knows. Only these are recorded; a
        listed node that is not in ``sites`` (not yet described) is ignored.
    roles : mapping of str to str, optional
        ``site -> role`` (``'train'``, ``'external'``).
    now : datetime, optional
        The poll time (default: now, UTC).

    Returns
    -------
    list of NodeStatus
        The rows as written, one per site in ``sites``, sorted by site.

    Raises
    ------
    FileNotFoundError
        ``run.db`` does not exist.
    ValueError
        The file is not a run record, ``run_id`` is empty, or a listed node has no integer
        ``node_id``.

    Notes
    -----
    A site may map from several node ids (it reconnected under a new id): the last listed one is
    recorded. One short write transaction per call.
    """
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
    now = (now or datetime.now(UTC)).astimezone(UTC)
    listed: dict[int, Any] = {}
    for node in nodes:
        try:
            listed[int(node.node_id)] = node
        except (AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"a node without an integer node_id was listed: {node!r}") from exc
    # A site that reconnected can appear under several node ids: the newest listed one wins.
    by_site: dict[str, list[int]] = {}
    for nid, site in sites.items():
        by_site.setdefault(str(site), []).append(int(nid))
    stamp = _iso(now)
    rows: list[NodeStatus] = []
    for site in sorted(by_site):
        ids = by_site[site]
        seen = [i for i in ids if i in listed]
        role = (roles or {}).get(site)
        if seen:
            nid, status, last_seen, until, interval = _node_fields(listed[seen[-1]], now)
        else:
            nid, status, last_seen, until, interval = str(ids[-1]), "offline", None, None, None
        rows.append(NodeStatus(run_id, site, nid, role, status, status == "online", last_seen, until, interval,
                               stamp))
    path = _db_path(store)
    conn = _connect(path, readonly=False)
    changes: list[tuple[NodeStatus, str | None]] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_SCHEMA)
            for row in rows:
                old = conn.execute(
                    f"SELECT status FROM {TABLE} WHERE run_id = ? AND site = ?", (run_id, row.site)
                ).fetchone()
                conn.execute(
                    f"INSERT INTO {TABLE} (run_id, site, node_id, role, status, online, last_seen, online_until,"
                    " heartbeat_interval, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (run_id, site) DO UPDATE SET node_id = excluded.node_id,"
                    f" role = COALESCE(excluded.role, {TABLE}.role), status = excluded.status,"
                    f" online = excluded.online, last_seen = COALESCE(excluded.last_seen, {TABLE}.last_seen),"
                    f" online_until = COALESCE(excluded.online_until, {TABLE}.online_until),"
                    f" heartbeat_interval = COALESCE(excluded.heartbeat_interval, {TABLE}.heartbeat_interval),"
                    " updated_at = excluded.updated_at",
                    (run_id, row.site, row.node_id, row.role, row.status, int(row.online), row.last_seen,
                     row.online_until, row.heartbeat_interval, row.updated_at),
                )
                if old is None or old[0] != row.status:
                    changes.append((row, None if old is None else str(old[0])))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        written = _read(conn, run_id)
    finally:
        conn.close()
    _record_changes(store, run_id, changes)
    return [w for w in written if w.site in by_site]


def _record_changes(store: Any, run_id: str, changes: list[tuple[NodeStatus, str | None]]) -> None:
    """Events for state changes (first sighting online is not news: ``site_joined`` says it)."""
    if not hasattr(store, "event") or getattr(store, "readonly", True):
        return
    for row, old in changes:
        if old is None and row.online:
            continue
        kind = "site_online" if row.online else "site_offline"
        msg = (f"{row.site} is online again (node {row.node_id})" if row.online else
               f"{row.site} is offline (node {row.node_id} not listed by the SuperLink)")
        store.event(run_id, kind, msg, level="info" if row.online else "warning", site=row.site,
                    detail={"node_id": row.node_id, "last_seen": row.last_seen, "previous": old})
        logger.log(logging.INFO if row.online else logging.WARNING, "%s", msg)


def poll_grid(
    grid: Any,
    store: Any,
    run_id: str,
    sites: Mapping[int, str],
    *,
    roles: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> list[NodeStatus]:
    """Ask the grid which nodes are online and record every known site's liveness.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The run's grid. ``get_nodes()`` is used; a grid that only offers ``get_node_ids()`` is read
        as "these nodes are online".
    store, run_id, sites, roles, now
        As in :func:`record_node_status`.

    Returns
    -------
    list of NodeStatus
        As recorded; an empty list if the grid could not be asked (the failure is logged, never
        raised: liveness must not stop a run).
    """
    try:
        getter = getattr(grid, "get_nodes", None)
        if getter is not None:
            nodes: list[Any] = list(getter())
        else:
            nodes = [_BareNode(int(i)) for i in grid.get_node_ids()]
    except Exception as exc:  # noqa: BLE001 - a monitoring failure must not end a run
        logger.warning("could not ask the grid which nodes are online: %s: %s", type(exc).__name__, exc)
        return []
    try:
        return record_node_status(store, run_id, nodes, sites, roles=roles, now=now)
    except (sqlite3.Error, OSError, ValueError) as exc:
        logger.warning("could not record site liveness in %s: %s", _db_path(store), exc)
        return []


@dataclass(frozen=True)
class _BareNode:
    node_id: int


def _read(conn: sqlite3.Connection, run_id: str) -> list[NodeStatus]:
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)).fetchone()
    if exists is None:
        return []
    cur = conn.execute(
        f"SELECT run_id, site, node_id, role, status, online, last_seen, online_until, heartbeat_interval,"
        f" updated_at FROM {TABLE} WHERE run_id = ? ORDER BY site",
        (run_id,),
    )
    return [NodeStatus(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8], r[9]) for r in cur.fetchall()]


def read_node_status(source: Any, run_id: str) -> list[NodeStatus]:
    """The recorded liveness of every site of ``run_id`` (empty if none was ever recorded).

    Parameters
    ----------
    source : sqlite3.Connection or server.store.RunStore or str or Path
        An open connection (used as is, e.g. a read-only dashboard connection), or a run record,
        which is opened read-only.
    run_id : str

    Returns
    -------
    list of NodeStatus
        Sorted by site.
    """
    if isinstance(source, sqlite3.Connection):
        return _read(source, run_id)
    conn = getattr(source, "conn", None)
    if isinstance(conn, sqlite3.Connection):
        return _read(conn, run_id)
    ro = _connect(_db_path(source), readonly=True)
    try:
        return _read(ro, run_id)
    finally:
        ro.close()
