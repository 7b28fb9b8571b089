"""What ``rectalfl run`` shows while it waits: the run's stages, rounds and events, read from the run
directory as the ServerApp writes it (``run.db`` through :class:`server.store.RunStore`, read-only,
and the per-stage message counts in ``progress.json``, see :class:`server.orchestrator._ProgressGrid`).

Nothing here talks to Flower or changes the run; a run directory that does not exist yet (the
ServerApp is starting) or a database mid-write simply shows nothing new until the next poll.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGE_TITLES = {
    "discover": "discovery (who is there, how many patients)",
    "train": "federated training",
    "signatures": "signatures (each site scores its patients, keeps the scores)",
    "evaluate": "evaluation (signature AUCs from federated statistics)",
    "analysis": "fusion analysis (FDL / CR / CRD models, tables)",
    "report": "report",
}
WATCHED_EVENTS = {"site_joined", "site_failed", "site_dropped", "site_rejoined", "update_rejected", "sites_missing",
                  "identity_mismatch", "resumed", "run_failed", "policy_refused"}


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:3d}:{seconds % 60:02d}"


@dataclass
class RunProgress:
    """Poll a run directory; each :meth:`poll` returns the new lines to print and a status line.

    Parameters
    ----------
    run_dir : Path
        The run directory ``rectalfl run`` passed to the ServerApp.
    t0 : float, optional
        Wall-clock start (``time.time()``) the elapsed times count from; default: now.
    """

    run_dir: Path
    t0: float = field(default_factory=time.time)
    _stages: dict[int, str] = field(default_factory=dict)
    _rounds: set[tuple[str, int]] = field(default_factory=set)
    _events: set[int] = field(default_factory=set)
    _total_rounds: int | None = None

    def _lines_from_store(self) -> tuple[list[str], str | None, float | None]:
        from server.store import RunStore

        db = Path(self.run_dir) / "run.db"
        if not db.is_file():
            return [], None, None
        lines: list[str] = []
        with RunStore.open_run_dir(self.run_dir, readonly=True) as store:
            runs = store.runs()
            if not len(runs):
                return [], None, None
            rid = str(runs["run_id"].iloc[-1])
            if self._total_rounds is None:
                try:
                    import yaml

                    cfg = yaml.safe_load(str(runs["config_yaml"].iloc[-1])) or {}
                    self._total_rounds = int((cfg.get("federation") or {}).get("rounds") or 0) or None
                except (ValueError, TypeError, AttributeError):
                    self._total_rounds = None
            for ev in store.events(rid).itertuples():
                if int(ev.id) in self._events or ev.kind not in WATCHED_EVENTS:
                    continue
                self._events.add(int(ev.id))
                colour = {"error": "red", "warning": "yellow"}.get(str(ev.level), "")
                msg = f"[{colour}]{ev.kind}[/]: {ev.message}" if colour else f"{ev.kind}: {ev.message}"
                lines.append(msg)
            for r in store.rounds(rid).itertuples():
                key = (str(r.stage), int(r.round))
                if key in self._rounds or r.status == "running":
                    continue
                self._rounds.add(key)
                of = f"/{self._total_rounds}" if self._total_rounds and r.stage == "train" else ""
                loss = "" if _missing(r.train_loss) else f", mean loss {float(r.train_loss):.4f}"
                secs = "" if _missing(r.seconds) else f", {float(r.seconds):.0f} s"
                failed = 0 if _missing(r.n_failed) else int(r.n_failed)
                replied = 0 if _missing(r.n_replied) else int(r.n_replied)
                lines.append(f"{r.stage} round {r.round}{of} {r.status}: {replied} site(s) replied"
                             f"{f', {failed} failed' if failed else ''}{loss}{secs}")
            running, since = None, None
            for st in store.stages(rid).itertuples():
                sid, title = int(st.id), STAGE_TITLES.get(str(st.name), str(st.name))
                if st.status == "running":
                    if self._stages.get(sid) != "running":
                        lines.append(f"{title}: started")
                        self._stages[sid] = "running"
                    running = str(st.name)
                    since = _parse_time(st.started_at)
                elif self._stages.get(sid) != str(st.status):
                    took = _duration(st.started_at, st.finished_at)
                    extra = self._exchanges(str(st.name))
                    lines.append(f"{title}: {st.status}{f' ({took})' if took else ''}{extra}")
                    self._stages[sid] = str(st.status)
        return lines, running, since

    def _exchanges(self, stage: str) -> str:
        counts = self.progress().get(stage)
        if not counts or stage in ("train", "discover"):
            return ""
        return f", {counts['exchanges']} message round(s)"

    def progress(self) -> dict[str, dict[str, int]]:
        """Per-stage message counts from ``progress.json`` (empty when absent or being replaced)."""
        try:
            return dict(json.loads((Path(self.run_dir) / "progress.json").read_text()).get("stages", {}))
        except (OSError, ValueError):
            return {}

    def poll(self) -> tuple[list[str], str]:
        """``(new lines, status line)``; lines carry the elapsed time since ``t0``."""
        try:
            lines, running, since = self._lines_from_store()
        except Exception:  # noqa: BLE001 - a database mid-write or not yet created: try again next poll
            lines, running, since = [], None, None
        now = time.time()
        stamped = [f"[dim][{_clock(now - self.t0)}][/] {line}" for line in lines]
        if running is None:
            return stamped, f"waiting for the ServerApp ({_clock(now - self.t0).strip()})"
        title = STAGE_TITLES.get(running, running)
        status = f"{title}: {_clock(now - since).strip() if since else '?'}"
        counts = self.progress().get(running)
        if running == "train":
            done = sum(1 for s, _ in self._rounds if s == "train")
            status += f", round {done + 1}{f'/{self._total_rounds}' if self._total_rounds else ''} running"
        elif counts:
            status += f", {counts['exchanges']} message round(s) done"
        return stamped, status


def _missing(value: Any) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))


def _parse_time(value: Any) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except (TypeError, ValueError):
        return None


def _duration(start: Any, end: Any) -> str:
    a, b = _parse_time(start), _parse_time(end)
    if a is None or b is None:
        return ""
    s = int(round(b - a))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"
