"""What the dashboard shows, read from the run records (plain functions, no web framework).

Every run directory under the runs folder holds ``run.db`` (:mod:`server.store`), opened here
read-only (``mode=ro``) for the duration of one request; nothing is ever written. The functions
return JSON-ready dicts that the HTML pages and the JSON API share.

Derived figures (documented in ``docs/dashboard.md``):

* **ETA**: mean wall time of the completed training rounds x rounds still to run, minus the time the
  running round has already taken. Training rounds only; later stages are not estimated.
* **Bytes to/from a site**: the run record keeps the model payload per round (``rounds.bytes_down``,
  ``rounds.bytes_up``), not per site. Every site of a round gets the same packed model and replies
  in the same layout, so a site's share is ``bytes_down / n_sent`` for every round it was sent and
  ``bytes_up / n_replied`` for every round its update was accepted.
* **Consortium training loss per backbone**: the mean of the sites' ``<backbone>/train-loss``
  weighted by their ``<backbone>/n`` (training cases) in that round.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import sqlite3
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from server.liveness import read_node_status
from server.store import DB_NAME, RunStore, StoreError

logger = logging.getLogger(__name__)

__all__ = [
    "RunRef",
    "UnknownRun",
    "compare_runs",
    "discover_runs",
    "find_run",
    "headline_aucs",
    "live_snapshot",
    "run_detail",
    "run_summary",
    "safe_file",
]

PIPELINE_STAGES = ("discover", "train", "signatures", "evaluate", "analysis", "report")
"""The stages of a run in order (``analysis`` and ``report`` only when ``fusion.enabled``)."""

FAILURE_KINDS = ("site_failed", "site_dropped")
HEADLINE_MODELS = ("FDL", "CR", "CRD")
HEADLINE_COHORTS = ("internal_test", "external", "training")
POOLED_SIGNATURE_SITE = "pooled (training sites)"
_PLAIN_NAME = re.compile(r"^[^/\\\x00]+$")
_JOINED_AS = re.compile(r"joined as (\w+)")
_EVENTS_SHOWN = 500


class UnknownRun(LookupError):
    """No run with that id under the runs folder."""


@dataclass(frozen=True)
class RunRef:
    """Where one run lives: its id (as in its record) and its directory (resolved, inside the runs folder)."""

    run_id: str
    run_dir: Path

    @property
    def db(self) -> Path:
        return self.run_dir / DB_NAME


# --------------------------------------------------------------------------- small helpers
def _now() -> datetime:
    return datetime.now(UTC)


def _parse_ts(ts: str | None) -> datetime | None:
    if not ts:
        return None
    try:
        out = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return out if out.tzinfo else out.replace(tzinfo=UTC)


def _seconds(start: str | None, end: str | None, *, now: datetime | None = None) -> float | None:
    a = _parse_ts(start)
    b = _parse_ts(end) if end else now
    if a is None or b is None:
        return None
    return max(0.0, (b - a).total_seconds())


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _open(ref: RunRef) -> RunStore:
    """The run record, read-only (``mode=ro``: the dashboard can never write it)."""
    return RunStore(ref.db, readonly=True)


def _rows(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return conn.execute(sql, params).fetchall()


@lru_cache(maxsize=64)
def _config(config_yaml: str | None) -> dict[str, Any]:
    """The resolved config as a dict (cached: treat as read-only)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        cfg = yaml.load(config_yaml or "", Loader=loader) or {}  # noqa: S506 - a safe loader
    except yaml.YAMLError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _get(cfg: dict[str, Any], dotted: str, default: Any = None) -> Any:
    cur: Any = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: cfg}


# --------------------------------------------------------------------------- files
def safe_file(run_dir: Path, rel: str, runs_root: Path) -> Path:
    """The file or folder ``rel`` inside ``run_dir``, refusing anything that leaves it.

    Parameters
    ----------
    run_dir : Path
        The run directory (must lie inside ``runs_root``).
    rel : str
        The requested path, relative to ``run_dir`` (already percent-decoded).
    runs_root : Path
        The dashboard's runs folder.

    Returns
    -------
    Path
        The resolved path (symlinks followed), an existing file or folder inside ``run_dir``.

    Raises
    ------
    PermissionError
        An absolute path, a ``..`` or hidden (``.``-prefixed) component, a backslash or NUL, or a
        path that resolves (through a symlink) outside the run directory or the runs folder.
    FileNotFoundError
        Nothing there.
    """
    root = runs_root.resolve()
    base = run_dir.resolve()
    if not base.is_relative_to(root):
        raise PermissionError(f"run directory {run_dir} is outside the runs folder")
    if "\x00" in rel or "\\" in rel or rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        raise PermissionError(f"refused path {rel!r}")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." or p.startswith(".") for p in parts):
        raise PermissionError(f"refused path {rel!r}")
    target = base.joinpath(*parts).resolve()
    if not target.is_relative_to(base) or not target.is_relative_to(root):
        raise PermissionError(f"refused path {rel!r}: it leads outside the run directory")
    if not target.exists():
        raise FileNotFoundError(rel)
    return target


def _csv(ref: RunRef, runs_root: Path, rel: str) -> list[dict[str, str]]:
    try:
        path = safe_file(ref.run_dir, rel, runs_root)
    except (PermissionError, FileNotFoundError):
        return []
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        logger.warning("cannot read %s: %s", path, exc)
        return []


def headline_aucs(ref: RunRef, runs_root: Path) -> list[dict[str, Any]]:
    """The run's headline AUCs: FDL/CR/CRD from Table 3, else the best pooled signature AUCs.

    Returns
    -------
    list of dict
        ``{"label", "auc", "lo", "hi", "cohort", "source"}``, at most three.
    """
    table3 = _csv(ref, runs_root, "tables/table3_performance.csv")
    for cohort in HEADLINE_COHORTS:
        rows = [r for r in table3 if r.get("cohort") == cohort and _finite(r.get("auc")) is not None]
        if rows:
            picked = [r for m in HEADLINE_MODELS for r in rows if r.get("model") == m] or rows[:3]
            return [{"label": r.get("model", ""), "auc": _finite(r.get("auc")), "lo": _finite(r.get("auc_lo")),
                     "hi": _finite(r.get("auc_hi")), "cohort": cohort, "source": "tables/table3_performance.csv"}
                    for r in picked[:3]]
    sig = _csv(ref, runs_root, "tables/signature_auc.csv")
    pooled = [r for r in sig if r.get("site") == POOLED_SIGNATURE_SITE and _finite(r.get("auc")) is not None]
    if not pooled:
        pooled = [r for r in sig if r.get("split") == "test" and _finite(r.get("auc")) is not None]
    pooled.sort(key=lambda r: -(_finite(r.get("auc")) or 0.0))
    return [{"label": r.get("backbone", ""), "auc": _finite(r.get("auc")), "lo": _finite(r.get("lo")),
             "hi": _finite(r.get("hi")), "cohort": r.get("site", ""), "source": "tables/signature_auc.csv"}
            for r in pooled[:3]]


# --------------------------------------------------------------------------- discovery
def _run_ids(db: Path) -> list[str]:
    with RunStore(db, readonly=True) as store:
        return [str(r[0]) for r in _rows(store.conn, "SELECT run_id FROM runs ORDER BY created_at, run_id")]


def _candidate_dirs(runs_root: Path) -> list[Path]:
    root = runs_root.resolve()
    dirs = [root] if (root / DB_NAME).is_file() else []
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise FileNotFoundError(f"cannot list the runs folder {runs_root}: {exc}") from exc
    for child in children:
        resolved = child.resolve()
        if not resolved.is_relative_to(root):
            logger.warning("skipping %s: it links outside the runs folder %s", child, root)
            continue
        if (resolved / DB_NAME).is_file():
            dirs.append(resolved)
    return dirs


def discover_runs(runs_root: Path) -> tuple[list[RunRef], list[dict[str, str]]]:
    """Every run under ``runs_root`` (each sub-folder with a ``run.db``, and the folder itself).

    Returns
    -------
    refs : list of RunRef
        One per run id; a run id found twice is kept once (the first folder) and reported.
    problems : list of dict
        ``{"path", "error"}`` for every record that could not be read (shown in the runs list).
    """
    refs: list[RunRef] = []
    problems: list[dict[str, str]] = []
    seen: dict[str, Path] = {}
    for d in _candidate_dirs(runs_root):
        try:
            ids = _run_ids(d / DB_NAME)
        except (StoreError, sqlite3.Error) as exc:
            problems.append({"path": str(d), "error": str(exc)})
            continue
        for rid in ids:
            if rid in seen:
                problems.append({"path": str(d), "error": f"run {rid} is also in {seen[rid]}; shown once"})
                continue
            seen[rid] = d
            refs.append(RunRef(rid, d))
    return refs, problems


def find_run(runs_root: Path, run_id: str) -> RunRef:
    """The run ``run_id`` under ``runs_root``.

    Looks first in ``runs_root/run_id`` (the usual layout, one record per folder), then scans.

    Raises
    ------
    UnknownRun
        No such run (the id is never used as a path before it is known to be a plain folder name).
    """
    root = runs_root.resolve()
    if _PLAIN_NAME.match(run_id) and run_id not in (".", "..") and not run_id.startswith("."):
        guess = (root / run_id).resolve()
        if guess.is_relative_to(root) and guess != root and (guess / DB_NAME).is_file():
            try:
                if run_id in _run_ids(guess / DB_NAME):
                    return RunRef(run_id, guess)
            except (StoreError, sqlite3.Error):
                pass
    refs, _ = discover_runs(root)
    for ref in refs:
        if ref.run_id == run_id:
            return ref
    raise UnknownRun(run_id)


# --------------------------------------------------------------------------- runs list
def _run_row(store: RunStore, run_id: str) -> dict[str, Any]:
    row = _rows(store.conn, "SELECT run_id, name, created_at, finished_at, status, config_yaml, mode, strategy, seed,"
                " engine, error FROM runs WHERE run_id = ?", (run_id,))
    if not row:
        raise UnknownRun(run_id)
    r = row[0]
    return {"run_id": r[0], "name": r[1], "created_at": r[2], "finished_at": r[3], "status": r[4],
            "config_yaml": r[5], "mode": r[6], "strategy": r[7], "seed": r[8], "engine": r[9], "error": r[10]}


def _sites(conn: sqlite3.Connection, run_id: str) -> list[str]:
    names = {str(r[0]) for r in _rows(conn, "SELECT DISTINCT site FROM events WHERE run_id = ? AND "
                                            "kind = 'site_joined' AND site IS NOT NULL", (run_id,))}
    names |= {s.site for s in read_node_status(conn, run_id)}
    return sorted(names)


def _train_progress(conn: sqlite3.Connection, run_id: str, rounds_total: int | None, status: str,
                    now: datetime) -> dict[str, Any]:
    done, mean_s = _rows(conn, "SELECT COUNT(*), AVG(seconds) FROM rounds WHERE run_id = ? AND stage = 'train' AND "
                               "status = 'completed'", (run_id,))[0]
    last = _rows(conn, "SELECT MAX(round) FROM rounds WHERE run_id = ? AND stage = 'train' AND status = 'completed'",
                 (run_id,))[0][0]
    running = _rows(conn, "SELECT round, started_at FROM rounds WHERE run_id = ? AND stage = 'train' AND "
                          "status = 'running' ORDER BY round DESC LIMIT 1", (run_id,))
    eta = None
    if status == "running" and rounds_total and mean_s is not None:
        remaining = max(0, int(rounds_total) - int(last or 0))
        elapsed = _seconds(running[0][1], None, now=now) if running else 0.0
        eta = max(0.0, remaining * float(mean_s) - (elapsed or 0.0)) if remaining else 0.0
    return {
        "rounds_done": int(last or 0),
        "rounds_completed": int(done or 0),
        "rounds_total": int(rounds_total) if rounds_total else None,
        "running_round": int(running[0][0]) if running else None,
        "mean_round_s": _finite(mean_s),
        "eta_s": eta,
    }


def run_summary(ref: RunRef, runs_root: Path) -> dict[str, Any]:
    """One row of the runs list: name, engine, status, times, sites, stages done, headline AUCs."""
    with _open(ref) as store:
        conn = store.conn
        run = _run_row(store, ref.run_id)
        cfg = _config(run.pop("config_yaml"))
        stages = _rows(conn, "SELECT name, status FROM stages WHERE run_id = ? ORDER BY id", (ref.run_id,))
        done: list[str] = []
        for name, status in stages:
            if status == "completed" and name not in done:
                done.append(name)
        current = next((n for n, s in reversed(stages) if s == "running"), None)
        progress = _train_progress(conn, ref.run_id, _get(cfg, "federation.rounds"), run["status"], _now())
        sites = _sites(conn, ref.run_id)
    report = ref.run_dir / "report.html"
    return {
        **run,
        "sites": sites,
        "n_sites": len(sites),
        "stages_done": done,
        "current_stage": current,
        "progress": progress,
        "dp": bool(_get(cfg, "privacy.dp", False)),
        "headline": headline_aucs(ref, runs_root),
        "report": "report.html" if report.is_file() else None,
    }


# --------------------------------------------------------------------------- one run
def _stage_timeline(conn: sqlite3.Connection, run_id: str, cfg: dict[str, Any], now: datetime) -> list[dict[str, Any]]:
    rows = _rows(conn, "SELECT name, started_at, finished_at, status, detail FROM stages WHERE run_id = ? ORDER BY id",
                 (run_id,))
    out = []
    for name, start, end, status, detail in rows:
        try:
            det = json.loads(detail) if detail else {}
        except ValueError:
            det = {}
        out.append({"name": name, "status": status, "started_at": start, "finished_at": end,
                    "seconds": _seconds(start, end, now=now) if status == "running" or end else None,
                    "error": det.get("error") if isinstance(det, dict) else None,
                    "reason": det.get("reason") if isinstance(det, dict) else None})
    expected = list(PIPELINE_STAGES)
    if not _get(cfg, "fusion.enabled", True):
        expected = [s for s in expected if s not in ("analysis", "report")]
    started = {s["name"] for s in out}
    out += [{"name": s, "status": "pending", "started_at": None, "finished_at": None, "seconds": None,
             "error": None, "reason": None} for s in expected if s not in started]
    return out


def _is_epsilon(key: str) -> bool:
    k = key.lower()
    return k == "epsilon" or k.endswith("/epsilon") or k.endswith("-epsilon") or k.startswith("epsilon")


def _is_dsc(key: str) -> bool:
    k = key.lower()
    return "dsc" in k or "dice" in k


class _MetricIndex:
    """What the dashboard needs from a run's ``site_metrics``, aggregated incrementally.

    The store only ever appends metric rows, so each request reads just the rows added since the
    previous one (``id > last_id``, a rowid range) instead of the tens of thousands a long run holds.
    A metric logged again for the same round (a resumed run re-running a round) replaces the old value.
    """

    def __init__(self) -> None:
        self.last_id = 0
        self.rounds: dict[str, set[int]] = defaultdict(set)
        self.patients: dict[str, int] = {}
        self.epsilon: dict[str, float] = {}
        self.loss: dict[tuple[int, str, str], float] = {}
        self.n: dict[tuple[int, str, str], float] = {}
        self.site_mean: dict[str, dict[int, float]] = defaultdict(dict)
        self.dsc: list[dict[str, Any]] = []
        self.aucs: list[dict[str, Any]] = []
        self._series: dict[str, Any] | None = None

    def update(self, conn: sqlite3.Connection, run_id: str) -> None:
        rows = _rows(conn, "SELECT id, stage, round, site, split, key, value, n, created_at FROM site_metrics "
                           "NOT INDEXED WHERE id > ? AND run_id = ? ORDER BY id", (self.last_id, run_id))
        for _id, stage, rnd, site, split, key, value, n, created in rows:
            site, key = str(site), str(key)
            train = stage == "train" and rnd is not None
            if train:
                self.rounds[site].add(int(rnd))
            if value is None:
                continue
            if train:
                if key == "train-loss":
                    self.site_mean[site][int(rnd)] = float(value)
                elif key.endswith("/train-loss"):
                    self.loss[(int(rnd), site, key[: -len("/train-loss")])] = float(value)
                elif key.endswith("/n"):
                    self.n[(int(rnd), site, key[:-2])] = float(value)
                elif key == "num-examples":
                    self.patients[site] = int(value)
            if _is_epsilon(key) and not site.startswith("cohort:"):
                self.epsilon[site] = max(float(value), self.epsilon.get(site, float("-inf")))
            dsc, auc = _is_dsc(key), stage != "train" and key.lower().endswith("auc")
            if dsc or auc:
                (self.dsc if dsc else self.aucs).append(
                    {"stage": stage, "round": rnd, "site": site, "split": split, "key": key, "value": _finite(value),
                     "n": n, "created_at": created})
        if rows:
            self.last_id = int(rows[-1][0])
            self._series = None

    def loss_series(self) -> dict[str, Any]:
        """Consortium (n-weighted) and per-site training loss per backbone, by round (6 decimals)."""
        if self._series is None:
            self._series = self._build_series()
        return self._series

    def _build_series(self) -> dict[str, Any]:
        by_site: dict[str, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
        sums: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for (rnd, site, bb), v in sorted(self.loss.items()):
            by_site[site][bb].append([rnd, round(v, 6)])
            w = self.n.get((rnd, site, bb), 1.0) or 0.0
            acc = sums[(bb, rnd)]
            acc[0] += w * v
            acc[1] += w
        consortium: dict[str, list[list[float]]] = defaultdict(list)
        for (bb, rnd), (s, w) in sorted(sums.items()):
            if w > 0:
                consortium[bb].append([rnd, round(s / w, 6)])
        for site, series in self.site_mean.items():
            by_site[site]["all backbones (mean)"] = [[r, round(v, 6)] for r, v in sorted(series.items())]
        return {"consortium": dict(consortium), "sites": {s: dict(v) for s, v in sorted(by_site.items())}}


_INDEX_LOCK = threading.Lock()
_INDEXES: OrderedDict[tuple[str, str], tuple[tuple[Any, ...], _MetricIndex]] = OrderedDict()
_INDEXES_KEPT = 32


@contextmanager
def _metric_index(ref: RunRef, conn: sqlite3.Connection, created_at: str) -> Iterator[_MetricIndex]:
    """The run's metric index, brought up to date, held under a lock while the caller reads it."""
    st = ref.db.stat()
    identity = (st.st_dev, st.st_ino, created_at)
    key = (str(ref.db), ref.run_id)
    with _INDEX_LOCK:
        cached = _INDEXES.get(key)
        index = cached[1] if cached is not None and cached[0] == identity else _MetricIndex()
        top = _rows(conn, "SELECT MAX(id) FROM site_metrics")[0][0] or 0
        if top < index.last_id:  # a different record under the same name: start again
            index = _MetricIndex()
        index.update(conn, ref.run_id)
        _INDEXES[key] = (identity, index)
        _INDEXES.move_to_end(key)
        while len(_INDEXES) > _INDEXES_KEPT:
            _INDEXES.popitem(last=False)
        yield index


def _site_panel(conn: sqlite3.Connection, run_id: str, facts: _MetricIndex, events: list[dict[str, Any]],
                rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sites: dict[str, dict[str, Any]] = {}

    def site(name: str) -> dict[str, Any]:
        if name not in sites:
            sites[name] = {"site": name, "role": None, "status": None, "online": None, "last_seen": None,
                           "node_id": None, "liveness_updated_at": None, "rounds_joined": 0,
                           "training_patients": None, "failures": 0, "rejected_updates": 0,
                           "bytes_to_site": 0, "bytes_from_site": 0, "epsilon": None, "joined_at": None}
        return sites[name]

    participated: dict[str, set[int]] = facts.rounds
    for name in participated:
        site(name)
    for name, n in facts.patients.items():
        site(name)["training_patients"] = n
    for name, eps in facts.epsilon.items():
        site(name)["epsilon"] = eps
    sent_extra: dict[str, set[int]] = defaultdict(set)
    for e in events:
        s = e["site"]
        if not s:
            continue
        if e["kind"] == "site_joined":
            rec = site(s)
            m = _JOINED_AS.search(e["message"] or "")
            if m and rec["role"] is None:
                rec["role"] = m.group(1)
            rec["joined_at"] = rec["joined_at"] or e["ts"]
            det = e.get("detail") or {}
            if rec["training_patients"] is None and isinstance(det, dict) and "patients-train" in det:
                rec["training_patients"] = det["patients-train"]
        elif e["kind"] in FAILURE_KINDS:
            site(s)["failures"] += 1
            if e["round"] is not None and (e.get("detail") or {}).get("stage", "train") == "train":
                sent_extra[s].add(int(e["round"]))
        elif e["kind"] == "update_rejected":
            site(s)["rejected_updates"] += 1
            if e["round"] is not None:
                sent_extra[s].add(int(e["round"]))
    for st in read_node_status(conn, run_id):
        rec = site(st.site)
        rec.update(status=st.status, online=st.online, last_seen=st.last_seen, node_id=st.node_id,
                   liveness_updated_at=st.updated_at)
        if st.role:
            rec["role"] = st.role
    by_round = {int(r["round"]): r for r in rounds if r["stage"] == "train"}
    for name, rec in sites.items():
        ok = participated.get(name, set())
        rec["rounds_joined"] = len(ok)
        down = up = 0.0
        for rnd in ok | sent_extra.get(name, set()):
            r = by_round.get(rnd)
            if r and r["bytes_down"] and r["n_sent"]:
                down += r["bytes_down"] / r["n_sent"]
        for rnd in ok:
            r = by_round.get(rnd)
            if r and r["bytes_up"] and r["n_replied"]:
                up += r["bytes_up"] / r["n_replied"]
        rec["bytes_to_site"] = int(round(down))
        rec["bytes_from_site"] = int(round(up))
    return [sites[k] for k in sorted(sites) if not k.startswith("cohort:")]


def run_detail(ref: RunRef, runs_root: Path, *, series: bool = True) -> dict[str, Any]:
    """Everything the run page shows.

    Parameters
    ----------
    ref : RunRef
    runs_root : Path
    series : bool, default True
        Include the loss curves (the charts' data; the HTML page fetches them from the API).

    Returns
    -------
    dict
        ``run``, ``config`` (the resolved config as YAML), ``stages`` (timeline, pending stages
        included), ``progress`` (rounds done/total, ETA), ``rounds``, ``sites`` (per-site panel),
        ``loss`` (if ``series``), ``dsc``, ``aucs``, ``events`` (newest first, at most 500),
        ``n_events``, ``artefacts``, ``report``.
    """
    now = _now()
    with _open(ref) as store:
        conn = store.conn
        run = _run_row(store, ref.run_id)
        config_yaml = run.pop("config_yaml")
        cfg = _config(config_yaml)
        progress = _train_progress(conn, ref.run_id, _get(cfg, "federation.rounds"), run["status"], now)
        stages = _stage_timeline(conn, ref.run_id, cfg, now)
        rounds = [
            {"stage": r[0], "round": r[1], "status": r[2], "started_at": r[3], "finished_at": r[4], "n_sent": r[5],
             "n_replied": r[6], "n_failed": r[7], "train_loss": _finite(r[8]), "bytes_down": r[9],
             "bytes_up": r[10], "seconds": _finite(r[11])}
            for r in _rows(conn, "SELECT stage, round, status, started_at, finished_at, n_sent, n_replied, n_failed,"
                                 " train_loss, bytes_down, bytes_up, seconds FROM rounds WHERE run_id = ?"
                                 " ORDER BY stage, round", (ref.run_id,))
        ]
        events = [
            {"ts": r[0], "level": r[1], "kind": r[2], "site": r[3], "round": r[4], "message": r[5],
             "detail": json.loads(r[6]) if r[6] else {}}
            for r in _rows(conn, "SELECT ts, level, kind, site, round, message, detail FROM events WHERE run_id = ?"
                                 " ORDER BY id", (ref.run_id,))
        ]
        with _metric_index(ref, conn, run["created_at"]) as facts:
            sites = _site_panel(conn, ref.run_id, facts, events, rounds)
            dsc, aucs = list(facts.dsc), list(facts.aucs)
            loss = facts.loss_series() if series else None
        artefacts = [
            {"kind": r[0], "path": r[1], "bytes": r[2], "created_at": r[3], "sha256": r[4]}
            for r in _rows(conn, "SELECT kind, path, bytes, created_at, sha256 FROM artefacts WHERE run_id = ?"
                                 " ORDER BY id", (ref.run_id,))
        ]
    present = [a for a in artefacts if (ref.run_dir / a["path"]).exists()]
    out: dict[str, Any] = {
        "run": {**run, "dp": bool(_get(cfg, "privacy.dp", False)), "backbone": _get(cfg, "train.backbone")},
        "config": config_yaml,
        "stages": stages,
        "progress": progress,
        "rounds": rounds,
        "sites": sites,
        "dsc": dsc,
        "aucs": aucs,
        "events": events[::-1][:_EVENTS_SHOWN],
        "n_events": len(events),
        "artefacts": [a for a in present if a["kind"] != "checkpoint"],
        "checkpoints": [a for a in present if a["kind"] == "checkpoint"],
        "report": "report.html" if (ref.run_dir / "report.html").is_file() else None,
        "headline": headline_aucs(ref, runs_root),
        "generated_at": now.isoformat(timespec="milliseconds"),
    }
    if series:
        out["loss"] = loss
    return out


def live_snapshot(ref: RunRef) -> dict[str, Any]:
    """A small, cheap summary of a run for the live stream (server-sent events).

    ``fingerprint`` changes whenever anything in the record changed (a round, a metric, an event,
    a stage, liveness, the run's status).
    """
    now = _now()
    with _open(ref) as store:
        conn = store.conn
        row = _rows(conn, "SELECT status, finished_at, config_yaml FROM runs WHERE run_id = ?", (ref.run_id,))
        if not row:
            raise UnknownRun(ref.run_id)
        status, finished_at, config_yaml = row[0]
        cfg = _config(config_yaml)
        progress = _train_progress(conn, ref.run_id, _get(cfg, "federation.rounds"), status, now)
        marks = _rows(conn, "SELECT (SELECT MAX(id) FROM stages WHERE run_id = ?), "
                            "(SELECT MAX(id) FROM site_metrics WHERE run_id = ?), "
                            "(SELECT COUNT(*) FROM events WHERE run_id = ?), "
                            "(SELECT MAX(id) FROM events WHERE run_id = ?), "
                            "(SELECT group_concat(status) FROM stages WHERE run_id = ?), "
                            "(SELECT group_concat(round || status) FROM rounds WHERE run_id = ?)",
                      (ref.run_id,) * 6)[0]
        stage = _rows(conn, "SELECT name FROM stages WHERE run_id = ? AND status = 'running' ORDER BY id DESC LIMIT 1",
                      (ref.run_id,))
        liveness = [s.as_dict() for s in read_node_status(conn, ref.run_id)]
    fingerprint = "|".join(str(x) for x in (status, finished_at, *marks,
                                            ",".join(f"{s['site']}:{s['status']}:{s['updated_at']}"
                                                     for s in liveness)))
    return {
        "run_id": ref.run_id,
        "status": status,
        "finished_at": finished_at,
        "stage": stage[0][0] if stage else None,
        **progress,
        "n_events": int(marks[2] or 0),
        "online": sum(1 for s in liveness if s["online"]),
        "fingerprint": fingerprint,
    }


# --------------------------------------------------------------------------- compare
def compare_runs(refs: list[RunRef], runs_root: Path) -> dict[str, Any]:
    """Runs side by side: facts, config differences, mean training loss by round, Table 3 and signature AUCs.

    Returns
    -------
    dict
        ``runs`` (one dict per run: ``run``, ``loss`` ``[[round, loss], ...]`` from ``rounds.train_loss``,
        ``backbone_loss`` (consortium loss per backbone)), ``config_diff`` (``{key: [value per run]}``
        for the config keys that differ), ``table3`` (rows ``{"model", "cohort", "aucs": [auc or None per
        run]}``), ``signatures`` (rows ``{"backbone", "site", "aucs": [...]}``).
    """
    runs: list[dict[str, Any]] = []
    flat: list[dict[str, Any]] = []
    t3: dict[tuple[str, str], list[Any]] = {}
    sig: dict[tuple[str, str], list[Any]] = {}
    for i, ref in enumerate(refs):
        with _open(ref) as store:
            run = _run_row(store, ref.run_id)
            cfg = _config(run.pop("config_yaml"))
            loss = [[int(r[0]), _finite(r[1])] for r in _rows(
                store.conn, "SELECT round, train_loss FROM rounds WHERE run_id = ? AND stage = 'train' AND "
                            "status = 'completed' ORDER BY round", (ref.run_id,)) if _finite(r[1]) is not None]
            with _metric_index(ref, store.conn, run["created_at"]) as facts:
                backbone_loss = facts.loss_series()["consortium"]
        runs.append({"run": {**run, "dp": bool(_get(cfg, "privacy.dp", False)),
                             "rounds_total": _get(cfg, "federation.rounds")},
                     "loss": loss, "backbone_loss": backbone_loss})
        flat.append(_flatten(cfg))
        for r in _csv(ref, runs_root, "tables/table3_performance.csv"):
            t3.setdefault((r.get("model", ""), r.get("cohort", "")), [None] * len(refs))[i] = _finite(r.get("auc"))
        for r in _csv(ref, runs_root, "tables/signature_auc.csv"):
            if r.get("split") in ("test", "external") and r.get("site", "").startswith("pooled"):
                sig.setdefault((r.get("backbone", ""), r.get("site", "")), [None] * len(refs))[i] = \
                    _finite(r.get("auc"))
    keys = sorted(set().union(*flat)) if flat else []
    skip = {"name", "data_root", "cache_root", "runs_root"}
    diff = {k: [f.get(k) for f in flat] for k in keys
            if k not in skip and len({repr(f.get(k)) for f in flat}) > 1}
    return {
        "runs": runs,
        "config_diff": diff,
        "table3": [{"model": m, "cohort": c, "aucs": v} for (m, c), v in sorted(t3.items(), key=lambda kv: (
            HEADLINE_COHORTS.index(kv[0][1]) if kv[0][1] in HEADLINE_COHORTS else 9, kv[0][0]))],
        "signatures": [{"backbone": b, "site": s, "aucs": v} for (b, s), v in sorted(sig.items())],
    }
