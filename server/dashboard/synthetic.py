"""A synthetic run record, written through the real :class:`server.store.RunStore` API.

For the dashboard's tests, its benchmark and screenshots: the record has what a real run writes
(stages, rounds, per-site training metrics with the ClientApp's keys, join/drop/reject events,
liveness, artefacts, ``tables/signature_auc.csv``, ``tables/table3_performance.csv``, a report), with
made-up numbers. It never touches any data: there is none.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import yaml

from server.liveness import record_node_status
from server.store import RunStore

logger = logging.getLogger(__name__)

__all__ = ["write_synthetic_run"]

DEFAULT_BACKBONES = ("pre_t2w", "post_t2w", "pre_dwi", "post_dwi")


def _config(name: str, n_rounds: int, strategy: str, dp: bool, seed: int, external: Sequence[str]) -> str:
    cfg = {
        "name": name,
        "seed": seed,
        "runs_root": "runs",
        "train": {"backbone": "densenet121", "lr": 0.01, "batch_size": 32},
        "federation": {"mode": "federated", "strategy": strategy, "rounds": n_rounds, "min_sites": 2,
                       "external_sites": list(external)},
        "privacy": {"min_cell_count": 5, "dp": dp},
        "fusion": {"enabled": True},
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def _write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_synthetic_run(
    runs_root: Path | str,
    run_id: str,
    *,
    name: str = "synthetic",
    n_rounds: int = 3,
    n_sites: int = 3,
    n_external: int = 1,
    backbones: Sequence[str] = DEFAULT_BACKBONES,
    strategy: str = "fedavg",
    dp: bool = False,
    seed: int = 0,
    finish: bool = True,
    round_delay: float = 0.0,
    on_round: Callable[[int], None] | None = None,
    drop_site_in_round: int | None = 2,
    checkpoints: bool = False,
) -> Path:
    """Write a made-up run to ``runs_root/run_id`` through :class:`~server.store.RunStore`.

    Parameters
    ----------
    runs_root : Path or str
        The runs folder; the run directory ``runs_root/run_id`` must not exist yet.
    run_id : str
    name : str, default 'synthetic'
    n_rounds : int, default 3
        Training rounds.
    n_sites : int, default 3
        Training sites (``site_01`` ...).
    n_external : int, default 1
        External validation sites (``ext_01`` ...), never trained on.
    backbones : sequence of str
        Signature backbones (metric keys ``<backbone>/train-loss``, ``<backbone>/n``, ...).
    strategy : str, default 'fedavg'
    dp : bool, default False
        Log a cumulative ``epsilon`` per site and round.
    seed : int, default 0
    finish : bool, default True
        Run the later stages (signatures, evaluate, analysis, report) and finish the run as
        ``'completed'``; otherwise stop after training with the run still ``'running'``.
    round_delay : float, default 0.0
        Seconds to sleep before each round (to watch a run being written).
    on_round : callable, optional
        Called with the round number after each round is recorded.
    drop_site_in_round : int, optional
        In this round the last training site does not reply (a ``site_dropped`` event) and the
        first site's update is rejected; it rejoins in the next round.
    checkpoints : bool, default False
        Write a (tiny) checkpoint file and its artefact row every round, as the orchestrator does.

    Returns
    -------
    Path
        The run directory.
    """
    if n_rounds < 1 or n_sites < 2:
        raise ValueError(f"need n_rounds >= 1 and n_sites >= 2, got {n_rounds} and {n_sites}")
    rng = np.random.default_rng(seed)
    run_dir = Path(runs_root) / run_id
    if run_dir.exists():
        raise FileExistsError(f"run directory {run_dir} already exists")
    run_dir.mkdir(parents=True)
    train_sites = [f"site_{i:02d}" for i in range(1, n_sites + 1)]
    ext_sites = [f"ext_{i:02d}" for i in range(1, n_external + 1)]
    roles = {**{s: "train" for s in train_sites}, **{s: "external" for s in ext_sites}}
    node_ids = {1000 + i: s for i, s in enumerate(roles)}
    cfg_yaml = _config(name, n_rounds, strategy, dp, seed, ext_sites)
    (run_dir / "config.yaml").write_text(cfg_yaml)
    patients = {s: int(rng.integers(20, 60)) for s in roles}
    with RunStore.open_run_dir(run_dir) as store:
        store.start_run(run_id, name, cfg_yaml, hashlib.sha256(cfg_yaml.encode()).hexdigest()[:16], "federated",
                        strategy, seed, "simulation")
        store.add_artefact(run_id, "config", run_dir / "config.yaml", run_dir)
        with store.stage(run_id, "discover"):
            for s, role in roles.items():
                n = patients[s]
                counts = ({"patients-train": round(n * 0.7), "patients-val": 0, "patients-test": n - round(n * 0.7)}
                          if role == "train" else {"patients-train": 0, "patients-val": 0, "patients-test": n})
                store.event(run_id, "site_joined", f"{s} joined as {role}", site=s, detail=counts)
        nodes = [SimpleNamespace(node_id=i, status="online") for i in node_ids]
        record_node_status(store, run_id, nodes, node_ids, roles=roles)
        eps = {s: 0.0 for s in train_sites}
        model_bytes = 4 * 250_000 * len(backbones)
        with store.stage(run_id, "train"):
            for rnd in range(1, n_rounds + 1):
                if round_delay:
                    time.sleep(round_delay)
                dropped = train_sites[-1] if rnd == drop_site_in_round else None
                rejected = train_sites[0] if rnd == drop_site_in_round else None
                store.start_round(run_id, "train", rnd, n_sent=len(train_sites))
                ok = [s for s in train_sites if s not in (dropped, rejected)]
                losses = []
                for s in train_sites:
                    if s == dropped:
                        continue
                    n_train = round(patients[s] * 0.7)
                    m: dict[str, float] = {"num-examples": float(n_train)}
                    for k, bb in enumerate(backbones):
                        loss = 0.69 * np.exp(-rnd / (8 + 2 * k)) + 0.05 * rng.random()
                        m[f"{bb}/train-loss"] = float(loss)
                        m[f"{bb}/n"] = float(n_train)
                        m[f"{bb}/seconds"] = float(1 + rng.random())
                    m["fit-seconds"] = float(sum(v for key, v in m.items() if key.endswith("/seconds")))
                    m["train-loss"] = float(np.mean([m[f"{bb}/train-loss"] for bb in backbones]))
                    if dp:
                        eps[s] += 0.05 + 0.01 * rng.random()
                        m["epsilon"] = eps[s]
                    if s == rejected:
                        continue
                    store.log_metrics(run_id, "train", s, m, round=rnd, split="train")
                    losses.append(m["train-loss"])
                if dropped:
                    store.event(run_id, "site_dropped", f"{dropped} did not reply within 3600 s", level="warning",
                                site=dropped, round=rnd, detail={"stage": "train"})
                if rejected:
                    store.event(run_id, "update_rejected", f"{rejected}: update norm 41.2 is 12.3x the median of "
                                "the other sites (3.35); federation.max_update_norm_ratio is 10; not averaged in",
                                level="warning", site=rejected, round=rnd)
                # liveness is polled every round (the orchestrator's call); a dropped site is not listed
                record_node_status(store, run_id, [n for n in nodes if node_ids[n.node_id] != dropped], node_ids,
                                   roles=roles)
                if checkpoints:
                    ckpt = run_dir / "checkpoints" / f"round_{rnd:04d}.npz"
                    ckpt.parent.mkdir(exist_ok=True)
                    ckpt.write_bytes(b"synthetic checkpoint %d" % rnd)
                    store.add_artefact(run_id, "checkpoint", ckpt, run_dir, meta={"round": rnd})
                store.finish_round(run_id, "train", rnd, n_replied=len(ok), n_failed=len(train_sites) - len(ok),
                                   train_loss=float(np.mean(losses)), bytes_down=model_bytes * len(train_sites),
                                   bytes_up=model_bytes * len(ok), seconds=float(5 + rng.random()))
                if on_round is not None:
                    on_round(rnd)
        if not finish:
            return run_dir
        (run_dir / "models").mkdir(exist_ok=True)
        (run_dir / "models" / "final.npz").write_bytes(b"synthetic weights" * 64)
        store.add_artefact(run_id, "model", run_dir / "models" / "final.npz", run_dir)
        with store.stage(run_id, "signatures"):
            pass
        sig_rows: list[dict[str, object]] = []
        with store.stage(run_id, "evaluate"):
            for bb in backbones:
                for site, split in [*((s, "test") for s in train_sites), *((s, "external") for s in ext_sites),
                                    ("pooled (training sites)", "test")]:
                    auc = float(0.6 + 0.3 * rng.random())
                    sig_rows.append({"backbone": bb, "site": site, "split": split, "n_pos": 8, "n_neg": 12,
                                     "auc": round(auc, 4), "lo": round(auc - 0.1, 4), "hi": round(min(1, auc + 0.1), 4),
                                     "bound": 0.001, "note": ""})
                    store.log_metric(run_id, "evaluate", site, f"{bb}/auc", auc, split=split, n=20)
            _write_csv(run_dir / "tables" / "signature_auc.csv", sig_rows)
            store.add_artefact(run_id, "table", run_dir / "tables" / "signature_auc.csv", run_dir)
        t3: list[dict[str, object]] = []
        with store.stage(run_id, "analysis"):
            for cohort in ("training", "internal_test", "external"):
                for model, base in (("CR", 0.70), ("FDL", 0.80), ("CRD", 0.82)):
                    auc = float(base + 0.08 * rng.random())
                    t3.append({"model": model, "cohort": cohort, "n_pos": 20, "n_neg": 30, "accuracy": 0.75,
                               "auc": round(auc, 4), "auc_lo": round(auc - 0.08, 4), "auc_hi": round(min(1, auc + 0.08), 4),
                               "sensitivity": 0.7, "specificity": 0.8, "f1": 0.7, "threshold": 0.5, "note": ""})
                    store.log_metric(run_id, "analysis", f"cohort:{cohort}", f"{model}/auc", auc,
                                     split={"training": "train", "internal_test": "test"}.get(cohort, cohort), n=50)
            _write_csv(run_dir / "tables" / "table3_performance.csv", t3)
            store.add_artefact(run_id, "table", run_dir / "tables" / "table3_performance.csv", run_dir)
        with store.stage(run_id, "report"):
            stamp = (datetime.now(UTC) + timedelta(seconds=0)).isoformat(timespec="seconds")
            (run_dir / "report.html").write_text(
                f"<!doctype html><html><head><meta charset=utf-8><title>{name} report</title></head>"
                f"<body><h1>Report of {name}</h1><p>synthetic run written {stamp}</p></body></html>")
            store.add_artefact(run_id, "report", run_dir / "report.html", run_dir)
        store.finish_run(run_id, "completed")
    logger.debug("synthetic run %s written to %s", run_id, run_dir)
    return run_dir
