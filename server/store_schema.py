"""The run record's schema: tables, columns, versions and value conventions (see :mod:`server.store`).

Schema versioning
-----------------
``PRAGMA user_version`` holds the schema version (:data:`SCHEMA_VERSION`). A new file gets the
schema and the version in one transaction. A file with a newer or unknown version, or a file that is
not a run record, raises :class:`StoreError` naming the file and both versions; older versions are
migrated by the functions in ``_MIGRATIONS`` (none yet).

Conventions
-----------
Timestamps are UTC ISO-8601 strings with millisecond precision
(``2025-01-31T12:00:00.123+00:00``), so they sort as text; ``pd.to_datetime(col, utc=True)``
converts them. JSON columns (``detail``, ``meta``) hold ``json.dumps(obj, sort_keys=True)``;
NumPy scalars are converted to Python numbers, paths to strings, and non-finite floats to ``null``
so that every JSON value is standard JSON (readable by a browser dashboard). The DataFrame readers
return the JSON columns decoded (``dict``/``None``), integer columns as pandas ``Int64`` and
real columns as ``float64`` (``NaN`` for ``NULL``).

Tables
------
``runs``
    One row per run. ``run_id`` (primary key, the run directory's name), ``name``, ``created_at``,
    ``finished_at`` (``NULL`` while running), ``status`` (``'running'``, ``'completed'``,
    ``'failed'``, ``'interrupted'``), ``config_yaml`` (the resolved config), ``config_digest``,
    ``mode`` (``'federated'``, ``'pooled'``, ``'local'``), ``strategy``, ``seed``, ``engine``
    (``'simulation'``, ``'deployment'``), ``error`` (the error text of a failed or interrupted run).
``stages``
    One row per execution of a pipeline stage (``'discover'``, ``'train'``, ``'signatures'``,
    ``'evaluate'``, ``'fusion'``, ``'report'``, ...); a resumed run adds new rows. ``run_id``,
    ``name``, ``started_at``, ``finished_at``, ``status`` (``'running'``, ``'completed'``,
    ``'failed'``, ``'skipped'``), ``detail`` (JSON; ``{"error": "Type: message"}`` for a failed
    stage, ``{"reason": ...}`` for a skipped one, plus whatever the stage body put in the dict that
    :meth:`RunStore.stage` yields).
``rounds``
    One row per federated round of a stage, unique on ``(run_id, stage, round)``: ``started_at``,
    ``finished_at``, ``status`` (``'running'``, ``'completed'``, ``'failed'``), ``n_sent``
    (messages sent), ``n_replied`` (valid replies), ``n_failed`` (error replies and sites that did
    not answer), ``train_loss`` (mean over the replying sites, ``NULL`` if none reported one),
    ``bytes_down`` / ``bytes_up`` (model payload sent to / received from the sites), ``seconds``
    (wall time). A round restarted after a resume overwrites its row.
``site_metrics``
    Aggregate metrics per site: ``run_id``, ``stage``, ``round`` (``NULL`` outside rounds),
    ``site``, ``split`` (``'train'``, ``'val'``, ``'test'``, ``'external'`` or ``NULL``), ``key``
    (e.g. ``'pre_t2w/auc'``, ``'loss'``), ``value`` (``NULL`` when the reported value was NaN or
    infinite; see :meth:`RunStore.log_metric`), ``n`` (the number of cases behind the value),
    ``created_at``. Aggregates only: per-patient values never leave a site and must never be stored.
``events``
    Things that happened: ``run_id``, ``ts``, ``level`` (``'info'``, ``'warning'``, ``'error'``),
    ``kind`` (``'site_failed'``, ``'site_dropped'``, ``'reply_rejected'``, ``'resumed'``,
    ``'checkpoint'``, ``'non_finite_metric'``, ...), ``site``, ``round``, ``message`` (one line for
    the operator), ``detail`` (JSON).
``artefacts``
    Files the run produced, unique on ``(run_id, path)`` (a rewritten file replaces its row):
    ``kind`` (``'checkpoint'``, ``'model'``, ``'report'``, ``'figure'``, ``'table'``,
    ``'config'``), ``path`` (POSIX path relative to the run directory), ``sha256``, ``bytes``,
    ``created_at``, ``meta`` (JSON).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DB_NAME = "run.db"
"""File name of the run record inside a run directory."""

SCHEMA_VERSION = 1
"""Schema version written to ``PRAGMA user_version``."""

RUN_STATUSES = ("running", "completed", "failed", "interrupted")
STAGE_STATUSES = ("running", "completed", "failed", "skipped")
ROUND_STATUSES = ("running", "completed", "failed")
MODES = ("federated", "pooled", "local")
ENGINES = ("simulation", "deployment")
SPLITS = ("train", "val", "test", "external")
LEVELS = ("info", "warning", "error")
ARTEFACT_KINDS = ("checkpoint", "model", "report", "figure", "table", "config")

_BUSY_TIMEOUT_S = 30.0


def _check_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


_SCHEMA_V1 = f"""
CREATE TABLE runs (
    run_id        TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    finished_at   TEXT,
    status        TEXT NOT NULL CHECK (status IN ({_check_list(RUN_STATUSES)})),
    config_yaml   TEXT NOT NULL,
    config_digest TEXT NOT NULL,
    mode          TEXT NOT NULL CHECK (mode IN ({_check_list(MODES)})),
    strategy      TEXT NOT NULL,
    seed          INTEGER NOT NULL,
    engine        TEXT NOT NULL CHECK (engine IN ({_check_list(ENGINES)})),
    error         TEXT
);
CREATE TABLE stages (
    id          INTEGER PRIMARY KEY,
    run_id      TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    status      TEXT NOT NULL CHECK (status IN ({_check_list(STAGE_STATUSES)})),
    detail      TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX stages_run ON stages(run_id, name);
CREATE TABLE rounds (
    id          INTEGER PRIMARY KEY,
    run_id      TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    stage       TEXT NOT NULL,
    round       INTEGER NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    status      TEXT NOT NULL CHECK (status IN ({_check_list(ROUND_STATUSES)})),
    n_sent      INTEGER NOT NULL,
    n_replied   INTEGER,
    n_failed    INTEGER,
    train_loss  REAL,
    bytes_down  INTEGER,
    bytes_up    INTEGER,
    seconds     REAL,
    UNIQUE (run_id, stage, round)
);
CREATE TABLE site_metrics (
    id         INTEGER PRIMARY KEY,
    run_id     TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    stage      TEXT NOT NULL,
    round      INTEGER,
    site       TEXT NOT NULL,
    split      TEXT CHECK (split IS NULL OR split IN ({_check_list(SPLITS)})),
    key        TEXT NOT NULL,
    value      REAL,
    n          INTEGER,
    created_at TEXT NOT NULL
);
CREATE INDEX site_metrics_run ON site_metrics(run_id, stage, key);
CREATE TABLE events (
    id      INTEGER PRIMARY KEY,
    run_id  TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    ts      TEXT NOT NULL,
    level   TEXT NOT NULL CHECK (level IN ({_check_list(LEVELS)})),
    kind    TEXT NOT NULL,
    site    TEXT,
    round   INTEGER,
    message TEXT NOT NULL,
    detail  TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX events_run ON events(run_id, ts);
CREATE TABLE artefacts (
    id         INTEGER PRIMARY KEY,
    run_id     TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    kind       TEXT NOT NULL CHECK (kind IN ({_check_list(ARTEFACT_KINDS)})),
    path       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    bytes      INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    meta       TEXT NOT NULL DEFAULT '{{}}',
    UNIQUE (run_id, path)
);
"""

#: ``from_version -> function(cursor)`` upgrading a record by one version, run inside a transaction.
_MIGRATIONS: dict[int, Callable[[sqlite3.Cursor], None]] = {}

_TABLES = ("runs", "stages", "rounds", "site_metrics", "events", "artefacts")

# Reader column types: "int" -> Int64, "real" -> float64, "json" -> decoded, anything else -> object.
_COLUMNS: dict[str, dict[str, str]] = {
    "runs": {
        "run_id": "text",
        "name": "text",
        "created_at": "text",
        "finished_at": "text",
        "status": "text",
        "config_yaml": "text",
        "config_digest": "text",
        "mode": "text",
        "strategy": "text",
        "seed": "int",
        "engine": "text",
        "error": "text",
    },
    "stages": {
        "id": "int",
        "run_id": "text",
        "name": "text",
        "started_at": "text",
        "finished_at": "text",
        "status": "text",
        "detail": "json",
    },
    "rounds": {
        "id": "int",
        "run_id": "text",
        "stage": "text",
        "round": "int",
        "started_at": "text",
        "finished_at": "text",
        "status": "text",
        "n_sent": "int",
        "n_replied": "int",
        "n_failed": "int",
        "train_loss": "real",
        "bytes_down": "int",
        "bytes_up": "int",
        "seconds": "real",
    },
    "site_metrics": {
        "id": "int",
        "run_id": "text",
        "stage": "text",
        "round": "int",
        "site": "text",
        "split": "text",
        "key": "text",
        "value": "real",
        "n": "int",
        "created_at": "text",
    },
    "events": {
        "id": "int",
        "run_id": "text",
        "ts": "text",
        "level": "text",
        "kind": "text",
        "site": "text",
        "round": "int",
        "message": "text",
        "detail": "json",
    },
    "artefacts": {
        "id": "int",
        "run_id": "text",
        "kind": "text",
        "path": "text",
        "sha256": "text",
        "bytes": "int",
        "created_at": "text",
        "meta": "json",
    },
}


class StoreError(RuntimeError):
    """The run record cannot be opened, or a write was refused (bad value, unknown run, ...)."""


def utc_now() -> str:
    """The current time as a UTC ISO-8601 string with millisecond precision."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _jsonable(obj: Any) -> Any:
    """``obj`` with NumPy scalars/arrays, paths, sets and non-finite floats made standard JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = sorted(obj, key=str) if isinstance(obj, set | frozenset) else obj
        return [_jsonable(v) for v in items]
    if isinstance(obj, Path):
        return obj.as_posix()
    if hasattr(obj, "tolist") and callable(obj.tolist):  # NumPy scalars and arrays
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _dumps(obj: Mapping[str, Any] | None) -> str:
    try:
        return json.dumps(_jsonable(obj or {}), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"detail/meta is not JSON-serialisable: {exc}") from exc


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _choice(what: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise StoreError(f"{what} must be one of {_check_list(allowed)}, got {value!r}")
    return str(value)


def _opt_int(what: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        as_int = int(value)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be an integer, got {value!r}") from exc
    if as_int != value:
        raise StoreError(f"{what} must be an integer, got {value!r}")
    return as_int


def _opt_float(what: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be a number, got {value!r}") from exc


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size
