"""The run's privacy ledger on the operator's side: what each site reported it spent.

Each DP training reply carries the site's epsilon so far and its DP settings (metric keys
``epsilon``, ``dp-delta``, ``dp-noise-multiplier``, ``dp-max-grad-norm``, ``dp-sample-rate``,
``dp-rounds``; see :meth:`client.privacy_ledger.PrivacyLedger.metrics`), which the orchestrator
stores per site, stage and round in the run record (``site_metrics``). At the end of training
:func:`record_privacy` writes ``tables/privacy_ledger.csv`` (one row per site and stage, the latest
report) and adds the DP settings and the architecture change to ``models/final.json``.

The numbers are the sites' own: each site accounts and enforces its budget itself; the server only
records what they report.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from shared.config import RectalFLConfig

logger = logging.getLogger(__name__)

LEDGER_TABLE = "tables/privacy_ledger.csv"
COLUMNS = ("site", "stage", "rounds", "epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate",
           "accountant")
_KEYS = {"epsilon": "epsilon", "dp-delta": "delta", "dp-noise-multiplier": "noise_multiplier",
         "dp-max-grad-norm": "max_grad_norm", "dp-sample-rate": "sample_rate", "dp-rounds": "rounds"}


def ledger_table(store: Any, run_id: str, accountant: str) -> pd.DataFrame:
    """One row per (site, stage) that reported an epsilon: its latest report (columns :data:`COLUMNS`).

    ``rounds`` is the number of rounds the site accounted (its own count, which includes a round a
    resumed run replayed), else the rounds the run record holds for it.
    """
    m = store.metrics(run_id)
    m = m[m["key"].isin(list(_KEYS))]
    rows = []
    for (site, stage), g in m.groupby(["site", "stage"], sort=True):
        if "epsilon" not in set(g["key"]):
            continue
        last = g.groupby("key")["value"].last()  # rows are in logging order: the latest report
        row: dict[str, Any] = {"site": site, "stage": stage}
        for key, col in _KEYS.items():
            row[col] = float(last[key]) if key in last and pd.notna(last[key]) else None
        if row["rounds"] is None:
            row["rounds"] = int(g.loc[g["key"] == "epsilon", "round"].dropna().nunique())
        row["rounds"] = int(row["rounds"])
        row["accountant"] = accountant
        rows.append(row)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def architecture_change(cfg: RectalFLConfig) -> dict[str, Any]:
    """How DP changed the run's network (Opacus ``ModuleValidator.fix``): summary and layers."""
    from shared.models import dp_network_changes

    changes = list(dp_network_changes(cfg.train.backbone, cfg.preprocess.slice_size))
    kinds: dict[str, int] = {}
    for c in changes:
        old, new = c.split(": ", 1)[1].split(" -> ")
        pair = f"{old.split('(')[0]} -> {new.split('(')[0]}"
        kinds[pair] = kinds.get(pair, 0) + 1
    summary = "; ".join(f"{pair} in {n} layer{'s' if n > 1 else ''}" for pair, n in kinds.items())
    return {"tool": "opacus.validators.ModuleValidator.fix", "summary": summary or "no layer changed",
            "layers": changes}


def privacy_metadata(cfg: RectalFLConfig, ledger: pd.DataFrame | None = None) -> dict[str, Any]:
    """The ``privacy`` block of ``models/final.json``: DP settings, the architecture change, each site's epsilon."""
    p = cfg.privacy
    if not p.dp:
        return {"dp": False}
    import importlib.metadata as md

    try:
        version = md.version("opacus")
    except md.PackageNotFoundError:  # pragma: no cover - opacus is a dependency
        version = "unknown"
    out: dict[str, Any] = {
        "dp": True,
        "mechanism": f"DP-SGD with Opacus {version}: Poisson sampling, per-sample clipping, Gaussian noise; "
                     "accounted on each site, per site and stage",
        "max_grad_norm": p.max_grad_norm, "noise_multiplier": p.noise_multiplier,
        "target_epsilon": p.target_epsilon, "delta": p.delta, "accountant": p.accountant,
        "class_weighting": "off under DP (a weight n_neg / n_pos makes each case's gradient depend on the others)",
        "architecture_change": architecture_change(cfg),
    }
    if ledger is not None and len(ledger):
        out["epsilon"] = {f"{r.site}/{r.stage}": r.epsilon for r in ledger.itertuples()}
    return out


def record_privacy(cfg: RectalFLConfig, run_dir: Path, store: Any, run_id: str) -> pd.DataFrame | None:
    """Write ``tables/privacy_ledger.csv`` and the ``privacy`` block of ``models/final.json``.

    Called at the end of training. Without DP (and no site reporting an epsilon) no table is
    written and ``final.json`` records ``"privacy": {"dp": false}``.

    Returns
    -------
    DataFrame or None
        The ledger table (columns :data:`COLUMNS`), None when no site reported an epsilon.
    """
    run_dir = Path(run_dir)
    table = ledger_table(store, run_id, cfg.privacy.accountant)
    out = None
    if len(table) or cfg.privacy.dp:
        path = run_dir / LEDGER_TABLE
        path.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(path, index=False)
        store.add_artefact(run_id, "table", path, run_dir)
        out = table
        for r in table.itertuples():
            logger.info("privacy ledger: %s %s epsilon %.3f at delta %.3g after %d round(s)", r.site, r.stage,
                        r.epsilon if r.epsilon is not None else float("nan"),
                        r.delta if r.delta is not None else float("nan"), r.rounds)
    meta_path = run_dir / "models" / "final.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        meta["privacy"] = privacy_metadata(cfg, table)
        if cfg.privacy.dp:
            meta["architecture_change"] = meta["privacy"]["architecture_change"]["summary"]
        meta_path.write_text(json.dumps(meta, indent=2))
    return out
