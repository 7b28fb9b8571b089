"""DataFrame readers of the run record, shared by :class:`server.store.RunStore` and the dashboard.

Read-only: these methods only ``SELECT``. Column types are decoded as :mod:`server.store_schema`
says (JSON columns to dicts, integers to ``Int64``, reals to ``float64``).
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import pandas as pd

from server.store_schema import _COLUMNS, LEVELS, _choice, _loads


class RunRecordReader:
    """Mixin: the readers of a run record, over ``self.conn`` guarded by ``self._lock``."""

    _lock: threading.RLock
    conn: sqlite3.Connection

    def _frame(
        self, table: str, where: str = "", params: tuple[Any, ...] = (), order: str = "id"
    ) -> pd.DataFrame:
        cols = _COLUMNS[table]
        sql = f"SELECT {', '.join(cols)} FROM {table}{f' WHERE {where}' if where else ''} ORDER BY {order}"
        with self._lock:
            rows = self.conn.execute(sql, params).fetchall()
        df = pd.DataFrame.from_records(rows, columns=list(cols))
        for col, typ in cols.items():
            if typ == "int":
                df[col] = df[col].astype("Int64")
            elif typ == "real":
                df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
            elif typ == "json":
                df[col] = df[col].map(_loads).astype(object)
            else:
                df[col] = df[col].astype(object)
        return df

    def runs(self) -> pd.DataFrame:
        """All runs in the record, oldest first (columns as in the ``runs`` table)."""
        return self._frame("runs", order="created_at, run_id")

    def stages(self, run_id: str) -> pd.DataFrame:
        """The stages of ``run_id`` in the order they started; ``detail`` decoded."""
        return self._frame("stages", "run_id = ?", (run_id,))

    def rounds(self, run_id: str, stage: str | None = None) -> pd.DataFrame:
        """The rounds of ``run_id`` (optionally of one ``stage``), by stage and round."""
        where, params = "run_id = ?", (run_id,)
        if stage is not None:
            where, params = where + " AND stage = ?", (run_id, stage)
        return self._frame("rounds", where, params, order="stage, round")

    def metrics(self, run_id: str, stage: str | None = None, key: str | None = None) -> pd.DataFrame:
        """The site metrics of ``run_id``, optionally of one ``stage`` and/or ``key``, in logging order."""
        where, params = "run_id = ?", [run_id]
        if stage is not None:
            where += " AND stage = ?"
            params.append(stage)
        if key is not None:
            where += " AND key = ?"
            params.append(key)
        return self._frame("site_metrics", where, tuple(params))

    def events(self, run_id: str, level: str | None = None) -> pd.DataFrame:
        """The events of ``run_id`` (optionally of one ``level``) in order; ``detail`` decoded."""
        if level is None:
            return self._frame("events", "run_id = ?", (run_id,))
        _choice("level", level, LEVELS)
        return self._frame("events", "run_id = ? AND level = ?", (run_id, level))

    def artefacts(self, run_id: str) -> pd.DataFrame:
        """The artefacts of ``run_id`` in recording order; ``meta`` decoded."""
        return self._frame("artefacts", "run_id = ?", (run_id,))
