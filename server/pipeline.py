"""One run, end to end, on any Grid: record -> discover -> train (or resume) -> final model -> signatures.

Used by the ServerApp on both engines and by ``rectalfl simulate``. Everything a user keeps lands in
the run directory::

    runs/<timestamp>-<name>/
      config.yaml            the resolved config (defaults filled in)
      run.db                 the run record (SQLite: runs, stages, rounds, site metrics, events, artefacts)
      checkpoints/round_NNNN.npz   global weights (+ server-optimiser state) after each round
      models/final.npz, models/final.json   final weights and metadata (network, sequences, versions, config hash)
      tables/signature_auc.csv     per-backbone AUC on each site's test split and on the external sites
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from shared.config import RectalFLConfig, load_config

logger = logging.getLogger(__name__)

ReferenceFactory = Callable[[RectalFLConfig, dict[str, str]], Callable[..., dict[str, Any]]]
"""``(cfg, roles) -> reference(spec)``: the simulation-only pooled yardstick of each fusion model."""


def new_run_dir(cfg: RectalFLConfig, root: Path | None = None) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    base = Path(root or cfg.runs_root) / f"{stamp}-{cfg.name}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def simulation_sites(cfg: RectalFLConfig) -> tuple[list[dict], set[str]]:
    """The simulated consortium: one virtual node per synthetic site (partition-id = list position)."""
    root = Path(cfg.data_root).resolve()
    cache = Path(cfg.cache_root).resolve()
    sites = [{"name": s.name, "data_dir": str(root / s.name), "cache_dir": str(cache / s.name), "device": None}
             for s in cfg.synth.sites]
    external = {s.name for s in cfg.synth.sites if s.external} | set(cfg.federation.external_sites)
    return sites, external


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "monai", "flwr", "SimpleITK", "numpy", "scikit-learn", "rectalfl"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def prepare_run_dir(cfg: RectalFLConfig, run_dir: Path, *, resume: bool) -> RectalFLConfig:
    """Create the run dir and write the resolved config; on resume, reload and check it."""
    cfg_path = run_dir / "config.yaml"
    if resume:
        if not cfg_path.is_file():
            raise FileNotFoundError(f"cannot resume: {cfg_path} not found (is {run_dir} a run directory?)")
        saved = load_config(cfg_path)
        if saved.digest() != cfg.digest():
            logger.warning("resuming with the run's own saved config (digest %s), not the one given (%s)",
                           saved.digest(), cfg.digest())
        return saved
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} already exists and is not empty; use --resume to continue it")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(cfg.to_yaml())
    return cfg


def run_pipeline(grid: Any, cfg: RectalFLConfig, run_dir: Path, *, engine: str, sim_sites: list[dict] | None,
                 external_sites: set[str], resume: bool = False, expected_sites: int | None = None,
                 reference: ReferenceFactory | None = None) -> pd.DataFrame:
    """Run (or resume) the federated pipeline on ``grid`` and return the signature AUC table.

    ``reference`` (simulation only, from :mod:`simulations.reference`) builds the pooled
    scikit-learn yardstick of the fusion models from the simulated sites' rows; the operator's
    server never has it.
    """
    from server.evaluation import evaluate_signatures
    from server.orchestrator import Orchestrator, initial_record, load_checkpoint
    from server.privacy_ledger import record_privacy
    from server.store import RunStore

    run_dir = Path(run_dir).resolve()
    cfg = prepare_run_dir(cfg, run_dir, resume=resume)
    announce(f"run directory: {run_dir}{' (resumed)' if resume else ''}")
    store = RunStore.open_run_dir(run_dir)
    known = store.runs()
    # A run keeps its id when its directory is moved or renamed.
    run_id = str(known["run_id"].iloc[0]) if resume and len(known) else run_dir.name
    try:
        store.start_run(run_id, cfg.name, cfg.to_yaml(), cfg.digest(), cfg.federation.mode, cfg.federation.strategy,
                        cfg.seed, engine)
        if not resume:
            store.add_artefact(run_id, "config", run_dir / "config.yaml", run_dir)
        orch = Orchestrator(grid, cfg, run_dir, store, run_id, sim_sites=sim_sites, external_sites=external_sites,
                            timeout=cfg.federation.round_timeout_s,
                            expected_nodes=len(sim_sites) if sim_sites else expected_sites)
        orch.discover()
        start, arrays, strat = 0, initial_record(cfg), None
        if resume:
            start = store.last_completed_round(run_id, "train")
            if start > 0:
                arrays, strat = load_checkpoint(orch.checkpoint_path(start))
            store.event(run_id, "resumed", f"resumed after round {start}", round=start)
            logger.info("resuming %s after round %d", run_id, start)
        t0 = time.perf_counter()
        final = orch.train(arrays, start_round=start, strategy_arrays=strat)
        save_final_model(cfg, run_dir, final, store, run_id, seconds=time.perf_counter() - t0)
        record_privacy(cfg, run_dir, store, run_id)  # tables/privacy_ledger.csv, DP block of models/final.json
        orch.signatures(final)
        with store.stage(run_id, "evaluate"):
            table = evaluate_signatures(stats_runner(orch), cfg, orch.roles())
            write_table(table, run_dir / "tables" / "signature_auc.csv", store, run_id, run_dir)
            for row in table.itertuples():
                if pd.notna(row.auc):
                    store.log_metric(run_id, "evaluate", row.site, f"{row.backbone}/auc", float(row.auc),
                                     split=row.split, n=int(row.n_pos + row.n_neg))
        if cfg.fusion.enabled:
            run_fusion_analysis(orch, cfg, run_dir, store, run_id,
                                reference=reference(cfg, orch.roles()) if reference is not None else None)
        store.finish_run(run_id, "completed")
        announce(f"run completed; run directory: {run_dir}")
        return table
    except KeyboardInterrupt as exc:
        mark_interrupted(store, run_id, run_dir, exc)
        raise
    except Exception as exc:
        store.event(run_id, "run_failed", f"{type(exc).__name__}: {exc}", level="error")
        store.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        announce(f"run failed ({type(exc).__name__}: {exc}); the run record keeps what finished; run directory: "
                 f"{run_dir}")
        raise
    finally:
        store.close()


def announce(message: str) -> None:
    """Tell the operator where the run is: through Flower's log when nothing else is set up (under
    ``flwr run`` the ServerApp's only visible output), else through this module's logger."""
    if logging.getLogger().handlers:
        logger.info(message)
    else:
        logging.getLogger("flwr").info("rectalfl: %s", message)


def mark_interrupted(store: Any, run_id: str, run_dir: Path, exc: BaseException) -> None:
    """Record that SIGINT/SIGTERM stopped the run: an ``interrupted`` event naming the stage it stopped
    (whose row holds ``error: "Interrupted: ..."``), and the run's status ``interrupted``.

    Never raises: a failure to record is logged and the interruption goes on.
    """
    name = getattr(exc, "signal_name", "SIGINT")
    try:
        stages = store.stages(run_id)
        stopped = None
        if len(stages):
            hit = stages[stages["detail"].map(lambda d: isinstance(d, dict) and "Interrupt" in str(d.get("error", "")))]
            stopped = str(hit["name"].iloc[-1]) if len(hit) else None
        done = [str(n) for n in stages.loc[stages["status"] == "completed", "name"]] if len(stages) else []
        where = f"during stage {stopped}" if stopped else "between stages"
        store.event(run_id, "interrupted", f"interrupted by {name} {where}; continue with --resume {run_dir}",
                    level="warning", detail={"signal": name, "stage": stopped, "completed_stages": done})
        store.finish_run(run_id, "interrupted", error=f"interrupted by {name} {where}")
    except Exception:  # noqa: BLE001 - never mask the interruption
        logger.exception("could not record the interruption in %s", run_dir)
    announce(f"run interrupted by {name}; the run record keeps what finished; run directory: {run_dir}")


def two_site_notice(orch: Any, queries: list, told: set[tuple[str, ...]]) -> None:
    """Say so (once per pair of sites per run) when a released quantity was summed over only 2 sites.

    Secure aggregation still hides both sites' numbers from the server, but each of the two can
    subtract its own contribution from the total and learn the other's; what protects a site's
    patients then is the per-site floor (a site with 0 < n < k patients of a class contributes nothing).
    """
    for q in queries:
        if not q.ok:
            continue
        parts = tuple(sorted((q.released or {}).get("participants") or q.participants))
        if len(parts) != 2 or parts in told:
            continue
        told.add(parts)
        orch.store.event(orch.run_id, "two_site_aggregate",
                         f"{q.qid} and any other quantity over only {parts[0]} and {parts[1]}: secure aggregation "
                         "hides their numbers from the server, but each of the two learns the other's from the total; "
                         "each site's own floor k applies (a site with fewer than k patients of a class contributes "
                         "nothing). At least 3 sites give each site's numbers cover",
                         level="warning", detail={"sites": list(parts), "query": q.qid})


def stats_runner(orch: Any) -> Any:
    """Site-computed queries over the orchestrator's nodes (``evaluate.stats`` messages), at the
    strictest floor of the run and its sites; every policy refusal is recorded as an event."""
    from shared.stats_driver import run_site_queries

    pairs_told: set[tuple[str, ...]] = set()

    def run(queries: list) -> list:
        run_site_queries(queries, orch.site_stats_transport, run=orch.run_id, k=orch.min_count(), roles=orch.roles())
        for q in queries:
            for site, why in q.refused.items():
                orch.store.event(orch.run_id, "policy_refused", f"{q.qid}: {why.get('reason', '')}", level="warning",
                                 site=site, detail={"query": q.qid, "rule": why.get("rule")})
        two_site_notice(orch, queries, pairs_told)
        return queries

    run.min_count = orch.min_count  # type: ignore[attr-defined]  # the run's k, for protocols built with it
    return run


def fusion_transport(orch: Any) -> Any:
    """Send the fitted fusion models to every site (``evaluate.fusion``): each scores its patients with
    the models it derived itself and keeps the scores; counts come back."""
    from flwr.app import Message, RecordDict

    from shared.fusion import models_to_payload
    from shared.records import pack_json
    from shared.wire import pack_bytes

    def send(models: dict) -> dict[str, dict]:
        arrays, columns = models_to_payload(models)
        msgs = [Message(content=RecordDict({"config": orch._config(**{"fusion-models": pack_json(columns),
                                                                      "fusion-arrays": pack_bytes(arrays)})}),
                        message_type="evaluate.fusion", dst_node_id=n.node_id) for n in orch.nodes]
        return orch.exchange("analysis", msgs)

    return send


def run_fusion_analysis(orch: Any, cfg: RectalFLConfig, run_dir: Path, store: Any, run_id: str, *,
                        reference: Callable[..., dict[str, Any]] | None = None) -> None:
    """Fusion models, tables and curve data (``server.analysis``), then the HTML report."""
    from server.analysis import run_analysis

    roles = orch.roles()
    with store.stage(run_id, "analysis"):
        ref = reference if cfg.fusion.pooled_reference else None
        res = run_analysis(stats_runner(orch), fusion_transport(orch), cfg, roles, run_dir, reference=ref)
        for name in res.tables:
            store.add_artefact(run_id, "table", run_dir / "tables" / f"{name}.csv", run_dir)
        store.add_artefact(run_id, "model", run_dir / "models" / "fusion.npz", run_dir,
                           meta={"metadata": "models/fusion.json"})
        for row in res.tables["table3_performance"].itertuples():
            if pd.notna(row.auc):
                split = {"training": "train", "internal_test": "test"}.get(row.cohort, row.cohort)
                store.log_metric(run_id, "analysis", f"cohort:{row.cohort}", f"{row.model}/auc", float(row.auc),
                                 split=split, n=int(row.n_pos + row.n_neg))
    try:
        from server.report import build_report
    except ImportError:  # pragma: no cover - the report module lands separately
        logger.warning("server.report is not available; tables are in %s/tables", run_dir)
        return
    with store.stage(run_id, "report"):
        path = build_report(run_dir, status="completed")  # the last stage: the run ends right after it
        store.add_artefact(run_id, "report", path, run_dir)
        logger.info("report: %s", path)


def write_table(df: pd.DataFrame, path: Path, store: Any, run_id: str, run_dir: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    store.add_artefact(run_id, "table", path, run_dir)


def save_final_model(cfg: RectalFLConfig, run_dir: Path, arrays: Any, store: Any, run_id: str, *,
                     seconds: float) -> Path:
    import numpy as np

    from shared.models import signature_keys
    from shared.records import record_to_arrays

    mdir = run_dir / "models"
    mdir.mkdir(parents=True, exist_ok=True)
    path = mdir / "final.npz"
    np.savez(path, **record_to_arrays(arrays))
    meta = {
        "network": cfg.train.backbone,
        "backbones": signature_keys(cfg),
        "sequences": cfg.data.sequences,
        "timepoints": cfg.data.timepoints,
        "slice_size": cfg.preprocess.slice_size,
        "input": "largest-tumour axial slice, uint8 0-255 scaled to [0,1], shape (1, S, S)",
        "output": "one logit per backbone; sigmoid = probability of good response (TRG 0-1)",
        "mode": cfg.federation.mode,
        "strategy": cfg.federation.strategy,
        "rounds": cfg.federation.rounds,
        "config_digest": cfg.digest(),
        "training_seconds": round(seconds, 2),
        "library_versions": library_versions(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (mdir / "final.json").write_text(json.dumps(meta, indent=2))
    store.add_artefact(run_id, "model", path, run_dir, meta={"metadata": "models/final.json"})
    return path
