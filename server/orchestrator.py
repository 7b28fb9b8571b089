"""The server's stages, run against a Flower ``Grid``: discover -> train -> signatures.

The ServerApp (``server.server_app``) only builds an :class:`Orchestrator` and calls ``run()``.
Aggregation is Flower's own strategies (FedAvg, FedProx, FedAdam, FedAvgM from ``flwr.serverapp.strategy``;
the server optimisers leave normalisation buffers to a plain average);
this module chooses which nodes get which message (external sites never receive a training
message), checkpoints every round, records everything in the run record, and survives sites that
fail a round as long as ``federation.min_sites`` replied.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from shared.config import RectalFLConfig
from shared.records import (
    LAYOUT_KEY,
    arrays_to_record,
    is_norm_stat,
    pack_arrays,
    pack_json,
    record_to_arrays,
    states_to_record,
    unpack_arrays,
    unpack_json,
)

logger = logging.getLogger(__name__)


POLICY_REFUSED_CODE = 4300
"""Error code of a site's reply that its policy refused the request (see ``client.client_app``)."""


class FederationError(RuntimeError):
    """The federation cannot go on (too few sites, none reachable, ...); the message says why."""


@dataclass
class SiteNode:
    node_id: int
    site: str
    role: str  # "train" | "external"
    counts: dict[str, int] = field(default_factory=dict)


class _SubsetGrid:
    """A view of a Grid that exposes only some node ids (so a strategy samples training sites only)."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]):
        self._grid = grid
        self._ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


NETWORK_GRIDS = ("HttpGrid", "GrpcGrid")
"""Flower's grids that reach a SuperLink over the network (the Deployment Engine); only their exchanges go
through :func:`exchange_riding_out_errors` (short polls, transient errors ridden out). Any other grid
(the simulation engine's, which answers in memory) keeps its own ``send_and_receive``: sending it through
a polling loop once made every statistics exchange of a simulated run take 3 s where the sites needed
0.1-1 s."""

TRANSIENT = ("database is locked", "500 Internal Server Error", "503 Service Unavailable", "UNAVAILABLE")
"""Errors of a SuperLink under load that a second try clears (its SQLite state answers 'database is locked')."""


def exchange_riding_out_errors(grid: Any, msgs: list[Message], timeout: float | None, *, poll_s: float = 0.1,
                               poll_max_s: float = 0.5, tries: int = 10, backoff_s: float = 2.0) -> list[Message]:
    """Flower's ``send_and_receive`` (push once, pull until every reply or ``timeout``), with two changes.

    - Polls start short and back off: the first pull comes ``poll_s`` after the push, each wait is 1.5x
      the last, up to ``poll_max_s``, and it starts short again whenever replies arrive. Flower's own
      loop sleeps a fixed 3 s between pulls, so every exchange of a Deployment Engine run paid on average
      1.5 s after its last reply (a fusion analysis makes dozens of them). An empty pull is one small
      request to the SuperLink.
    - A pull that fails with a transient SuperLink error is tried again (up to ``tries`` times in a row,
      waiting ``backoff_s``, doubling) instead of ending the run. A push is never repeated (the SuperLink
      may hold part of it), so a failing push still raises.
    """
    ids = set(grid.push_messages(msgs))
    end = time.time() + (timeout if timeout is not None else 0.0)
    out: list[Message] = []
    failures, wait = 0, backoff_s
    poll = poll_s
    while timeout is None or time.time() < end:
        try:
            got = list(grid.pull_messages(ids))
        except Exception as exc:  # noqa: BLE001 - only the transient ones are ridden out
            failures += 1
            if failures >= tries or not any(t in str(exc) for t in TRANSIENT):
                raise
            logger.warning("SuperLink: %s; trying again in %.0f s (%d/%d)", str(exc).splitlines()[0], wait,
                           failures, tries)
            time.sleep(wait)
            wait = min(wait * 2, 30.0)
            continue
        failures, wait = 0, backoff_s
        out.extend(got)
        ids.difference_update({m.metadata.reply_to_message_id for m in got})
        if not ids:
            break
        poll = poll_s if got else min(poll * 1.5, poll_max_s)
        if timeout is not None:
            time.sleep(max(0.0, min(poll, end - time.time())))
        else:
            time.sleep(poll)
    return out


class _ProgressGrid:
    """A view of a Grid that counts message exchanges per stage into ``<run_dir>/progress.json``.

    ``rectalfl run`` reads it (with the run record) to show how far signatures, evaluation and the
    fusion analysis are; it is never needed to resume or report a run.
    """

    def __init__(self, grid: Grid, path: Path, stage_of: Any):
        self._grid = grid
        self._path = Path(path)
        self._stage_of = stage_of
        self.counts: dict[str, dict[str, int]] = {}

    def send_and_receive(self, messages: Iterable[Message], *args: Any, **kwargs: Any) -> Iterable[Message]:
        msgs = list(messages)
        g = self._grid
        if type(g).__name__ in NETWORK_GRIDS:
            replies = exchange_riding_out_errors(g, msgs, kwargs.get("timeout"))  # a SuperLink over the network
        else:  # the simulation engine's grid (wrapped to stop on Ctrl-C), or a test's: its own loop
            replies = list(g.send_and_receive(msgs, *args, **kwargs))
        try:
            stage = str(self._stage_of() or "run")
            c = self.counts.setdefault(stage, {"exchanges": 0, "messages": 0, "replies": 0})
            c["exchanges"] += 1
            c["messages"] += len(msgs)
            c["replies"] += sum(not m.has_error() for m in replies)
            tmp = self._path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"updated_at": time.time(), "stages": self.counts}))
            tmp.replace(self._path)
        except Exception as exc:  # noqa: BLE001 - progress is a courtesy, never a failure
            logger.debug("progress not written: %s", exc)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class _BuffersAveraged:
    """Mixin for server optimisers (FedAdam, FedAvgM): normalisation buffers are not weights.

    A running mean or variance is an estimate of the sites' feature statistics, not a parameter
    that a gradient moves: Adam-stepping it moves a variance by about ``eta`` per round whatever the
    data says, and server momentum overshoots it. The optimiser steps the weights; every buffer of
    the new model is the plain ``num-examples``-weighted mean of the sites' buffers (FedAvg's).
    """

    layout: str | None = None
    """The packed layout of this round's arrays (:func:`shared.records.pack_arrays`), set by the orchestrator:
    the weights travel as one flat array per dtype, so the buffers are found through it."""

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, Any]:
        replies = list(replies)
        new, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if new is None:
            return new, metrics
        ok = [r for r in replies if not r.has_error()]
        weights = np.array([float(r.content["metrics"][self.weighted_by_key]) for r in ok])  # type: ignore[attr-defined]

        def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
            return dict(unpack_arrays(record, self.layout)) if self.layout else record_to_arrays(record)

        flat = arrays_of(new)
        keys = [k for k in flat if is_norm_stat(k)]
        if not keys:
            return new, metrics
        sites = [arrays_of(r.content["arrays"]) for r in ok]
        for key in keys:
            mean = sum(w * s[key].astype(np.float64) for w, s in zip(weights, sites, strict=True)) / weights.sum()
            flat[key] = np.asarray(mean, dtype=np.float32)
        out = pack_arrays(flat, self.layout)[0] if self.layout else arrays_to_record(flat)
        if isinstance(getattr(self, "current_arrays", None), ArrayRecord):  # FedAvgM steps from what it returned
            self.current_arrays = out
        return out, metrics


class FedAdamBuffersAveraged(_BuffersAveraged, FedAdam):
    """Flower's FedAdam on the weights; normalisation buffers averaged (:class:`_BuffersAveraged`)."""


class FedAvgMBuffersAveraged(_BuffersAveraged, FedAvgM):
    """Flower's FedAvgM (server momentum) on the weights; normalisation buffers averaged."""


def make_strategy(cfg: RectalFLConfig, n_train: int) -> FedAvg:
    """The configured Flower strategy, sampling every training site each round."""
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n_train,
                  min_available_nodes=n_train, weighted_by_key="num-examples")
    f = cfg.federation
    if f.strategy == "fedavg":
        return FedAvg(**common)
    if f.strategy == "fedprox":
        return FedProx(**common, proximal_mu=f.proximal_mu)
    if f.strategy == "fedadam":
        return FedAdamBuffersAveraged(**common, eta=f.server_lr if f.server_lr is not None else 0.01,
                                      eta_l=cfg.train.lr, beta_1=f.server_betas[0], beta_2=f.server_betas[1],
                                      tau=f.server_tau)
    if f.strategy == "fedavgm":
        return FedAvgMBuffersAveraged(**common, server_learning_rate=f.server_lr if f.server_lr is not None else 1.0,
                                      server_momentum=f.server_momentum)
    raise ValueError(f"unknown strategy {f.strategy!r}")


def strategy_state(strategy: FedAvg) -> dict[str, np.ndarray]:
    """Server-optimiser state (FedAdam moments, FedAvgM momentum) so a resumed run continues identically."""
    out: dict[str, np.ndarray] = {}
    for attr in ("m_t", "v_t"):
        val = getattr(strategy, attr, None)
        if isinstance(val, dict):
            for k, v in val.items():
                out[f"{attr}::{k}"] = np.asarray(v)
    momentum, current = getattr(strategy, "momentum_vector", None), getattr(strategy, "current_arrays", None)
    if isinstance(momentum, list) and isinstance(current, ArrayRecord):  # FedAvgM: a list in the arrays' key order
        for k, v in zip(current.keys(), momentum, strict=True):
            out[f"momentum::{k}"] = np.asarray(v)
    return out


def load_strategy_state(strategy: FedAvg, arrays: dict[str, np.ndarray]) -> None:
    for attr in ("m_t", "v_t"):
        vals = {k.split("::", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{attr}::")}
        if vals:
            setattr(strategy, attr, vals)
    momentum = [v for k, v in arrays.items() if k.startswith("momentum::")]
    if momentum and hasattr(strategy, "momentum_vector"):
        strategy.momentum_vector = momentum  # same key order as written (the checkpoint keeps insertion order)


class _SumReply:
    """The revealed weighted mean of a secure round, as the one reply a Flower strategy aggregates.

    Its weight ``num-examples`` is the total over the sites, so FedAvg / FedProx return the mean as
    is and FedAdam steps from it, exactly as from the sites' own replies.
    """

    def __init__(self, arrays: ArrayRecord, n: int, like: Message) -> None:
        from flwr.app import MetricRecord

        self.content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": int(n)})})
        self.metadata = like.metadata

    def has_error(self) -> bool:
        return False

    def has_content(self) -> bool:
        return True


class Orchestrator:
    """Runs the stages of one run on a Grid.

    Parameters
    ----------
    grid : Grid
        Flower grid (simulation or deployment).
    cfg : RectalFLConfig
        The resolved run config; sent to every site with each message.
    run_dir : Path
        Where checkpoints and models go (server side only).
    store : server.store.RunStore
        The run record.
    sim_sites : list of dict, optional
        Simulation only: the site list virtual nodes index with their partition-id.
    external_sites : set of str
        Site names that only validate.
    """

    def __init__(self, grid: Grid, cfg: RectalFLConfig, run_dir: Path, store: Any, run_id: str, *,
                 sim_sites: list[dict] | None = None, external_sites: Iterable[str] = (),
                 timeout: float = 3600.0, expected_nodes: int | None = None):
        self.grid = grid if grid is None else _ProgressGrid(grid, Path(run_dir) / "progress.json", self._running_stage)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.store = store
        self.run_id = run_id
        self.sim_sites = sim_sites
        self.external = set(external_sites)
        self.timeout = timeout
        self.expected_nodes = expected_nodes
        self.nodes: list[SiteNode] = []
        self.floors: dict[str, int] = {}
        self.refused: set[int] = set()
        """Deployment: node ids refused for their identity (never asked again this run)."""
        self.cfg_yaml = cfg.to_yaml()

    def _running_stage(self) -> str | None:
        stages = self.store.stages(self.run_id)
        running = stages[stages["status"] == "running"]
        return str(running["name"].iloc[-1]) if len(running) else None

    # ------------------------------------------------------------------ messaging
    def _config(self, **extra: Any) -> ConfigRecord:
        conf: dict[str, Any] = {"rectalfl-config": self.cfg_yaml, "run-id": self.run_id, **extra}
        if self.sim_sites is not None:
            conf["sim-sites"] = pack_json(self.sim_sites)
        return ConfigRecord(conf)

    def _send(self, node_ids: list[int], message_type: str, content: RecordDict) -> list[Message]:
        msgs = [Message(content=content, message_type=message_type, dst_node_id=n) for n in node_ids]
        return list(self.grid.send_and_receive(msgs, timeout=self.timeout))

    def _site_of(self, node_id: int) -> str:
        return next((n.site for n in self.nodes if n.node_id == node_id), f"node-{node_id}")

    def _record_failures(self, stage: str, rnd: int | None, sent: list[int], replies: list[Message]) -> list[Message]:
        ok = [m for m in replies if not m.has_error()]
        answered = {m.metadata.src_node_id for m in replies}
        silent = [n for n in sent if n not in answered]
        for m in replies:
            if m.has_error():
                nid = m.metadata.src_node_id
                # The SuperLink answers for an unreachable node itself ("Node Unavailable"), from its own id:
                # put the error on the node that did not answer when that is unambiguous.
                if nid not in sent and len(silent) == 1:
                    nid = silent.pop()
                site = self._site_of(nid)
                self.store.event(self.run_id, "site_failed", m.error.reason or "no reason given", level="error",
                                 site=site, round=rnd, detail={"stage": stage, "code": m.error.code})
                logger.warning("%s round %s: %s: %s", stage, rnd, site, m.error.reason)
        for nid in silent:
            site = self._site_of(nid)
            self.store.event(self.run_id, "site_dropped", f"{site} did not reply within {self.timeout:.0f} s",
                             level="warning", site=site, round=rnd, detail={"stage": stage})
        return ok

    # ------------------------------------------------------------------ stages
    def wait_for_nodes(self) -> list[int]:
        """Wait for the expected sites (or ``min_sites``); start with those present when the wait ends."""
        want = self.expected_nodes or self.cfg.federation.min_sites
        limit = self.cfg.federation.join_timeout_s if self.sim_sites is None else min(self.timeout, 600)
        deadline = time.time() + limit
        ids = list(self.grid.get_node_ids())
        while len(ids) < want and time.time() < deadline:
            time.sleep(1.0)
            ids = list(self.grid.get_node_ids())
        if len(ids) < min(want, self.cfg.federation.min_sites):
            raise FederationError(f"only {len(ids)} site(s) connected within {limit:.0f} s, {want} expected and "
                                  f"federation.min_sites is {self.cfg.federation.min_sites}; check that each site's "
                                  "SuperNode is running (`rectalfl site join`) and can reach the SuperLink")
        if len(ids) < want:
            self.store.event(self.run_id, "sites_missing", f"{len(ids)} of {want} expected sites connected within "
                             f"{limit:.0f} s; starting with them", level="warning")
        return ids

    def discover(self) -> list[SiteNode]:
        """Ask every node who it is; record sites, roles and (count-only) split sizes."""
        ids = self.wait_for_nodes()
        with self.store.stage(self.run_id, "discover"):
            self.nodes = sorted(self._describe(ids), key=lambda n: n.site)
        self.poll_liveness()
        if not any(n.role == "train" for n in self.nodes):
            raise FederationError("no training site answered the discovery query")
        return self.nodes

    def _describe(self, ids: list[int]) -> list[SiteNode]:
        ids = [i for i in ids if i not in self.refused]
        if not ids:
            return []
        registered = self._registered_nodes()
        replies = self._send(ids, "query.describe", RecordDict({"config": self._config()}))
        ok = self._record_failures("discover", None, ids, replies)
        nodes = []
        for m in ok:
            info = unpack_json(str(m.content["info"]["info"]))
            nid = m.metadata.src_node_id
            if registered is not None:
                problem = identity_problem(registered.get(nid), str(info.get("site")), self.cfg)
                if problem is not None:
                    self.refused.add(nid)
                    self.store.event(self.run_id, "identity_mismatch", problem["message"], level="error",
                                     site=problem["registered"] or str(info.get("site")), detail=problem)
                    logger.error("refused node %s: %s", nid, problem["message"])
                    continue
            own_role = str(info.get("role") or "")
            role = own_role or ("external" if info["site"] in self.external else "train")
            if own_role and (own_role == "external") != (info["site"] in self.external):
                self.store.event(self.run_id, "role_from_site", f"{info['site']} is {own_role} by its own policy",
                                 level="warning", site=info["site"])
            counts = {k: int(v) for k, v in info.items() if k.startswith("patients-")}
            self.floors[info["site"]] = int(info.get("min-cell-count", 0))
            nodes.append(SiteNode(nid, info["site"], role, counts))
            self.store.event(self.run_id, "site_joined", f"{info['site']} joined as {role}", site=info["site"],
                             detail=counts)
        return nodes

    def _registered_nodes(self) -> dict[int, Any] | None:
        """Deployment: ``{node id: Flower NodeInfo}`` (the name and public key the operator registered);
        None on the simulation engine, whose virtual nodes have no keys (they map by partition-id)."""
        if self.sim_sites is not None:
            return None
        return {int(n.node_id): n for n in self.grid.get_nodes()}

    def refresh_nodes(self, rnd: int | None = None) -> bool:
        """Deployment: a site that reconnected has a new node id; find it again. True if any node changed."""
        if self.sim_sites is not None:
            return False
        known = {n.node_id for n in self.nodes} | self.refused
        new = [i for i in self.grid.get_node_ids() if i not in known]
        if not new:
            return False
        changed = False
        for node in self._describe(new):
            old = next((n for n in self.nodes if n.site == node.site), None)
            if old is not None:
                self.store.event(self.run_id, "site_rejoined", f"{node.site} rejoined (node {node.node_id})",
                                 site=node.site, round=rnd)
                old.node_id = node.node_id
            else:
                self.nodes.append(node)
                self.nodes.sort(key=lambda n: n.site)
            changed = True
        return changed

    def poll_liveness(self) -> None:
        """Record each site's online status and last heartbeat in the run record (for the dashboard)."""
        from server.liveness import poll_grid

        try:
            poll_grid(self.grid, self.store, self.run_id, {n.node_id: n.site for n in self.nodes}, roles=self.roles())
        except Exception as exc:  # noqa: BLE001 - liveness is for the dashboard; it never stops a run
            logger.warning("could not record site liveness: %s: %s", type(exc).__name__, exc)

    @property
    def train_nodes(self) -> list[SiteNode]:
        return [n for n in self.nodes if n.role == "train"]

    def checkpoint_path(self, rnd: int) -> Path:
        return self.run_dir / "checkpoints" / f"round_{rnd:04d}.npz"

    def train(self, initial: ArrayRecord, *, start_round: int = 0, strategy_arrays: dict | None = None) -> ArrayRecord:
        """Federated rounds ``start_round+1 .. federation.rounds`` over the training sites."""
        train_ids = [n.node_id for n in self.train_nodes]
        strategy = make_strategy(self.cfg, len(train_ids))
        if strategy_arrays:
            load_strategy_state(strategy, strategy_arrays)
        view = _SubsetGrid(self.grid, train_ids)
        arrays = initial
        min_sites = min(self.cfg.federation.min_sites, len(train_ids))
        secure = self.cfg.federation.secure_aggregation
        session: dict[str, Any] | None = None
        with self.store.stage(self.run_id, "train"):
            for rnd in range(start_round + 1, self.cfg.federation.rounds + 1):
                t0 = time.perf_counter()
                if self.refresh_nodes(rnd):
                    view = _SubsetGrid(self.grid, [n.node_id for n in self.train_nodes])
                    session = None  # a node changed: a new secure-aggregation session with the current ones
                self.poll_liveness()
                if secure and session is None:
                    session = self.secure_session(rnd)
                # weights travel packed (one array per dtype): Flower moves each Array as its own request
                packed, layout = pack_arrays(record_to_arrays(arrays))
                conf = self._config(**{LAYOUT_KEY: layout}, **({"proximal-mu": self.cfg.federation.proximal_mu}
                                                               if self.cfg.federation.strategy == "fedprox" else {}))
                messages = list(strategy.configure_train(rnd, packed, conf, view))  # type: ignore[arg-type]
                if session is not None:
                    messages = self._secure_messages(messages, session)
                sent = [m.metadata.dst_node_id for m in messages]
                self.store.start_round(self.run_id, "train", rnd, n_sent=len(sent))
                bytes_down = sum(m.content["arrays"].count_bytes() for m in messages)
                replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
                ok = self._record_failures("train", rnd, sent, replies)
                if session is not None:
                    ok = self._secure_sum(rnd, ok, session, packed, t0)
                else:
                    ok = self.screen_updates(rnd, ok, arrays, layout=layout)
                if len(ok) < min_sites:
                    self.store.finish_round(self.run_id, "train", rnd, n_replied=len(ok),
                                            n_failed=len(sent) - len(ok), status="failed",
                                            seconds=time.perf_counter() - t0)
                    raise FederationError(
                        f"round {rnd}: only {len(ok)} of {len(sent)} training sites replied, "
                        f"federation.min_sites is {min_sites}; see the events in the run record")
                # A fixed reply order makes the floating-point sums, hence a resumed run, reproducible.
                ok.sort(key=lambda m: str(m.content["site"]["name"]))
                if isinstance(strategy, _BuffersAveraged):
                    strategy.layout = layout
                new_arrays, _ = strategy.aggregate_train(rnd, [session["sum"]] if session is not None else ok)
                if new_arrays is None:
                    raise FederationError(f"round {rnd}: the strategy produced no model")
                arrays = cast_like(arrays_to_record(unpack_arrays(new_arrays, layout)), initial)
                bytes_up = sum(m.content["arrays"].count_bytes() for m in ok)
                losses = []
                for m in ok:
                    site = str(m.content["site"]["name"])
                    mr = {k: float(v) for k, v in m.content["metrics"].items()}
                    self.store.log_metrics(self.run_id, "train", site, mr, round=rnd, split="train")
                    if np.isfinite(mr.get("train-loss", np.nan)):
                        losses.append(mr["train-loss"])
                self._checkpoint(rnd, arrays, strategy)
                self.store.finish_round(self.run_id, "train", rnd, n_replied=len(ok), n_failed=len(sent) - len(ok),
                                        train_loss=float(np.mean(losses)) if losses else None,
                                        bytes_down=int(bytes_down), bytes_up=int(bytes_up),
                                        seconds=time.perf_counter() - t0)
                logger.info("round %d/%d: %d site(s), mean train loss %.4f, %.1f s", rnd, self.cfg.federation.rounds,
                            len(ok), float(np.mean(losses)) if losses else float("nan"), time.perf_counter() - t0)
        return arrays

    # ------------------------------------------------------------------ secure aggregation of updates
    def secure_session(self, rnd: int) -> dict[str, Any]:
        """Set up the training sites' kept secure-aggregation session (two messages: advertise, share)."""
        import uuid

        from shared.secagg import SecAggDropout, route_envelopes
        from shared.wire import pack, pack_bytes, unpack, unpack_bytes

        nodes = {n.site: n.node_id for n in self.train_nodes}
        parts = sorted(nodes)
        if len(parts) < 3:
            raise FederationError(f"federation.secure_aggregation needs at least 3 training sites ({len(parts)} here: "
                                  f"{', '.join(parts)}); with 2, each learns the other's update from the mean")
        sid = f"{self.run_id}.train.{uuid.uuid4().hex[:12]}"

        def call(request: dict[str, Any], per_site: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
            msgs = []
            for site, nid in nodes.items():
                text, arrays = pack({**request, **(per_site or {}).get(site, {})})
                msgs.append(Message(content=RecordDict({"config": self._config(
                                        request=text, **{"request-arrays": pack_bytes(arrays)})}),
                                    message_type="train.secagg", dst_node_id=nid))
            replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
            ok = self._record_failures("train", rnd, list(nodes.values()), replies)
            got = {str(m.content["site"]["name"]): unpack(str(m.content["reply"]["json"]),
                                                          unpack_bytes(m.content["reply"]["arrays"])) for m in ok}
            missing = [s for s in parts if s not in got]
            if missing:
                raise FederationError(f"round {rnd}: secure aggregation could not be set up: no answer from "
                                      f"{', '.join(missing)} (see the events); every training site must take part")
            return got

        adverts = {s: r["advert"] for s, r in call({"op": "advertise", "session": sid, "participants": parts}).items()}
        shares = {s: r["envelopes"] for s, r in call({"op": "share", "session": sid, "adverts": adverts}).items()}
        try:
            inbox = route_envelopes(shares, parts, session_id=sid)
        except (SecAggDropout, ValueError) as exc:
            raise FederationError(f"round {rnd}: secure aggregation could not be set up: {exc}") from None
        self.store.event(self.run_id, "secure_aggregation", f"model updates securely aggregated among "
                         f"{', '.join(parts)} (session {sid}); the server sees only their weighted sum, so per-site "
                         "update screening is off", round=rnd)
        return {"id": sid, "participants": parts, "inbox": inbox, "first": True}

    def _secure_messages(self, messages: list[Message], session: dict[str, Any]) -> list[Message]:
        """Each training message gets the session id and, in the session's first round, its envelopes."""
        from flwr.app import ConfigRecord as CR

        from shared.wire import pack, pack_bytes

        out = []
        for m in messages:
            site = self._site_of(m.metadata.dst_node_id)
            conf = dict(m.content["config"].items())
            conf["secagg-session"] = session["id"]
            content = {"arrays": m.content["arrays"]}
            if session["first"]:
                text, env = pack({"envelopes": session["inbox"].get(site, {})})
                conf["secagg"], conf["secagg-arrays"] = text, pack_bytes(env)
            content["config"] = CR(conf)
            out.append(Message(content=RecordDict(content), message_type=m.metadata.message_type,
                               dst_node_id=m.metadata.dst_node_id, group_id=m.metadata.group_id))
        session["first"] = False
        return out

    def _secure_sum(self, rnd: int, ok: list[Message], session: dict[str, Any], packed: ArrayRecord,
                    t0: float) -> list[Message]:
        """Sum the masked updates; the revealed weighted mean becomes ``session["sum"]``. No dropout recovery."""
        from shared.secagg import SecAggDropout, aggregate
        from shared.secure_updates import mean_from_sum

        masked = {str(m.content["site"]["name"]): record_to_arrays(m.content["arrays"]) for m in ok}
        try:
            total = aggregate(masked, session["participants"], session_id=session["id"])
            mean, n = mean_from_sum(total, {k: v.shape for k, v in record_to_arrays(packed).items()})
        except (SecAggDropout, ValueError, KeyError) as exc:
            missing = list(getattr(exc, "missing", []))
            self.store.finish_round(self.run_id, "train", rnd, n_replied=len(ok), n_failed=len(missing),
                                    status="failed", seconds=time.perf_counter() - t0)
            why = (f"no masked update from {', '.join(missing)}" if missing else f"the masked updates do not add up ({exc})")
            raise FederationError(
                f"round {rnd}: {why}. Securely aggregated updates have no dropout recovery: nothing of this round "
                "can be read without every participant. Resume the run when the site(s) are back (the sites "
                "refuse to send an update of the same weights to fewer sites)") from None
        session["sum"] = _SumReply(arrays_to_record(mean), n, ok[0])
        return ok

    def screen_updates(self, rnd: int, replies: list[Message], current: ArrayRecord, *,
                       layout: str | None = None) -> list[Message]:
        """Reject replies with non-finite weights, missing arrays or an update norm far outside the others'
        (recorded). ``layout``: the replies are packed (see :func:`shared.records.pack_arrays`)."""
        ref = record_to_arrays(current)
        norms: dict[int, float] = {}
        kept = []
        for i, m in enumerate(replies):
            site = str(m.content["site"]["name"]) if "site" in m.content else self._site_of(m.metadata.src_node_id)
            try:
                new = unpack_arrays(m.content["arrays"], layout) if layout else record_to_arrays(m.content["arrays"])
            except ValueError as exc:
                self._reject(rnd, site, f"malformed weights ({exc})")
                continue
            bad = [k for k, v in new.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
            missing = sorted(set(ref) - set(new))
            if bad or missing:
                why = (f"non-finite values in {len(bad)} array(s), e.g. {bad[0]}" if bad else
                       f"{len(missing)} array(s) missing, e.g. {missing[0]}")
                self._reject(rnd, site, why)
                continue
            sq = sum(float(np.sum((new[k].astype(np.float64) - ref[k].astype(np.float64)) ** 2))
                     for k in ref if ref[k].dtype.kind == "f")
            norms[i] = float(np.sqrt(sq))
            kept.append((i, m, site))
        ratio = self.cfg.federation.max_update_norm_ratio
        out = []
        for i, m, site in kept:
            others = [v for j, v in norms.items() if j != i]
            med = float(np.median(others)) if len(others) >= 2 else None
            if med is not None and med > 0 and norms[i] > ratio * med:
                self._reject(rnd, site, f"update norm {norms[i]:.3g} is {norms[i] / med:.1f}x the median of the other "
                                        f"sites ({med:.3g}); federation.max_update_norm_ratio is {ratio:g}")
                continue
            out.append(m)
        return out

    def _reject(self, rnd: int, site: str, why: str) -> None:
        self.store.event(self.run_id, "update_rejected", f"{site}: {why}; not averaged in", level="warning",
                         site=site, round=rnd)
        logger.warning("round %d: rejected the update of %s: %s", rnd, site, why)

    def _checkpoint(self, rnd: int, arrays: ArrayRecord, strategy: FedAvg) -> None:
        path = self.checkpoint_path(rnd)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {f"w::{k}": v for k, v in record_to_arrays(arrays).items()}
        payload.update({f"s::{k}": v for k, v in strategy_state(strategy).items()})
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **payload)
        tmp.replace(path)
        self.store.add_artefact(self.run_id, "checkpoint", path, self.run_dir, meta={"round": rnd})

    def roles(self) -> dict[str, str]:
        return {n.site: n.role for n in self.nodes}

    def min_count(self) -> int:
        """The disclosure floor statistics ask for: the run's, or the strictest site's own if higher."""
        return max([self.cfg.privacy.min_cell_count, *self.floors.values()])

    def signatures(self, arrays: ArrayRecord) -> dict[str, int]:
        """Every site (training and external) computes its signatures and keeps them; counts come back."""
        ids = [n.node_id for n in self.nodes]
        out: dict[str, int] = {}
        with self.store.stage(self.run_id, "signatures"):
            msgs = []
            packed, layout = pack_arrays(record_to_arrays(arrays))
            for n in self.nodes:
                content = RecordDict({"arrays": packed, "config": self._config(external=n.role == "external",
                                                                               **{LAYOUT_KEY: layout})})
                msgs.append(Message(content=content, message_type="evaluate.signatures", dst_node_id=n.node_id))
            replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
            ok = self._record_failures("signatures", None, ids, replies)
            for m in ok:
                out[str(m.content["site"]["name"])] = int(m.content["metrics"]["patients-with-signatures"])
        return out

    def site_stats_transport(self, requests: dict[str, dict]) -> dict[str, dict]:
        """Site-computed statistics (``shared.stats_driver``): one ``evaluate.stats`` message per site.

        A site whose policy refuses the whole request answers with an error naming the rule; it is
        recorded as a ``policy_refused`` event and that site's queries end.
        """
        from shared.wire import pack, pack_bytes, unpack, unpack_bytes

        by_site = {n.site: n.node_id for n in self.nodes}
        msgs = []
        for site, req in requests.items():
            if site not in by_site:
                continue
            text, arrays = pack(req)  # one record: its arrays ride in it as bytes (one object, not one per array)
            content = RecordDict({"config": self._config(request=text, **{"request-arrays": pack_bytes(arrays)})})
            msgs.append(Message(content=content, message_type="evaluate.stats", dst_node_id=by_site[site]))
        replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
        refused = [m for m in replies if m.has_error() and m.error.code == POLICY_REFUSED_CODE]
        for m in refused:
            self.store.event(self.run_id, "policy_refused", m.error.reason, level="warning",
                             site=self._site_of(m.metadata.src_node_id), detail={"stage": "statistics"})
        refused_ids = {m.metadata.src_node_id for m in refused}
        ok = self._record_failures("statistics", None,
                                   [m.metadata.dst_node_id for m in msgs if m.metadata.dst_node_id not in refused_ids],
                                   [m for m in replies if m not in refused])
        out: dict[str, dict] = {}
        for m in ok:
            rep = m.content["reply"]
            out[str(m.content["site"]["name"])] = unpack(str(rep["json"]), unpack_bytes(rep["arrays"]))
        return out

    def exchange(self, stage: str, msgs: list[Message]) -> dict[str, dict]:
        """Send, record failures, and return each replying site's arrays + metrics as one flat dict."""
        replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
        ok = self._record_failures(stage, None, [m.metadata.dst_node_id for m in msgs], replies)
        out: dict[str, dict] = {}
        for m in ok:
            vals: dict[str, Any] = dict(record_to_arrays(m.content["arrays"])) if "arrays" in m.content else {}
            if "metrics" in m.content:
                vals.update(dict(m.content["metrics"].items()))
            out[str(m.content["site"]["name"])] = vals
        return out


def identity_problem(node: Any, claimed: str, cfg: RectalFLConfig) -> dict[str, Any] | None:
    """Why a deployment node may not take part as ``claimed`` (None when it may).

    A node is the site whose public key it authenticated with: the SuperLink registered that key
    under the site's name (``rectalfl server start``; Flower's ``NodeInfo`` carries both). It is
    refused when it has no registered name, when that name is not in ``deploy.sites`` (if listed),
    when its key differs from ``<deploy.certs_dir>/sites/<name>/site.pub`` (if that file is readable
    here), or when its self-reported ``site-name`` differs from the registered one (one hospital
    shadowing another).
    """
    from shared.certs import CertError, key_fingerprint

    nid = int(getattr(node, "node_id", 0) or 0)
    registered = str(getattr(node, "name", "") or "")
    detail: dict[str, Any] = {"node_id": str(nid), "claimed": claimed, "registered": registered}
    try:
        fp = key_fingerprint(bytes(getattr(node, "public_key", b"") or b""))
    except CertError:
        fp = None
    detail["fingerprint"] = fp
    if node is None or not registered:
        return {**detail, "message": f"node {nid} calls itself {claimed} but has no registered site name: only keys "
                                     "registered by `rectalfl server start` (deploy.sites) may take part"}
    if cfg.deploy.sites and registered not in cfg.deploy.sites:
        return {**detail, "message": f"node {nid} is registered as {registered}, which is not in deploy.sites"}
    pub = Path(cfg.deploy.certs_dir) / "sites" / registered / "site.pub"
    if pub.is_file():
        try:
            if fp != key_fingerprint(pub):
                return {**detail, "message": f"node {nid} is registered as {registered} with a key that is not "
                                             f"{pub}: it is refused (re-register with `rectalfl server start`)"}
        except CertError:
            pass
    if claimed != registered:
        return {**detail, "message": f"node {nid} authenticated with {registered}'s key but calls itself {claimed}: "
                                     "refused (its site-name must match the key the operator registered)"}
    return None


def cast_like(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Give aggregated arrays the reference dtypes (FedAdam returns float64, averaging turns int buffers float)."""
    ref = record_to_arrays(reference)
    out = {}
    for k, v in record_to_arrays(arrays).items():
        dt = ref[k].dtype if k in ref else v.dtype
        out[k] = np.rint(v).astype(dt) if np.issubdtype(dt, np.integer) else v.astype(dt, copy=False)
    return arrays_to_record(out)


def load_checkpoint(path: Path) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    with np.load(path) as z:
        weights = {k[3:]: z[k] for k in z.files if k.startswith("w::")}
        strat = {k[3:]: z[k] for k in z.files if k.startswith("s::")}
    return arrays_to_record(weights), strat


def initial_record(cfg: RectalFLConfig) -> ArrayRecord:
    from shared.models import initial_states

    return states_to_record(initial_states(cfg))
