"""The hospital's statistics service: what it answers, under its own policy, to a server it does not trust.

Every federated number the report shows is computed by a site-computed protocol
(:mod:`shared.stats.sitecomputed`): sites send additive contributions that are securely aggregated
(:mod:`shared.secagg`: the server sees neither this site's numbers nor the consortium totals), all
sites run the same update on the totals, and only the final *release*, disclosure-checked on pooled
counts, goes to the server. This module is the site's side of that, and the place where the
hospital's policy (:class:`shared.config.PolicyConfig`, read from the site's own config, never from
a message) is enforced. A request outside the policy is refused with the rule it breaks.

What the site decides, not the server
-------------------------------------
- **The vocabulary.** A query names a registered protocol, its parameters (validated by the
  protocol: bounded ranges, no tables or iterates), a cohort (``training``, ``internal_test``,
  ``external``: the site maps it to its own splits, and its role fixes which it has), columns from
  the allow-list (signatures, declared clinical predictors, fusion scores; never identifiers) and the
  participating sites (each in the site's roster; the site among them).
- **The patients.** One complete-case set per cohort and column family, fixed by the site: ``S_sig``
  (label and every signature) and ``S_full`` (also every declared clinical predictor); a query with a
  clinical column uses ``S_full``, otherwise ``S_sig``. If the patients in ``S_sig`` but not in
  ``S_full`` are ``0 < n < k`` in a class, ``S_sig`` is replaced by ``S_full``, so no two answers
  differ by fewer than ``k`` patients of a class.
- **Its own floor.** A query's floor ``k`` must be at least the site's ``min_cell_count``. A site
  whose own class counts in the query's patient set are ``0 < n < k`` contributes zeros (it is
  excluded from that quantity), so differencing answers over different sets of sites never isolates
  fewer than ``k`` of its patients.
- **Once.** A released quantity (protocol, parameters, cohort, columns, ``k``, data stamp) is
  released with one set of several participating sites only (a ledger kept across runs), so the
  server cannot difference the same quantity over two site sets; numbers about this site alone
  (once more, for itself) need its ``release_site_figures``. Queries per run are capped
  (``query_budget``).
- **Fresh data.** Signatures and fusion scores carry the run id and a hash of the weights/models
  that made them; a query for another run is refused, naming the fix.

State kept between messages (the Deployment Engine starts a process per message) lives under
``<cache>/stats/``: per run and query the protocol state, the session map, the budget; across
runs the release ledger. Nothing there leaves the site.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shared.config import PolicyConfig
from shared.stats.sitecomputed import CohortData, SiteComputedProtocol, protocol_class, zeros_like

logger = logging.getLogger(__name__)

COHORT_SPLITS: dict[str, tuple[str, ...]] = {
    "training": ("train", "val"), "internal_test": ("test",), "external": ("external",)}
ROLE_COHORTS = {"train": ("training", "internal_test"), "external": ("external", "training")}
"""Cohorts a site answers by role. An external site takes part in ``training`` queries with no patients
(it contributes zeros): it receives the totals and derives the fitted models itself, so it scores
its patients only with models it derived (:meth:`StatsService.derived_models`)."""
SIGNATURE = re.compile(r"^(pre|post|delta)_[a-z0-9_]+$")
FUSION_SCORE = re.compile(r"^fusion_[A-Za-z0-9_+.-]+$")
NEVER = frozenset({"patient_id", "split", "label"})
ID = re.compile(r"^[A-Za-z0-9_.:+-]{1,160}$")
KEY_SEP = "~"
INCLUDED = "_included"


def protocol_columns(params: Mapping[str, Any]) -> list[str]:
    """Every column a protocol's parameters name (``column``, ``columns``, ``candidates``, ``variables``)."""
    out: list[str] = []
    for key in ("column",):
        if isinstance(params.get(key), str):
            out.append(params[key])
    for key in ("columns", "candidates"):
        if isinstance(params.get(key), list | tuple):
            out += [str(c) for c in params[key]]
    for v in params.get("variables") or []:
        if isinstance(v, Mapping) and "name" in v:
            out.append(str(v["name"]))
    return out


class PolicyRefusal(Exception):
    """A request this site's policy does not allow; ``rule`` names the policy setting."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"refused by site policy ({rule}): {message}")
        self.rule = rule


@dataclass
class SiteContext:
    """What the service needs to know about its site (all of it from the site's own side)."""

    site: str
    cache_dir: Path
    policy: PolicyConfig
    clinical_columns: tuple[str, ...]
    """The declared clinical predictors of the site's own config (the allow-list's clinical part)."""
    table: Callable[[], pd.DataFrame]
    """The site table: ``patient_id, split, label``, signatures, clinical predictors, ``fusion_*``."""
    stamps: Callable[[], dict[str, dict[str, str]]]
    """``{"signatures": {"run": ..., "weights": ...}, "scores": {"run": ..., "models": ...}}`` on file."""
    secagg: Callable[[], Any] | None = None
    """Factory of this site's :class:`shared.secagg.SiteSecAgg` (None: no roster, single-site queries only)."""


def _atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, sort_keys=True)
    os.replace(tmp, path)


def _read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def _ledger_key(key: str, parts: list[str]) -> str:
    """A quantity is released once over several sites, and (with the site's consent) once for itself alone."""
    return f"{key}:{'alone' if len(parts) == 1 else 'sites'}"


def _ext(path: Path, ext: str) -> Path:
    """``path`` + ``ext`` (query ids contain dots: ``with_suffix`` would cut them)."""
    return path.with_name(path.name + ext)


def save_state(path: Path, state: Mapping[str, Any]) -> None:
    """A protocol state (JSON values + NumPy arrays) as ``<path>.json`` + ``<path>.npz``."""
    arrays = {k: np.asarray(v) for k, v in state.items() if isinstance(v, np.ndarray)}
    plain = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.npz")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, _ext(path, ".npz"))
    _atomic_json(_ext(path, ".json"), {"plain": plain, "arrays": sorted(arrays)})


def load_state(path: Path) -> dict[str, Any]:
    meta = _read_json(_ext(path, ".json"))
    if meta is None:
        raise FileNotFoundError(path)
    state = dict(meta["plain"])
    if meta["arrays"]:
        with np.load(_ext(path, ".npz"), allow_pickle=False) as z:
            state.update({k: z[k] for k in meta["arrays"]})
    return state


class StatsService:
    """One site's statistics endpoint (see the module docstring).

    Parameters
    ----------
    ctx : SiteContext
    """

    def __init__(self, ctx: SiteContext) -> None:
        self.ctx = ctx
        self.root = Path(ctx.cache_dir) / "stats"
        self._table: pd.DataFrame | None = None
        self._secagg: Any = None
        self._data: dict[tuple, CohortData] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def site(self) -> str:
        return self.ctx.site

    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / run

    def _sa(self) -> Any:
        if self._secagg is None:
            if self.ctx.secagg is None:
                raise PolicyRefusal("roster", f"site {self.site} has no consortium roster and identity key "
                                              "(policy.roster, policy.identity_key): it answers only questions "
                                              "about its own patients")
            self._secagg = self.ctx.secagg()
        return self._secagg

    def table(self) -> pd.DataFrame:
        if self._table is None:
            self._table = self.ctx.table()
        return self._table

    def allowed_columns(self, table: pd.DataFrame) -> set[str]:
        pol = self.ctx.policy
        if pol.columns is not None:
            cols = set(pol.columns)
        else:
            cols = {c for c in table.columns if SIGNATURE.match(str(c)) or FUSION_SCORE.match(str(c))}
            cols |= set(self.ctx.clinical_columns)
        return cols - NEVER

    def _budget(self, run: str, n: int) -> None:
        path = self.run_dir(run) / "budget.json"
        used = int((_read_json(path, {}) or {}).get("answers", 0))
        if used + n > self.ctx.policy.query_budget:
            raise PolicyRefusal("query_budget", f"this run has used {used} of the site's {self.ctx.policy.query_budget} "
                                                f"statistics answers; {n} more were asked")
        _atomic_json(path, {"answers": used + n})

    # ------------------------------------------------------------------ the patient sets
    def cohort_sets(self, table: pd.DataFrame, cohort: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(S_sig, S_full)`` boolean masks over the table rows for a cohort (see module docstring)."""
        rows = table["split"].isin(COHORT_SPLITS[cohort]).to_numpy() & table["label"].notna().to_numpy()
        sig = [c for c in table.columns if SIGNATURE.match(str(c))]
        clin = [c for c in self.ctx.clinical_columns if c in table.columns]
        missing_clin = [c for c in self.ctx.clinical_columns if c not in table.columns]
        s_sig = rows & np.isfinite(table[sig].to_numpy(dtype=float)).all(axis=1) if sig else rows
        s_full = s_sig.copy()
        if clin:
            s_full &= np.isfinite(table[clin].to_numpy(dtype=float)).all(axis=1)
        if missing_clin:
            s_full &= False
        y = table["label"].to_numpy(dtype=float)
        diff = s_sig & ~s_full
        for cls in (0, 1):
            n = int((diff & (y == cls)).sum())
            if 0 < n < k:
                return s_full, s_full
        return s_sig, s_full

    def query_rows(self, table: pd.DataFrame, cohort: str, columns: list[str], k: int) -> np.ndarray:
        s_sig, s_full = self.cohort_sets(table, cohort, k)
        clin = set(self.ctx.clinical_columns)
        if any(c in clin for c in columns):
            rows = s_full
        else:
            finite_sig = np.isfinite(table.loc[s_sig, columns].to_numpy(dtype=float)).all() if columns else True
            rows = s_sig if finite_sig else s_full
        if columns and not np.isfinite(table.loc[rows, columns].to_numpy(dtype=float)).all():
            bad = [c for c in columns if not np.isfinite(table.loc[rows, c].to_numpy(dtype=float)).all()]
            raise ValueError(f"site {self.site}: column(s) {bad} have missing values in the {cohort} analysis set")
        return rows

    def cohort_data(self, table: pd.DataFrame, spec: Mapping[str, Any], k: int) -> CohortData:
        key = (id(table), spec["cohort"], tuple(spec["columns"]), k)
        if key not in self._data:
            self._data[key] = self._cohort_data(table, spec, k)
        return self._data[key]

    def _cohort_data(self, table: pd.DataFrame, spec: Mapping[str, Any], k: int) -> CohortData:
        rows = self.query_rows(table, spec["cohort"], list(spec["columns"]), k)
        sub = table.loc[rows]
        return CohortData(sub["label"].to_numpy(dtype=float).astype(int), sub[list(spec["columns"])].to_numpy(float)
                          if spec["columns"] else np.zeros((len(sub), 0)), tuple(spec["columns"]),
                          extra={"patient_id": sub["patient_id"].astype(str).to_numpy()})

    # ------------------------------------------------------------------ validation of one query
    def _stamp(self, run: str, columns: list[str]) -> dict[str, str]:
        stamps = self.ctx.stamps()
        sig = stamps.get("signatures") or {}
        if sig.get("run") != run:
            raise ValueError(f"site {self.site}: its signatures belong to run {sig.get('run')!r}, not {run!r}: the "
                             "signatures stage of this run has not finished here; run (or resume) it first")
        out = {"signatures": sig.get("weights", "")}
        if any(FUSION_SCORE.match(c) for c in columns):
            sc = stamps.get("scores") or {}
            if sc.get("run") != run:
                raise ValueError(f"site {self.site}: its fusion scores belong to run {sc.get('run')!r}, not "
                                 f"{run!r}: the fusion scoring of this run has not reached this site; resume the run")
            out["scores"] = sc.get("models", "")
        return out

    def validate(self, run: str, spec: Mapping[str, Any], k: int, role: str | None) -> tuple[SiteComputedProtocol, str]:
        """Check a query against the policy; returns the protocol object and the quantity's key."""
        pol = self.ctx.policy
        qid = str(spec.get("qid", ""))
        if not ID.match(qid):
            raise ValueError(f"query id {qid!r} is not valid")
        if "stats" not in pol.stages:
            raise PolicyRefusal("stages", "this site does not answer statistics")
        if k < pol.min_cell_count:
            raise PolicyRefusal("min_cell_count", f"the query asks for k={k}, below this site's floor "
                                                  f"{pol.min_cell_count}")
        cohort = str(spec.get("cohort"))
        if cohort not in COHORT_SPLITS:
            raise PolicyRefusal("cohorts", f"unknown cohort {cohort!r}; known: {sorted(COHORT_SPLITS)}")
        if role is not None and cohort not in ROLE_COHORTS[role]:
            raise PolicyRefusal("role", f"this site is a {role} site: it has no {cohort!r} cohort")
        parts = [str(p) for p in spec.get("participants", [])]
        if self.site not in parts or len(set(parts)) != len(parts) or not all(ID.match(p) for p in parts):
            raise ValueError(f"participants {parts} must list distinct sites including {self.site}")
        if len(parts) == 1 and not pol.release_site_figures:
            raise PolicyRefusal("release_site_figures", "numbers about this site alone are not released")
        if len(parts) > 1:
            roster = set(self._sa().roster)
            unknown = sorted(set(parts) - roster)
            if unknown:
                raise PolicyRefusal("roster", f"site(s) {unknown} are not in this site's consortium roster")
        table = self.table()
        columns = [str(c) for c in spec.get("columns", [])]
        allowed = self.allowed_columns(table)
        bad = [c for c in columns if c not in allowed]
        if bad:
            raise PolicyRefusal("columns", f"column(s) {bad} are not on this site's allow-list")
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise ValueError(f"site {self.site}: column(s) {missing} not in its table")
        try:
            proto = protocol_class(str(spec.get("protocol")))
        except KeyError as exc:
            raise PolicyRefusal("vocabulary", str(exc.args[0])) from None
        try:
            obj = proto.from_params(dict(spec.get("params") or {}))
        except (TypeError, ValueError) as exc:
            raise PolicyRefusal("parameters", f"{proto.name}: {exc}") from None
        if int(obj.params.get("n_columns", len(columns))) != len(columns):
            raise ValueError(f"{proto.name}: n_columns={obj.params.get('n_columns')} but {len(columns)} column(s) asked")
        named = protocol_columns(obj.params)
        outside = sorted(set(named) - set(columns))
        if outside:
            raise PolicyRefusal("columns", f"{proto.name} names column(s) {outside} outside the query's allow-listed "
                                           f"columns {columns}")
        key = hashlib.sha256(json.dumps({"protocol": proto.name, "params": obj.params, "cohort": cohort,
                                         "columns": columns, "k": k, "data": self._stamp(run, columns)},
                                        sort_keys=True).encode()).hexdigest()
        ledger = _read_json(self.root / "ledger.json", {}) or {}
        prev = ledger.get(_ledger_key(key, parts))
        if prev is not None and sorted(prev["participants"]) != sorted(parts):
            raise PolicyRefusal("once", f"this quantity was released with sites {prev['participants']} "
                                        f"(run {prev['run']}); it is not released again with another set of sites")
        return obj, key

    def _record_release(self, key: str, run: str, parts: list[str]) -> None:
        path = self.root / "ledger.json"
        ledger = _read_json(path, {}) or {}
        ledger.setdefault(_ledger_key(key, parts), {"participants": sorted(parts), "run": run, "time": time.time()})
        _atomic_json(path, ledger)

    # ------------------------------------------------------------------ query state
    def _qpath(self, run: str, qid: str) -> Path:
        return self.run_dir(run) / "queries" / qid

    def _meta(self, run: str, qid: str) -> dict[str, Any]:
        meta = _read_json(_ext(self._qpath(run, qid), ".meta"))
        if meta is None:
            raise ValueError(f"site {self.site}: query {qid!r} was never opened in run {run!r}")
        return meta

    def _save_meta(self, run: str, qid: str, meta: Mapping[str, Any]) -> None:
        _atomic_json(_ext(self._qpath(run, qid), ".meta"), dict(meta))

    def _load(self, run: str, qid: str) -> tuple[dict[str, Any], SiteComputedProtocol, dict[str, Any], CohortData]:
        meta = self._meta(run, qid)
        proto = protocol_class(meta["spec"]["protocol"]).from_params(meta["spec"].get("params") or {})
        state = load_state(self._qpath(run, qid))
        data = self.cohort_data(self.table(), meta["spec"], int(meta["k"]))
        digest = proto.params.get("model_digest")
        if digest is not None:  # a model-based query runs on the model this site derived, never a sent one
            model = self.derived_models(run).get(str(digest))
            if model is None:
                raise PolicyRefusal("models", f"model {str(digest)[:12]}... was not derived by this site in run {run}")
            data = CohortData(data.y, data.X, data.columns, extra={**data.extra, "fusion_model": model})
        return meta, proto, state, data

    # ------------------------------------------------------------------ models this site derived
    def _models_dir(self, run: str) -> Path:
        return self.run_dir(run) / "models"

    def derived_models(self, run: str) -> dict[str, Any]:
        """Fusion models this site derived itself in ``run`` (from its own fit state), by digest."""
        from shared.fusion import SVMModel

        out = {}
        d = self._models_dir(run)
        for p in sorted(d.glob("*.json")) if d.is_dir() else []:
            m = SVMModel.from_json(json.loads(p.read_text()))
            out[m.digest()] = m
        return out

    def _keep_model(self, run: str, proto: SiteComputedProtocol, rel: Mapping[str, Any]) -> None:
        """After a fusion fit: keep the model this site derived, so it scores only with its own models."""
        res = proto.result(dict(rel))
        model = getattr(res, "model", None)
        if model is not None:
            _atomic_json(self._models_dir(run) / f"{model.digest()}.json", model.to_json())

    def _contribution(self, meta: Mapping[str, Any], proto: SiteComputedProtocol, state: Mapping[str, Any],
                      data: CohortData) -> dict[str, np.ndarray]:
        c = proto.empty(dict(state)) if meta["excluded"] else proto.local(data, dict(state))
        c = {k: np.asarray(v, dtype=np.float64) for k, v in c.items()}
        c[INCLUDED] = np.asarray(0.0 if meta["excluded"] else 1.0)
        return c

    def _specs(self, proto: SiteComputedProtocol, state: Mapping[str, Any]) -> dict[str, dict[str, float]]:
        lay = {k: {"bound": float(v["bound"]), "frac_bits": int(v["frac_bits"])} for k, v in proto.layout(dict(state)).items()}
        lay[INCLUDED] = {"bound": 1.0, "frac_bits": 0}
        return lay

    def _advance(self, run: str, qid: str, totals: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
        """Advance one query with its totals; returns its release when done."""
        meta, proto, state, _ = self._load(run, qid)
        n_included = int(round(float(np.asarray(totals.get(INCLUDED, 0)))))
        tot = {k: np.asarray(v, dtype=np.float64) for k, v in totals.items() if k != INCLUDED}
        state, done = proto.advance(dict(state), tot)
        meta["round"] = int(meta["round"]) + 1
        meta["included"] = n_included
        save_state(self._qpath(run, qid), state)
        if not done:
            if meta["round"] >= proto.max_rounds:
                meta["status"] = "failed"
                self._save_meta(run, qid, meta)
                raise RuntimeError(f"{proto.name} did not finish in {proto.max_rounds} rounds")
            self._save_meta(run, qid, meta)
            return None
        rel = proto.release(dict(state), int(meta["k"]))
        rel = {**rel, "sites_included": n_included, "participants": meta["spec"]["participants"]}
        meta["status"] = "done"
        self._save_meta(run, qid, meta)
        self._record_release(meta["key"], run, meta["spec"]["participants"])
        if proto.name == "fusion_svm_fit":
            self._keep_model(run, proto, rel)
        return rel

    # ------------------------------------------------------------------ the operations
    def open(self, run: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and open queries; run single-site ones to completion; advertise sessions."""
        if not ID.match(run):
            raise ValueError(f"run id {run!r} is not valid")
        k = int(request.get("k", 0))
        role = request.get("role")
        role = self._fix_role(run, role)
        specs = list(request.get("queries", []))
        self._budget(run, len(specs))
        accepted, refused, failed, released = [], {}, {}, {}
        table = self.table()
        for spec in specs:
            qid = str(spec.get("qid", "?"))
            try:
                proto, key = self.validate(run, spec, k, role)
                data = self.cohort_data(table, spec, k)
                digest = proto.params.get("model_digest")
                if digest is not None and str(digest) not in self.derived_models(run):
                    raise PolicyRefusal("models", f"model {str(digest)[:12]}... was not derived by this site in "
                                                  f"run {run}")
                y = data.y
                excluded = any(0 < int((y == c).sum()) < k for c in (0, 1))
                state = proto.init_state()
                meta = {"spec": {kk: spec[kk] for kk in ("qid", "protocol", "params", "cohort", "columns",
                                                        "participants") if kk in spec},
                        "key": key, "k": k, "excluded": excluded, "round": 0, "status": "open"}
                meta["spec"]["params"] = proto.params
                save_state(self._qpath(run, qid), state)
                self._save_meta(run, qid, meta)
                if excluded:
                    logger.info("site %s: excluded from %s (a class has 0 < n < %d of its patients)", self.site, qid, k)
                if spec["participants"] == [self.site]:
                    released[qid] = self._run_alone(run, qid)
                else:
                    accepted.append(qid)
            except PolicyRefusal as exc:
                refused[qid] = {"rule": exc.rule, "reason": str(exc)}
                logger.warning("site %s refused query %s: %s", self.site, qid, exc)
            except (ValueError, KeyError, RuntimeError) as exc:
                failed[qid] = str(exc)
                logger.warning("site %s cannot answer query %s: %s", self.site, qid, exc)
        reply: dict[str, Any] = {"accepted": accepted, "refused": refused, "failed": failed, "released": released}
        reply["adverts"] = self._advertise(run, request.get("advertise") or {})
        return reply

    def _fix_role(self, run: str, role: Any) -> str | None:
        own = self.ctx.policy.role
        path = self.run_dir(run) / "role.json"
        fixed = (_read_json(path, {}) or {}).get("role")
        if role is not None and role not in ROLE_COHORTS:
            raise ValueError(f"unknown role {role!r}")
        if own is not None and role is not None and role != own:
            raise PolicyRefusal("role", f"the server calls this site {role!r}; its policy says {own!r}")
        want = own or role or fixed
        if fixed is not None and want != fixed:
            raise PolicyRefusal("role", f"this site's role in run {run} is {fixed!r}; it does not change mid-run")
        if want is not None and fixed is None:
            _atomic_json(path, {"role": want})
        return want

    def _run_alone(self, run: str, qid: str) -> dict[str, Any]:
        meta, proto, state, data = self._load(run, qid)
        for _ in range(proto.max_rounds):
            contrib = self._contribution(meta, proto, state, data)
            rel = self._advance(run, qid, contrib)
            if rel is not None:
                return rel
            meta, proto, state, data = self._load(run, qid)
        raise RuntimeError(f"{proto.name} did not finish in {proto.max_rounds} rounds")

    def _advertise(self, run: str, sessions: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for sid, parts in sessions.items():
            if not ID.match(str(sid)):
                raise ValueError(f"session id {sid!r} is not valid")
            parts = sorted(str(p) for p in parts)
            out[sid] = self._sa().advertise(str(sid), parts, query_id=str(sid))
            _atomic_json(self.run_dir(run) / "sessions" / f"{sid}.adv.json", {"participants": parts})
        return out

    def step(self, run: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """One protocol round: unmask totals and advance (or release), mask the next contributions, share keys.

        ``totals``    ``{session: sum}`` of the contributions this site masked in the previous step
        ``plan``      ``{session: [query ids]}`` whose next contributions to mask in that session
        ``envelopes`` ``{session: {sender: envelope}}`` for a session's first mask only (later rounds
                      reuse its keys: :meth:`shared.secagg.SiteSecAgg.mask_next`)
        ``share``     ``{session: adverts}`` for sessions advertised at ``open``

        The site closes a session (its keys are destroyed) once no query in it is still open here.
        """
        reply: dict[str, Any] = {"released": {}, "failed": {}, "masked": {}, "envelopes": {}}
        sessions = self.run_dir(run) / "sessions"
        # 1. totals of the sessions masked in the previous step
        for sid, total in (request.get("totals") or {}).items():
            smap = _read_json(sessions / f"{sid}.json")
            if smap is None:
                raise ValueError(f"site {self.site}: no contribution was masked in session {sid!r}")
            plain = self._sa().unmask(str(sid), total)
            by_q: dict[str, dict[str, np.ndarray]] = {}
            for full, v in plain.items():
                qid, _, key = full.partition(KEY_SEP)
                by_q.setdefault(qid, {})[key] = v
            for qid in smap["qids"]:
                if self._meta(run, qid)["status"] != "open":
                    continue
                try:
                    rel = self._advance(run, qid, by_q.get(qid, {}))
                    if rel is not None:
                        reply["released"][qid] = rel
                except (ValueError, RuntimeError, KeyError) as exc:
                    reply["failed"][qid] = str(exc)
            if not any(self._meta(run, q)["status"] == "open" for q in smap["qids"]):
                self._sa().close(str(sid))  # nothing left to sum here: destroy the session's keys
        # 2. mask this step's contributions (a session's first round opens the peers' seeds)
        envelopes_by_sid = request.get("envelopes") or {}
        for sid, qids in (request.get("plan") or {}).items():
            adv = _read_json(sessions / f"{sid}.adv.json")
            if adv is None:
                raise ValueError(f"site {self.site}: session {sid!r} was never advertised in run {run!r}")
            parts = adv["participants"]
            contrib, specs, used = {}, {}, []
            for qid in [str(q) for q in qids]:
                try:
                    meta, proto, state, data = self._load(run, qid)
                except ValueError as exc:
                    reply["failed"][qid] = str(exc)
                    continue
                if meta["status"] != "open":
                    continue
                if sorted(meta["spec"]["participants"]) != parts:
                    reply["failed"][qid] = f"session {sid} does not have this query's participants"
                    continue
                try:
                    c = self._contribution(meta, proto, state, data)
                except (ValueError, KeyError) as exc:  # this query fails here; the session goes on
                    c = {**proto.empty(dict(state)), INCLUDED: np.asarray(0.0)}
                    meta["status"] = "failed"
                    self._save_meta(run, qid, meta)
                    reply["failed"][qid] = f"site {self.site}: {exc}"
                    logger.warning("site %s: query %s failed: %s", self.site, qid, exc)
                for kk, v in c.items():
                    contrib[f"{qid}{KEY_SEP}{kk}"] = v
                for kk, v in self._specs(proto, state).items():
                    specs[f"{qid}{KEY_SEP}{kk}"] = v
                used.append(qid)
            if not used:
                self._sa().close(str(sid))
                continue
            self._budget(run, len(used))
            _atomic_json(sessions / f"{sid}.json", {"qids": used})
            if sid in envelopes_by_sid:
                reply["masked"][sid] = self._sa().mask(str(sid), envelopes_by_sid[sid], contrib, specs, keep=True)
            else:
                reply["masked"][sid] = self._sa().mask_next(str(sid), contrib, specs)
        # 3. share the sessions advertised at open
        for sid, adverts in (request.get("share") or {}).items():
            reply["envelopes"][sid] = self._sa().share(str(sid), adverts)
        return reply

    def handle(self, run: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """Dispatch ``request["op"]`` (``open`` or ``step``)."""
        op = request.get("op")
        if op == "open":
            return self.open(run, request)
        if op == "step":
            return self.step(run, request)
        raise PolicyRefusal("vocabulary", f"unknown statistics operation {op!r}")


def zero_contribution_like(c: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exposed for tests: what an excluded site sends (zeros of the same layout)."""
    return zeros_like(c)
