"""The run record: a SQLite database (``RUN_DIR/run.db``) that every run writes.

The server process writes the record as the run goes; the operator dashboard and the report read it,
possibly while the run is still writing (a second process holding a read-only :class:`RunStore`).
Only the standard library :mod:`sqlite3` is used, so the file can also be opened with any SQLite
tool (``sqlite3 run.db``, DB Browser for SQLite, pandas).

Concurrency and crash safety
----------------------------
* The database is in WAL mode: one writer process and any number of concurrent readers, readers never
  block the writer and always see the last committed state. WAL needs shared memory, so ``run.db``
  must live on a local file system (not NFS/SMB).
* One connection per :class:`RunStore` (guarded by a lock, so a store may be shared between threads
  of one process). Foreign keys are on and ``synchronous=FULL``.
* Every write is one short ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction; no transaction is held
  open across a stage or a round. A process killed at any point therefore leaves a consistent
  database holding everything written up to the last commit: a round that was started but never
  finished stays ``'running'`` (never ``'completed'``), and :meth:`RunStore.last_completed_round`
  ignores it. When the run is resumed (:meth:`RunStore.start_run` again with the same config
  digest) or finished (:meth:`RunStore.finish_run`), stages and rounds still marked ``'running'``
  are closed as ``'failed'``, so the dashboard never shows a stale "running" stage of a run that
  ended.

The schema, its versioning and the column conventions are in :mod:`server.store_schema`; the
DataFrame readers (shared with the dashboard) in :mod:`server.store_read`.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from server.store_read import RunRecordReader
from server.store_schema import (  # noqa: F401 - DB_NAME, SCHEMA_VERSION, StoreError are re-exported
    _BUSY_TIMEOUT_S,
    _MIGRATIONS,
    _SCHEMA_V1,
    ARTEFACT_KINDS,
    DB_NAME,
    ENGINES,
    LEVELS,
    MODES,
    ROUND_STATUSES,
    RUN_STATUSES,
    SCHEMA_VERSION,
    SPLITS,
    StoreError,
    _choice,
    _dumps,
    _loads,
    _opt_float,
    _opt_int,
    _sha256,
    utc_now,
)

logger = logging.getLogger(__name__)

__all__ = ["DB_NAME", "SCHEMA_VERSION", "RunStore", "StoreError"]


class RunStore(RunRecordReader):
    """Read and write the run record of one run directory (``RUN_DIR/run.db``).

    Parameters
    ----------
    path : str or Path
        The database file. A writable store creates the file (and its parent folders) and the
        schema if they do not exist.
    readonly : bool, default False
        Open read-only (the dashboard, the report): never creates or changes anything; every write
        method raises :class:`StoreError`. The file must exist and hold a run record.

    Raises
    ------
    StoreError
        A read-only store on a missing file, a file that is not a run record, or a record with a
        newer/unknown schema version. The message names the file.

    Notes
    -----
    Use as a context manager, or call :meth:`close`. Write methods that take a ``run_id`` need the
    run to exist (:meth:`start_run` first); an unknown ``run_id`` raises :class:`StoreError`.

    Examples
    --------
    >>> with RunStore.open_run_dir(run_dir) as store:           # doctest: +SKIP
    ...     store.start_run("r1", "demo", yaml_text, digest, "federated", "fedavg", 42, "simulation")
    ...     with store.stage("r1", "train"):
    ...         store.start_round("r1", "train", 1, n_sent=3)
    ...         store.finish_round("r1", "train", 1, n_replied=3, n_failed=0, train_loss=0.61)
    ...     store.finish_run("r1", "completed")
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        if readonly:
            if not self.path.is_file():
                raise StoreError(
                    f"run record {self.path} does not exist (opened read-only, nothing is created)"
                )
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            conn = self._connect(uri, uri=True)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect(str(self.path), uri=False)
        self._conn = conn
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            if not readonly:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    logger.warning(
                        "%s: could not switch to WAL (journal_mode=%s); concurrent readers may "
                        "block the writer",
                        self.path,
                        mode,
                    )
                conn.execute("PRAGMA synchronous = FULL")
            self._ensure_schema()
        except BaseException:
            self.close()
            raise
        logger.debug("opened run record %s (%s)", self.path, "read-only" if readonly else "read-write")

    def _connect(self, target: str, *, uri: bool) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; every write opens its own BEGIN IMMEDIATE.
            return sqlite3.connect(
                target, uri=uri, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open run record {self.path}: {exc}") from exc

    @classmethod
    def open_run_dir(cls, run_dir: str | Path, *, readonly: bool = False) -> RunStore:
        """Open ``run_dir / "run.db"``.

        Parameters
        ----------
        run_dir : str or Path
            The run directory.
        readonly : bool, default False
            See :class:`RunStore`.

        Returns
        -------
        RunStore
        """
        return cls(Path(run_dir) / DB_NAME, readonly=readonly)

    # ------------------------------------------------------------------ plumbing
    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"run record {self.path} is closed")
        return self._conn

    def _ensure_schema(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION or (version and version not in _MIGRATIONS):
            raise StoreError(
                f"run record {self.path} has schema version {version}, this rectalfl reads version "
                f"{SCHEMA_VERSION}{' and older' if _MIGRATIONS else ''}; it was written by a newer or "
                "unknown version of rectalfl; upgrade rectalfl to read it"
            )
        if self.readonly:
            if version == 0:
                raise StoreError(f"{self.path} is not a rectalfl run record (no schema version)")
            raise StoreError(
                f"run record {self.path} has schema version {version} and needs migrating to "
                f"{SCHEMA_VERSION}; open it once read-write"
            )
        with self._tx() as cur:
            # Re-read inside the write lock: another writer may have just created/migrated it.
            version = cur.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                tables = [
                    r[0]
                    for r in cur.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                    )
                ]
                if tables:
                    raise StoreError(
                        f"{self.path} is an SQLite database but not a rectalfl run record "
                        f"(tables: {', '.join(sorted(tables))})"
                    )
                for stmt in _SCHEMA_V1.split(";"):
                    if stmt.strip():
                        cur.execute(stmt)
                version = SCHEMA_VERSION
                logger.info("created run record %s (schema v%d)", self.path, SCHEMA_VERSION)
            while version < SCHEMA_VERSION:
                _MIGRATIONS[version](cur)
                logger.info("migrated run record %s from schema v%d to v%d", self.path, version, version + 1)
                version += 1
            cur.execute(f"PRAGMA user_version = {int(version)}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        """One short write transaction; sqlite errors become :class:`StoreError`."""
        if self.readonly:
            raise StoreError(f"run record {self.path} is open read-only")
        with self._lock:
            conn = self.conn
            cur = conn.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write run record {self.path}: {exc}") from exc
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.IntegrityError) and "FOREIGN KEY" in str(exc):
                    raise StoreError(
                        f"run record {self.path}: unknown run_id (call start_run first): {exc}"
                    ) from exc
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"run record {self.path}: write failed: {exc}") from exc
                raise
            finally:
                cur.close()

    def _require_run(self, cur: sqlite3.Cursor, run_id: str) -> None:
        if cur.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
            raise StoreError(f"run record {self.path} has no run {run_id!r} (call start_run first)")

    def _close_running(self, cur: sqlite3.Cursor, run_id: str, reason: str) -> None:
        """Mark stages and rounds of ``run_id`` still ``'running'`` as ``'failed'``."""
        now = utc_now()
        stale = cur.execute(
            "SELECT id, detail FROM stages WHERE run_id = ? AND status = 'running'", (run_id,)
        ).fetchall()
        for sid, detail in stale:
            merged = {**(_loads(detail) or {}), "error": reason}
            cur.execute(
                "UPDATE stages SET status = 'failed', finished_at = ?, detail = ? WHERE id = ?",
                (now, _dumps(merged), sid),
            )
        n_rounds = cur.execute(
            "UPDATE rounds SET status = 'failed', finished_at = ? WHERE run_id = ? AND status = 'running'",
            (now, run_id),
        ).rowcount
        if stale or n_rounds:
            logger.info(
                "run %s: closed %d stage(s) and %d round(s) left running (%s)",
                run_id,
                len(stale),
                n_rounds,
                reason,
            )

    # ------------------------------------------------------------------ runs
    def start_run(
        self,
        run_id: str,
        name: str,
        config_yaml: str,
        config_digest: str,
        mode: str,
        strategy: str,
        seed: int,
        engine: str,
    ) -> None:
        """Record the start of a run, or the resumption of an existing one.

        Parameters
        ----------
        run_id : str
            Unique id of the run (the run directory's name).
        name : str
            The config's name.
        config_yaml : str
            The resolved config as YAML.
        config_digest : str
            The config's digest; a resumed run must have the same one.
        mode : {'federated', 'pooled', 'local'}
        strategy : str
            Aggregation strategy (``'fedavg'``, ``'fedprox'``, ``'fedadam'``, ...).
        seed : int
        engine : {'simulation', 'deployment'}

        Raises
        ------
        StoreError
            ``run_id`` exists with a different config digest, or a bad ``mode``/``engine``.

        Notes
        -----
        Idempotent for an existing ``run_id`` with the same digest (resume): the row keeps its
        ``created_at``, its status becomes ``'running'`` again (``finished_at`` and ``error``
        cleared), and stages/rounds left ``'running'`` by the previous process are closed as
        ``'failed'``. The other columns are not changed.
        """
        _choice("mode", mode, MODES)
        _choice("engine", engine, ENGINES)
        seed_i = _opt_int("seed", seed)
        if seed_i is None:
            raise StoreError("seed must be an integer, got None")
        with self._tx() as cur:
            row = cur.execute("SELECT config_digest, status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                cur.execute(
                    "INSERT INTO runs (run_id, name, created_at, finished_at, status, config_yaml,"
                    " config_digest, mode, strategy, seed, engine, error)"
                    " VALUES (?, ?, ?, NULL, 'running', ?, ?, ?, ?, ?, ?, NULL)",
                    (run_id, name, utc_now(), config_yaml, config_digest, mode, strategy, seed_i, engine),
                )
                logger.info("run %s started (%s, %s, %s)", run_id, mode, strategy, engine)
                return
            old_digest, old_status = row
            if old_digest != config_digest:
                raise StoreError(
                    f"run {run_id!r} already exists in {self.path} with config digest {old_digest}, not "
                    f"{config_digest}; a run can only be resumed with its original config (start a new run "
                    "instead)"
                )
            self._close_running(cur, run_id, "the process ended before this finished")
            cur.execute(
                "UPDATE runs SET status = 'running', finished_at = NULL, error = NULL WHERE run_id = ?",
                (run_id,),
            )
            logger.info("run %s reopened (was %s)", run_id, old_status)

    def finish_run(self, run_id: str, status: str, error: str | None = None) -> None:
        """Record the end of a run.

        Parameters
        ----------
        run_id : str
        status : {'completed', 'failed', 'interrupted'}
        error : str, optional
            Error text of a failed or interrupted run.

        Raises
        ------
        StoreError
            Unknown ``run_id`` or bad ``status``.

        Notes
        -----
        Stages and rounds of the run still marked ``'running'`` are closed as ``'failed'``.
        """
        _choice("status", status, RUN_STATUSES[1:])
        with self._tx() as cur:
            self._require_run(cur, run_id)
            self._close_running(cur, run_id, f"still running when the run ended ({status})")
            cur.execute(
                "UPDATE runs SET status = ?, finished_at = ?, error = ? WHERE run_id = ?",
                (status, utc_now(), error, run_id),
            )
        log = logger.info if status == "completed" else logger.warning
        log("run %s %s%s", run_id, status, f": {error}" if error else "")

    # ------------------------------------------------------------------ stages
    @contextmanager
    def stage(self, run_id: str, name: str) -> Iterator[dict[str, Any]]:
        """Record a pipeline stage around a ``with`` block.

        Parameters
        ----------
        run_id : str
        name : str
            ``'discover'``, ``'train'``, ``'signatures'``, ``'evaluate'``, ``'fusion'``, ``'report'``...

        Yields
        ------
        dict
            The stage's ``detail``; whatever JSON-serialisable items the block puts in it are stored
            when the stage ends.

        Notes
        -----
        The row is written ``'running'`` on entry, ``'completed'`` on normal exit, and ``'failed'``
        with ``detail["error"] = "Type: message"`` if the block raises (any exception, including
        ``KeyboardInterrupt``); the exception is re-raised unchanged. A failure to write the failed
        status is logged and never masks the block's exception.
        """
        with self._tx() as cur:
            self._require_run(cur, run_id)
            cur.execute(
                "INSERT INTO stages (run_id, name, started_at, status, detail) "
                "VALUES (?, ?, ?, 'running', '{}')",
                (run_id, name, utc_now()),
            )
            stage_id = cur.lastrowid
        logger.info("run %s: stage %s started", run_id, name)
        detail: dict[str, Any] = {}
        try:
            yield detail
        except BaseException as exc:
            detail["error"] = f"{type(exc).__name__}: {exc}"
            try:
                self._end_stage(stage_id, "failed", detail)
            except Exception:  # never mask the stage's own exception
                logger.exception("run %s: could not record stage %s as failed", run_id, name)
            logger.warning("run %s: stage %s failed: %s", run_id, name, detail["error"])
            raise
        self._end_stage(stage_id, "completed", detail)
        logger.info("run %s: stage %s completed", run_id, name)

    def _end_stage(self, stage_id: int | None, status: str, detail: Mapping[str, Any]) -> None:
        with self._tx() as cur:
            cur.execute(
                "UPDATE stages SET status = ?, finished_at = ?, detail = ? WHERE id = ?",
                (status, utc_now(), _dumps(detail), stage_id),
            )

    def skip_stage(self, run_id: str, name: str, reason: str) -> None:
        """Record that a stage was skipped (``status='skipped'``, ``detail={"reason": reason}``).

        Parameters
        ----------
        run_id : str
        name : str
        reason : str
        """
        now = utc_now()
        with self._tx() as cur:
            self._require_run(cur, run_id)
            cur.execute(
                "INSERT INTO stages (run_id, name, started_at, finished_at, status, detail) "
                "VALUES (?, ?, ?, ?, 'skipped', ?)",
                (run_id, name, now, now, _dumps({"reason": reason})),
            )
        logger.info("run %s: stage %s skipped: %s", run_id, name, reason)

    # ------------------------------------------------------------------ rounds
    def start_round(self, run_id: str, stage: str, rnd: int, n_sent: int) -> None:
        """Record that round ``rnd`` of ``stage`` started, with ``n_sent`` messages sent.

        Parameters
        ----------
        run_id : str
        stage : str
        rnd : int
            Round number (1-based).
        n_sent : int
            Number of sites the round's messages went to.

        Notes
        -----
        A round that already has a row (a resumed run re-running a round the previous process did not
        finish) is reset to ``'running'`` with the new start time; the reply counts, loss, bytes and
        seconds are cleared until :meth:`finish_round`.
        """
        rnd_i = _opt_int("round", rnd)
        n_i = _opt_int("n_sent", n_sent)
        with self._tx() as cur:
            self._require_run(cur, run_id)
            old = cur.execute(
                "SELECT status FROM rounds WHERE run_id = ? AND stage = ? AND round = ?",
                (run_id, stage, rnd_i),
            ).fetchone()
            if old is not None and old[0] == "completed":
                logger.warning(
                    "run %s: %s round %d was completed and is being run again", run_id, stage, rnd_i
                )
            cur.execute(
                "INSERT INTO rounds (run_id, stage, round, started_at, status, n_sent)"
                " VALUES (?, ?, ?, ?, 'running', ?)"
                " ON CONFLICT (run_id, stage, round) DO UPDATE SET started_at = excluded.started_at,"
                " finished_at = NULL, status = 'running', n_sent = excluded.n_sent, n_replied = NULL,"
                " n_failed = NULL, train_loss = NULL, bytes_down = NULL, bytes_up = NULL, seconds = NULL",
                (run_id, stage, rnd_i, utc_now(), n_i),
            )

    def finish_round(
        self,
        run_id: str,
        stage: str,
        rnd: int,
        *,
        n_replied: int,
        n_failed: int,
        train_loss: float | None = None,
        bytes_down: int = 0,
        bytes_up: int = 0,
        seconds: float | None = None,
        status: str = "completed",
    ) -> None:
        """Record the end of round ``rnd`` of ``stage``.

        Parameters
        ----------
        run_id, stage : str
        rnd : int
        n_replied : int
            Valid replies.
        n_failed : int
            Error replies plus sites that did not answer.
        train_loss : float, optional
            Mean training loss of the round; NaN/inf are stored as ``NULL``.
        bytes_down, bytes_up : int, default 0
            Model payload sent to / received from the sites.
        seconds : float, optional
            Wall time of the round; by default the time since :meth:`start_round`.
        status : {'completed', 'failed'}, default 'completed'

        Raises
        ------
        StoreError
            The round was never started, or a bad ``status``.
        """
        _choice("status", status, ROUND_STATUSES[1:])
        loss = _opt_float("train_loss", train_loss)
        if loss is not None and not math.isfinite(loss):
            loss = None
        now = utc_now()
        with self._tx() as cur:
            row = cur.execute(
                "SELECT id, started_at FROM rounds WHERE run_id = ? AND stage = ? AND round = ?",
                (run_id, stage, rnd),
            ).fetchone()
            if row is None:
                raise StoreError(
                    f"run {run_id!r}: {stage} round {rnd} was never started (call start_round first)"
                )
            secs = _opt_float("seconds", seconds)
            if secs is None:
                secs = (datetime.fromisoformat(now) - datetime.fromisoformat(row[1])).total_seconds()
            cur.execute(
                "UPDATE rounds SET finished_at = ?, status = ?, n_replied = ?, n_failed = ?, train_loss = ?,"
                " bytes_down = ?, bytes_up = ?, seconds = ? WHERE id = ?",
                (
                    now,
                    status,
                    _opt_int("n_replied", n_replied),
                    _opt_int("n_failed", n_failed),
                    loss,
                    _opt_int("bytes_down", bytes_down),
                    _opt_int("bytes_up", bytes_up),
                    secs,
                    row[0],
                ),
            )

    def last_completed_round(self, run_id: str, stage: str = "train") -> int:
        """The highest round of ``stage`` recorded as ``'completed'`` (0 if none).

        Rounds left ``'running'`` (a killed process) or ``'failed'`` are ignored.

        Parameters
        ----------
        run_id : str
        stage : str, default 'train'

        Returns
        -------
        int
        """
        with self._lock:
            row = self.conn.execute(
                "SELECT MAX(round) FROM rounds WHERE run_id = ? AND stage = ? AND status = 'completed'",
                (run_id, stage),
            ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    # ------------------------------------------------------------------ metrics and events
    def log_metric(
        self,
        run_id: str,
        stage: str,
        site: str,
        key: str,
        value: float,
        *,
        round: int | None = None,
        split: str | None = None,
        n: int | None = None,
    ) -> None:
        """Record one aggregate metric of one site.

        Parameters
        ----------
        run_id, stage, site : str
        key : str
            Metric name, e.g. ``'pre_t2w/auc'`` or ``'loss'``.
        value : float
            The value. A NaN or infinite value is **not** rejected (a site with one class in a split
            legitimately has no AUC): it is stored as ``NULL`` and a ``'non_finite_metric'`` warning
            event (detail: stage, key, value as text, split) is recorded in the same transaction.
        round : int, optional
        split : {'train', 'val', 'test', 'external'}, optional
        n : int, optional
            Number of cases behind the value.

        Raises
        ------
        StoreError
            Unknown run, bad ``split``, or a value that is not a number.

        Notes
        -----
        Aggregates only: never log per-patient values.
        """
        self.log_metrics(run_id, stage, site, {key: value}, round=round, split=split, n=n)

    def log_metrics(
        self,
        run_id: str,
        stage: str,
        site: str,
        metrics: Mapping[str, float],
        *,
        round: int | None = None,
        split: str | None = None,
        n: int | None = None,
    ) -> None:
        """Record several metrics of one site in one transaction (see :meth:`log_metric`).

        Parameters
        ----------
        run_id, stage, site : str
        metrics : mapping of str to float
        round, split, n
            As in :meth:`log_metric`, shared by all the metrics.
        """
        if split is not None:
            _choice("split", split, SPLITS)
        rnd = _opt_int("round", round)
        n_i = _opt_int("n", n)
        rows: list[tuple[str, float | None]] = []
        bad: list[tuple[str, float]] = []
        for key, value in metrics.items():
            v = _opt_float(f"metric {key!r}", value)
            if v is not None and not math.isfinite(v):
                bad.append((key, v))
                v = None
            rows.append((str(key), v))
        if not rows:
            return
        now = utc_now()
        with self._tx() as cur:
            cur.executemany(
                "INSERT INTO site_metrics (run_id, stage, round, site, split, key, value, n, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(run_id, stage, rnd, site, split, key, v, n_i, now) for key, v in rows],
            )
            for key, v in bad:
                cur.execute(
                    "INSERT INTO events (run_id, ts, level, kind, site, round, message, detail) "
                    "VALUES (?, ?, 'warning', 'non_finite_metric', ?, ?, ?, ?)",
                    (
                        run_id,
                        now,
                        site,
                        rnd,
                        f"{site}: {stage} metric {key} is {v}; stored as NULL",
                        _dumps({"stage": stage, "key": key, "value": str(v), "split": split}),
                    ),
                )
        for key, v in bad:
            logger.warning("run %s: %s metric %s of %s is %s; stored as NULL", run_id, stage, key, site, v)

    def event(
        self,
        run_id: str,
        kind: str,
        message: str,
        *,
        level: str = "info",
        site: str | None = None,
        round: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Record an event.

        Parameters
        ----------
        run_id : str
        kind : str
            ``'site_failed'``, ``'site_dropped'``, ``'reply_rejected'``, ``'resumed'``, ``'checkpoint'``...
        message : str
            One line for the operator.
        level : {'info', 'warning', 'error'}, default 'info'
        site : str, optional
        round : int, optional
        detail : mapping, optional
            JSON-serialisable extra information.
        """
        _choice("level", level, LEVELS)
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO events (run_id, ts, level, kind, site, round, message, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, utc_now(), level, kind, site, _opt_int("round", round), message, _dumps(detail)),
            )

    # ------------------------------------------------------------------ artefacts
    def add_artefact(
        self,
        run_id: str,
        kind: str,
        path: str | Path,
        run_dir: str | Path,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Record a file the run produced, with its SHA-256 and size.

        Parameters
        ----------
        run_id : str
        kind : {'checkpoint', 'model', 'report', 'figure', 'table', 'config'}
        path : str or Path
            The file: absolute, or relative to ``run_dir``. It must exist and lie inside ``run_dir``.
        run_dir : str or Path
            The run directory; the stored path is relative to it (POSIX separators).
        meta : mapping, optional
            JSON-serialisable extra information.

        Raises
        ------
        StoreError
            Missing file, a file outside ``run_dir``, or a bad ``kind``.

        Notes
        -----
        The hash is computed before the (short) write transaction. Recording the same path again
        (a rewritten file) replaces its row.
        """
        _choice("kind", kind, ARTEFACT_KINDS)
        root = Path(run_dir).resolve()
        file = Path(path)
        file = (file if file.is_absolute() else root / file).resolve()
        try:
            rel = file.relative_to(root).as_posix()
        except ValueError as exc:
            raise StoreError(f"artefact {file} is not inside the run directory {root}") from exc
        if not file.is_file():
            raise StoreError(f"artefact {file} does not exist or is not a file")
        sha, size = _sha256(file)
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO artefacts (run_id, kind, path, sha256, bytes, created_at, meta) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, path) DO UPDATE SET kind = excluded.kind,"
                " sha256 = excluded.sha256, bytes = excluded.bytes, created_at = excluded.created_at,"
                " meta = excluded.meta",
                (run_id, kind, rel, sha, size, utc_now(), _dumps(meta)),
            )
        logger.debug("run %s: %s artefact %s (%d bytes, sha256 %s)", run_id, kind, rel, size, sha[:12])

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else ("read-only" if self.readonly else "read-write")
        return f"RunStore({str(self.path)!r}, {state})"
