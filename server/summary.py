"""The end-of-run summary the operator sees on the terminal (read from the run directory's tables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd


def print_summary(run_dir: Path, console: Any, seconds: float | None = None) -> None:
    """Per-backbone AUC on each site's test split and on the external sites, as a rich table."""
    from rich.table import Table

    path = run_dir / "tables" / "signature_auc.csv"
    if not path.is_file():
        console.print(f"[yellow]no signature table in {run_dir}[/]")
        return
    df = pd.read_csv(path)
    df = df[df["split"].isin(["test", "external"])]
    if "model" not in df:
        df.insert(0, "model", "federated")
    for model, g in df.groupby("model", sort=False):
        piv = g.pivot_table(index="backbone", columns="site", values="auc", aggfunc="first", sort=False,
                             dropna=False)
        title = f"AUC of each signature ({model}) - test split per site, external site(s), pooled"
        table = Table(title=title)
        table.add_column("backbone")
        for col in piv.columns:
            table.add_column(str(col), justify="right")
        for backbone, row in piv.iterrows():
            table.add_row(str(backbone), *("-" if pd.isna(v) else f"{v:.3f}" for v in row.values))
        console.print(table)
    perf = run_dir / "tables" / "table3_performance.csv"
    if perf.is_file():
        p = pd.read_csv(perf)
        table = Table(title="Fusion models - AUC [95% CI] per cohort (Table 3 of the report)")
        cohorts = list(dict.fromkeys(p["cohort"]))
        table.add_column("model")
        for c in cohorts:
            table.add_column(c, justify="right")
        for model, g in p.groupby("model", sort=False):
            g = g.set_index("cohort")
            table.add_row(model, *("-" if pd.isna(g.loc[c, "auc"]) else
                                   f"{g.loc[c, 'auc']:.3f} [{g.loc[c, 'auc_lo']:.2f}-{g.loc[c, 'auc_hi']:.2f}]"
                                   for c in cohorts))
        console.print(table)
    privacy_line(run_dir, console)
    if (run_dir / "report.html").is_file():
        console.print(f"report: {run_dir / 'report.html'}")
    if seconds is not None:
        console.print(f"run directory: {run_dir}  ({seconds:.0f} s)")
    else:
        console.print(f"run directory: {run_dir}")


def privacy_line(run_dir: Path, console: Any) -> None:
    """With differential privacy: the DP-SGD settings, the architecture change and the largest epsilon a site reported."""
    import json

    try:
        meta = json.loads((run_dir / "models" / "final.json").read_text()).get("privacy") or {}
    except (OSError, ValueError):
        meta = {}
    ledger = run_dir / "tables" / "privacy_ledger.csv"
    if not meta.get("dp") and not ledger.is_file():
        return
    eps = ""
    if ledger.is_file():
        try:
            t = pd.read_csv(ledger)
            if len(t) and t["epsilon"].notna().any():
                worst = t.loc[t["epsilon"].idxmax()]
                eps = f"; largest epsilon {worst['epsilon']:.2f} ({worst['site']}, delta {worst['delta']:.2g})"
        except (pd.errors.EmptyDataError, KeyError, ValueError):
            pass
    arch = (meta.get("architecture_change") or {}).get("summary")
    if arch is None:  # a baseline without models/final.json: the change follows from the config
        try:
            from server.privacy_ledger import architecture_change
            from shared.config import load_config

            arch = architecture_change(load_config(run_dir / "config.yaml"))["summary"]
        except (OSError, ValueError):
            arch = "see docs/differential_privacy.md"
    console.print(f"differential privacy: DP-SGD on every site (Opacus); network changed for DP: {arch} "
                  f"(Opacus ModuleValidator.fix){eps}; ledger: {ledger}")
