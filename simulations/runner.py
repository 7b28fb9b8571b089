"""``rectalfl simulate``: a whole consortium on one machine (simulation only: it runs both sides).

1. creates (or reuses) the synthetic cohort and preprocesses every site into its own cache, as
   each hospital would on its own box;
2. ``federation.mode: federated`` runs a real Flower federation on the simulation engine: one
   virtual SuperNode per site running ``client.client_app:app`` and the pipeline's ServerApp;
   ``pooled`` (all training sites' cases in one place; a simulation-only reference) and ``local``
   (each site alone) run the same training and evaluation code in-process, so the
   federated-vs-pooled-vs-local comparison is one config switch.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shared.config import RectalFLConfig

logger = logging.getLogger(__name__)


def prepare_sites(cfg: RectalFLConfig, *, workers: int | None = None, progress: Any = None) -> list[dict]:
    """Generate/reuse the cohort and preprocess each site (resumable; cheap when already done)."""
    from client.preprocess import preprocess_site
    from server.pipeline import simulation_sites
    from simulations.synth import generate_cohort

    generate_cohort(cfg.synth, Path(cfg.data_root), seed=cfg.seed, workers=workers or cfg.preprocess.workers,
                    progress=progress)
    sites, _ = simulation_sites(cfg)
    for s in sites:
        preprocess_site(Path(s["data_dir"]), Path(s["cache_dir"]), cfg, workers=workers, progress=progress)
    return sites


def run_simulation(cfg: RectalFLConfig, *, run_dir: Path | None = None, resume: bool = False,
                   console: Any = None, workers: int | None = None, prepare: bool = True) -> Path:
    """Run the configured mode on the simulated consortium; returns the run directory."""
    from server.pipeline import new_run_dir, simulation_sites

    if resume and run_dir is None:
        raise ValueError("resume needs the run directory to continue")
    if resume:
        from shared.config import load_config

        cfg = load_config(Path(run_dir) / "config.yaml")  # type: ignore[arg-type]
    if prepare:
        prepare_sites(cfg, workers=workers)
    run_dir = (Path(run_dir) if run_dir else new_run_dir(cfg)).resolve()
    sites, external = simulation_sites(cfg)
    from simulations.sites import prepare_site_policies

    prepare_site_policies(cfg, sites, external)  # each simulated hospital's own policy, key and roster
    t0 = time.perf_counter()
    if cfg.federation.mode == "federated":
        _run_flower_simulation(cfg, run_dir, sites, external, resume=resume)
    else:
        run_baseline(cfg, run_dir, sites, external)
    seconds = time.perf_counter() - t0
    logger.info("%s run finished in %.1f s: %s", cfg.federation.mode, seconds, run_dir)
    if console is not None:
        from server.summary import print_summary

        print_summary(run_dir, console, seconds)
    return run_dir


def _run_flower_simulation(cfg: RectalFLConfig, run_dir: Path, sites: list[dict], external: set[str], *,
                           resume: bool) -> None:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation as flwr_run_simulation

    from client.client_app import app as client_app
    from server.pipeline import run_pipeline
    from simulations.reference import reference_factory

    failure: dict[str, BaseException] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            run_pipeline(grid, cfg, run_dir, engine="simulation", sim_sites=sites, external_sites=external,
                         resume=resume, reference=reference_factory(sites))
        except BaseException as exc:  # surfaced after the simulation engine shuts down
            failure["error"] = exc
            raise

    n_cpus = max(1, os.cpu_count() or 1)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": n_cpus, "include_dashboard": False, "logging_level": logging.ERROR,
                      "log_to_driver": False},
    }
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    flwr_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(sites),
                        backend_config=backend_config)
    if "error" in failure:
        raise failure["error"]
    if not (run_dir / "run.db").is_file():
        raise RuntimeError(f"the simulation ended without writing {run_dir / 'run.db'}; see the log above")


# --------------------------------------------------------------------------- in-process baselines


def run_baseline(cfg: RectalFLConfig, run_dir: Path, sites: list[dict], external: set[str]) -> pd.DataFrame:
    """``pooled`` or ``local``: same training and evaluation code, no federation."""
    from client.algorithm import SiteAlgorithm, baseline_privacy
    from client.train import SliceSet, train_backbone
    from server.evaluation import evaluate_signatures
    from server.pipeline import prepare_run_dir, save_final_model, write_table
    from server.privacy_ledger import record_privacy
    from server.store import RunStore
    from shared.models import initial_states, models_from_states, stable_seed, training_seed
    from shared.queries import local_transport
    from shared.records import states_to_record

    cfg = prepare_run_dir(cfg, run_dir, resume=False)
    run_id = run_dir.name
    algos = {s["name"]: SiteAlgorithm(s["name"], Path(s["data_dir"]), Path(s["cache_dir"]), cfg) for s in sites}
    train_sites = [n for n in algos if n not in external]
    epochs = cfg.federation.rounds * cfg.train.local_epochs
    roles = {n: ("external" if n in external else "train") for n in algos}
    tables = []
    with RunStore.open_run_dir(run_dir) as store:
        store.start_run(run_id, cfg.name, cfg.to_yaml(), cfg.digest(), cfg.federation.mode, "none", cfg.seed,
                        "simulation")
        groups = {"pooled": train_sites} if cfg.federation.mode == "pooled" else {f"local-{n}": [n] for n in train_sites}
        for model_name, members in groups.items():
            with store.stage(run_id, f"train:{model_name}"):
                states = initial_states(cfg)
                models = models_from_states(cfg, states)
                privacy = baseline_privacy(cfg, [algos[m] for m in members], model_name)  # DP: None when off
                for key in algos[members[0]].keys:
                    parts = [algos[m].data[key].subset(["train"]) for m in members]
                    data = SliceSet(key, np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                                    sum((p.patient_ids for p in parts), []), np.concatenate([p.split for p in parts]))
                    stats = train_backbone(models[key], data, cfg.train, epochs=epochs,
                                           seed=stable_seed(training_seed(cfg), model_name, key),
                                           dp=privacy.dp(key, len(data)) if privacy else None)
                    store.log_metrics(run_id, f"train:{model_name}", "+".join(members),
                                      {f"{key}/train-loss": stats.loss_last_epoch, f"{key}/n": stats.n_examples})
                if privacy is not None:  # DP: the baseline's epsilon, in the run record like a site's
                    store.log_metrics(run_id, f"train:{model_name}", "+".join(members), privacy.finish())
                final = {k: OrderedDict(m.state_dict()) for k, m in models.items()}
            if cfg.federation.mode == "pooled":
                save_final_model(cfg, run_dir, states_to_record(final), store, run_id, seconds=0.0)
            with store.stage(run_id, f"signatures:{model_name}"):
                tables_by_site = {name: algo.signatures(final, external=name in external)
                                  for name, algo in algos.items()}
            # The same federated-statistics protocol as the federation, with in-process sites.
            t = evaluate_signatures(local_transport(tables_by_site, cfg.privacy.min_cell_count), cfg, roles)
            t.insert(0, "model", model_name)
            tables.append(t)
        table = pd.concat(tables, ignore_index=True)
        write_table(table, run_dir / "tables" / "signature_auc.csv", store, run_id, run_dir)
        record_privacy(cfg, run_dir, store, run_id)  # DP: tables/privacy_ledger.csv
        store.finish_run(run_id, "completed")
    return table
