"""``compare.html``: one self-contained page for a backbone comparison (inline CSS, the figure as a data
URI, no external resource), like the run report of :mod:`server.report`.

Inputs, all in the compare directory written by :mod:`simulations.compare`: ``compare.json`` and
``tables/compare_<cohort>.csv`` (required), ``tables/compare_summary.csv`` and
``tables/compare_signatures.csv`` (optional). Output: ``figures/auc_ci.png`` (AUC with its DeLong
95% CI per architecture and cohort) and ``compare.html``. Only aggregate numbers appear here.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

COHORTS = {"internal_test": "Internal test (training sites' test splits)",
           "external": "External validation (sites that never trained)"}
PALETTE = ["#0072B2", "#D55E00"]  # Okabe-Ito, as the run report

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1150px;color:#1b1b1b;
padding:0 1rem}h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0}th,td{border:1px solid #ddd;padding:.25rem .5rem;
text-align:right}th:first-child,td:first-child{text-align:left}thead th{background:#f4f4f4}tr.ref{background:#eef6ff}
.explain{color:#444;font-size:.9rem}.note{font-size:.75rem;color:#666;text-align:left;max-width:22rem}
figure{margin:1rem 0}figure img{max-width:100%}figcaption{font-size:.85rem;color:#444}code{font-size:.85rem}
"""


class CompareReportError(RuntimeError):
    """The compare directory lacks what the page needs; the message names the file."""


def _num(v: Any, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "&ndash;"
    return "&ndash;" if not math.isfinite(f) else f"{f:.{digits}f}"


def _p(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "&ndash;"
    if not math.isfinite(f):
        return "&ndash;"
    return "&lt;0.001" if f < 0.001 else f"{min(f, 1.0):.3g}"


def _int(v: Any) -> str:
    try:
        return f"{int(v):,}"
    except (TypeError, ValueError):
        return "&ndash;"


def _text(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else html.escape(str(v))


def render_figure(tables: dict[str, pd.DataFrame], path: Path) -> Path | None:
    """Forest plot: one row per architecture (and seed), AUC with its DeLong 95% CI, one panel per cohort."""
    shown = {c: t for c, t in tables.items() if len(t)}
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(dict.fromkeys(r for t in shown.values() for r in t.sort_values(["backbone", "seed"])["run"]))
    fig, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 0.45 * len(order) + 1.4), sharey=True,
                             squeeze=False)
    for ax, (colour, (cohort, t)) in zip(axes[0], zip(PALETTE, shown.items(), strict=False), strict=False):
        by = t.set_index("run")
        for y, run in enumerate(order):
            if run not in by.index or not np.isfinite(float(by.loc[run, "auc"])):
                ax.text(0.5, y, "n/a", va="center", ha="center", fontsize=8, color="#888")
                continue
            r = by.loc[run]
            lo, hi = float(r["auc_lo"]), float(r["auc_hi"])
            err = [[max(0.0, r["auc"] - lo) if np.isfinite(lo) else 0.0], [max(0.0, hi - r["auc"]) if np.isfinite(hi)
                                                                           else 0.0]]
            ref = str(r.get("reference", "")) == run
            ax.errorbar(float(r["auc"]), y, xerr=err, fmt="D" if ref else "o", color=colour, capsize=3, ms=5)
        ax.axvline(0.5, color="#999", lw=0.8, ls="--")
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("AUC (DeLong 95% CI)")
        ax.set_title(COHORTS.get(cohort, cohort).split(" (")[0], fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(order)))
    axes[0][0].set_yticklabels(order, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _cohort_table(t: pd.DataFrame) -> str:
    head = ("<tr><th>Architecture</th><th>Seed</th><th>Parameters</th><th>n (good/poor)</th><th>AUC</th>"
            "<th>95% CI</th><th>Accuracy</th><th>Sensitivity</th><th>Specificity</th><th>F1</th>"
            "<th>p vs best (DeLong)</th><th>s / round</th><th>MB / round</th><th>Run (s)</th><th>Note</th></tr>")
    rows = []
    for r in t.itertuples():
        ref = str(r.run) == str(r.reference)
        rows.append(
            f"<tr{' class=ref' if ref else ''}><td>{_text(r.backbone)} <small>({_text(r.family)})</small></td>"
            f"<td>{_text(r.seed)}</td><td>{_int(r.parameters)}</td><td>{_int(r.n_pos)}/{_int(r.n_neg)}</td>"
            f"<td>{_num(r.auc)}</td><td>{_num(r.auc_lo)}&ndash;{_num(r.auc_hi)}</td><td>{_num(r.accuracy)}</td>"
            f"<td>{_num(r.sensitivity)}</td><td>{_num(r.specificity)}</td><td>{_num(r.f1)}</td>"
            f"<td>{'reference' if ref else _p(r.p_vs_best)}</td><td>{_num(r.seconds_per_round, 1)}</td>"
            f"<td>{_num(float(r.bytes_per_round) / 1e6, 2)}</td><td>{_num(r.run_seconds, 0)}</td>"
            f"<td class=note>{_text(r.note)}</td></tr>")
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _plain_table(df: pd.DataFrame, digits: int = 3) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            v = r[c]
            cells.append(f"<td>{_num(v, digits)}</td>" if isinstance(v, float | np.floating) else f"<td>{_text(v)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def build_compare_report(compare_dir: Path | str) -> Path:
    """Render ``figures/auc_ci.png`` and ``compare.html`` in ``compare_dir``; returns the page's path.

    Raises
    ------
    CompareReportError
        When ``compare.json`` or every cohort table is missing.
    """
    compare_dir = Path(compare_dir)
    spec_path = compare_dir / "compare.json"
    if not spec_path.is_file():
        raise CompareReportError(f"{spec_path} not found (written by `rectalfl compare`)")
    spec = json.loads(spec_path.read_text())
    tables = {c: pd.read_csv(compare_dir / "tables" / f"compare_{c}.csv") for c in COHORTS
              if (compare_dir / "tables" / f"compare_{c}.csv").is_file()}
    if not tables:
        raise CompareReportError(f"no tables/compare_<cohort>.csv in {compare_dir} (written by `rectalfl compare`)")
    fig = render_figure(tables, compare_dir / "figures" / "auc_ci.png")
    e = html.escape
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Backbone comparison "
             f"{e(spec.get('compare_id', ''))}</title><style>{_CSS}</style></head><body>",
             f"<h1>Backbone comparison: {e(str(spec.get('base_config', '')))}</h1>",
             f"<p class=explain>{len(spec.get('backbones', []))} architecture(s) &times; {spec.get('seeds', 1)} "
             f"seed(s), each trained by the same federation ({spec.get('rounds')} rounds) on the same sites and "
             f"splits, {spec.get('slice_size')}&times;{spec.get('slice_size')} slices. Compared model: "
             f"<b>{e(str(spec.get('model', 'FDL')))}</b>, the fusion of every deep-learning signature of the "
             "architecture. AUC with DeLong 95% CI, accuracy, sensitivity, specificity and F1 come from each run's "
             "federated evaluation (its <code>tables/table3_performance.csv</code>); the p-value is the paired "
             "DeLong test against the reference (the best internal-test AUC of the same seed), run by the federated "
             "statistics engine over the sites' own scores. Seconds (median) and bytes (mean) per round are from each "
             f"run record (training rounds; bytes down + up, all sites). Made {datetime.now(UTC).isoformat(timespec='seconds')}."
             "</p>"]
    if fig is not None:
        data = base64.b64encode(fig.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='AUC with 95% CI per architecture' src='data:image/png;base64,{data}'>"
                     "<figcaption>AUC with its DeLong 95% CI per architecture (diamond: the reference); dashed: "
                     "chance.</figcaption></figure>")
    for cohort, t in tables.items():
        parts.append(f"<h2>{e(COHORTS[cohort])}</h2>{_cohort_table(t)}")
    summary = compare_dir / "tables" / "compare_summary.csv"
    if summary.is_file():
        parts.append("<h2>Over seeds</h2><p class=explain>Mean and SD of each architecture over the training "
                     "seeds; <code>p_vs_best_max</code>: the largest p-value against the seed's reference.</p>"
                     + _plain_table(pd.read_csv(summary)))
    sig = compare_dir / "tables" / "compare_signatures.csv"
    if sig.is_file():
        s = pd.read_csv(sig)
        s = s[s["site"].astype(str).str.startswith("pooled")]
        if len(s):
            wide = s.pivot_table(index=["architecture", "seed"], columns=["split", "backbone"], values="auc")
            wide.columns = [f"{b} ({'test' if sp == 'test' else 'ext.'})" for sp, b in wide.columns]
            parts.append("<h2>Single-signature AUCs</h2><p class=explain>Each backbone alone (one sequence x "
                         "timepoint), pooled over the training sites' test splits and over the external sites.</p>"
                         + _plain_table(wide.reset_index()))
    runs = spec.get("runs", [])
    if runs:
        parts.append("<h2>Runs</h2><p class=explain>Each run is a complete run directory (run record, models, "
                     "report) inside this comparison.</p>" + _plain_table(pd.DataFrame(runs)[
                         [c for c in ("run", "backbone", "seed_index", "train_seed", "seconds", "reused", "run_dir")
                          if c in pd.DataFrame(runs).columns]], digits=1))
    parts.append("</body></html>")
    page = compare_dir / "compare.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    logger.info("comparison report: %s", page)
    return page
