"""The run report: figures (PNG), tables (CSV, already written by :mod:`server.analysis`) and one
self-contained ``report.html`` (figures embedded as data URIs, inline CSS, opens offline).

``rectalfl report RUN_DIR`` calls :func:`build_report`; a finished run calls it too. Inputs, all in
the run directory: ``tables/*.csv`` and ``report_data/curves.json`` (from the analysis stage),
``config.yaml``, ``models/final.json`` and ``run.db`` (optional). Only aggregate numbers are ever
here: every figure is drawn from pooled histograms and sums, never from a patient row.
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

COHORT_LABELS = {"training": "Training cohort", "internal_test": "Internal test", "external": "External validation"}
MAIN_MODELS = ("FDL", "CR", "CRD")
# Okabe-Ito: distinguishable with colour-blindness
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
REQUIRED = "tables/table3_performance.csv"


class ReportError(RuntimeError):
    """The run directory lacks what the report needs; the message says which file and what makes it."""


# --------------------------------------------------------------------------- inputs
def _read(run_dir: Path, rel: str) -> pd.DataFrame | None:
    p = run_dir / rel
    return pd.read_csv(p) if p.is_file() else None


def _curves(run_dir: Path) -> dict[str, list]:
    p = run_dir / "report_data" / "curves.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def _label(cohort: str) -> str:
    return COHORT_LABELS.get(cohort, cohort)


def _shown(models: list[str]) -> list[str]:
    """Models drawn in the figures: FDL, CR, CRD when present (the variants stay in the tables)."""
    main = [m for m in MAIN_MODELS if m in models]
    return main or models[:4]


# --------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.spines.top": False,
                         "axes.spines.right": False, "figure.dpi": 150})
    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    _plt().close(fig)
    return path


def _colour(models: list[str], m: str) -> str:
    return PALETTE[models.index(m) % len(PALETTE)] if m in models else "#666666"


def render_figures(run_dir: Path) -> list[Path]:
    """Draw every figure the inputs allow into ``run_dir/figures``; returns the paths written."""
    run_dir = Path(run_dir)
    plt = _plt()
    out: list[Path] = []
    fig_dir = run_dir / "figures"
    curves = _curves(run_dir)
    perf = _read(run_dir, "tables/table3_performance.csv")
    models = list(dict.fromkeys(perf["model"])) if perf is not None else []
    shown = _shown(models)
    cohorts = list(dict.fromkeys(c["cohort"] for c in curves.get("roc", [])))

    for cohort in cohorts:
        fig, ax = plt.subplots(figsize=(4.6, 4.4))
        for c in curves["roc"]:
            if c["cohort"] != cohort or c["model"] not in shown:
                continue
            col = _colour(shown, c["model"])
            ax.step(c["fpr"], c["tpr"], where="post", color=col, lw=1.8,
                    label=f"{c['model']} (AUC {c['auc']:.3f} [{c['auc_lo']:.3f}-{c['auc_hi']:.3f}])")
            ax.fill_between(c["fpr"], c["tpr_lo"], c["tpr_hi"], step="post", color=col, alpha=0.15, lw=0)
        ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1)
        ax.set(xlabel="1 - specificity", ylabel="Sensitivity", title=f"ROC, {_label(cohort)}", xlim=(0, 1),
               ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=8, frameon=False)
        out.append(_save(fig, fig_dir / f"roc_{cohort}.png"))

    cal = _read(run_dir, "tables/calibration.csv")
    for cohort in dict.fromkeys(c["cohort"] for c in curves.get("calibration", [])):
        fig, ax = plt.subplots(figsize=(4.6, 4.4))
        for c in curves["calibration"]:
            if c["cohort"] != cohort or c["model"] not in shown:
                continue
            lab = c["model"]
            if cal is not None:
                r = cal[(cal["model"] == c["model"]) & (cal["cohort"] == cohort)]
                if len(r) and pd.notna(r["brier"].iloc[0]):
                    lab += f" (Brier {r['brier'].iloc[0]:.3f}, ECE {r['ece'].iloc[0]:.3f})"
            n = np.asarray(c["n"], dtype=float)
            col = _colour(shown, c["model"])
            ax.plot(c["mean_predicted"], c["observed"], "-", color=col, lw=1.2)
            ax.scatter(c["mean_predicted"], c["observed"], s=12 + 4 * n, color=col, alpha=0.8, label=lab)
        ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="ideal")
        ax.set(xlabel="Mean predicted probability", ylabel="Observed rate of good response",
               title=f"Calibration, {_label(cohort)}", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=7, frameon=False)
        out.append(_save(fig, fig_dir / f"calibration_{cohort}.png"))

    for d in curves.get("decision", []):
        fig, ax = plt.subplots(figsize=(4.6, 4.0))
        t = np.asarray(d["thresholds"])
        top = 0.05
        for m, nb in d["models"].items():
            if m in shown:
                ax.plot(t, nb, color=_colour(shown, m), lw=1.8, label=m)
                top = max(top, float(np.nanmax(nb)))
        if d.get("treat_all"):
            ax.plot(t, d["treat_all"], color="#777777", lw=1, label="treat all")
            top = max(top, float(np.nanmax(d["treat_all"])))
        ax.axhline(0, color="#000000", lw=1, label="treat none")
        ax.set(xlabel="Threshold probability", ylabel="Net benefit", title=f"Decision curve, {_label(d['cohort'])}",
               ylim=(-0.05, top + 0.05), xlim=(0, 1))
        ax.legend(fontsize=8, frameon=False)
        out.append(_save(fig, fig_dir / f"decision_{d['cohort']}.png"))

    dists = curves.get("distributions", [])
    for cohort in dict.fromkeys(d["cohort"] for d in dists):
        items = [d for d in dists if d["cohort"] == cohort]
        ncol = min(3, len(items))
        nrow = math.ceil(len(items) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), squeeze=False)
        for ax, d in zip(axes.flat, items, strict=False):
            e = np.asarray(d["edges"])
            for key, col, lab in (("good", PALETTE[2], "good response"), ("poor", PALETTE[1], "poor response")):
                cnt = np.asarray(d[key], dtype=float)
                dens = cnt / max(cnt.sum(), 1) / np.diff(e)
                ax.stairs(dens, e, color=col, lw=1.6, label=lab)
            ax.set_title(d["signature"], fontsize=9)
            ax.set_xlim(e[0], e[-1])
        for ax in list(axes.flat)[len(items):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7, frameon=False)
        fig.suptitle(f"Signature distributions by response, {_label(cohort)}", fontsize=10)
        out.append(_save(fig, fig_dir / f"signatures_{cohort}.png"))

    shap = _read(run_dir, "tables/shap_importance.csv")
    if shap is not None and len(shap):
        for m in _shown(list(dict.fromkeys(shap["model"]))):
            s = shap[shap["model"] == m].dropna(subset=["mean_abs_shap"]).sort_values("mean_abs_shap")
            if not len(s):
                continue
            fig, ax = plt.subplots(figsize=(4.6, max(2.2, 0.6 + 0.28 * len(s))))
            ax.barh(s["feature"], s["mean_abs_shap"], color=PALETTE[0])
            ax.set(xlabel="mean |SHAP| (probability of good response)", title=f"{m}: global importance")
            out.append(_save(fig, fig_dir / f"shap_{m}.png"))

    ps = _read(run_dir, "tables/per_site.csv")
    if ps is not None and len(ps) and ps["auc"].notna().any():
        sites = list(dict.fromkeys(ps["site"]))
        ms = _shown(list(dict.fromkeys(ps["model"])))
        fig, ax = plt.subplots(figsize=(5.2, 0.8 + 0.55 * len(sites)))
        for j, m in enumerate(ms):
            r = ps[ps["model"] == m].set_index("site").reindex(sites)
            y = np.arange(len(sites)) + (j - (len(ms) - 1) / 2) * 0.18
            ok = r["auc"].notna().to_numpy()
            ax.errorbar(r["auc"][ok], y[ok], xerr=[(r["auc"] - r["auc_lo"])[ok], (r["auc_hi"] - r["auc"])[ok]],
                        fmt="o", color=_colour(ms, m), ms=4, capsize=2, label=m)
        ax.axvline(0.5, color="#999999", ls="--", lw=1)
        roles = ps.drop_duplicates("site").set_index("site")["role"]
        ax.set_yticks(np.arange(len(sites)), [f"{s} ({roles.get(s, '')})" for s in sites])
        ax.set(xlabel="AUC (95% CI) on the site's test patients", xlim=(0, 1), title="Per-site performance")
        ax.legend(fontsize=8, frameon=False)
        out.append(_save(fig, fig_dir / "per_site_auc.png"))
    return out


# --------------------------------------------------------------------------- HTML
def _fmt(v: Any, kind: str = "num") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or (isinstance(v, str) and v == ""):
        return "&ndash;"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else ""
    if kind == "p":
        v = float(v)
        return "&lt;0.001" if v < 0.001 else f"{v:.3g}"
    if kind == "int":
        return str(int(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.3f}"
    return html.escape(str(v))


def _table(df: pd.DataFrame | None, columns: dict[str, str], kinds: dict[str, str] | None = None,
           highlight: str | None = None) -> str:
    if df is None or not len(df):
        return '<p class="na">not available</p>'
    kinds = kinds or {}
    head = "".join(f"<th>{html.escape(h)}</th>" for h in columns.values())
    rows = []
    for _, r in df.iterrows():
        cls = ' class="hl"' if highlight and bool(r.get(highlight, False)) else ""
        cells = "".join(f"<td>{_fmt(r.get(c), kinds.get(c, 'num'))}</td>" for c in columns)
        rows.append(f"<tr{cls}>{cells}</tr>")
    return f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _delong_matrices(dl: pd.DataFrame | None) -> str:
    if dl is None or not len(dl):
        return '<p class="na">not available: fewer than two fusion models were fitted</p>'
    parts = []
    for cohort, d in dl.groupby("cohort", sort=False):
        models = list(dict.fromkeys([*d["model_a"], *d["model_b"]]))
        m = pd.DataFrame("", index=models, columns=models)
        for r in d.itertuples():
            m.loc[r.model_a, r.model_b] = m.loc[r.model_b, r.model_a] = _fmt(r.p, "p")
        head = "".join(f"<th>{html.escape(c)}</th>" for c in models)
        body = "".join(f"<tr><th>{html.escape(i)}</th>" + "".join(f"<td>{m.loc[i, c] or '&middot;'}</td>"
                                                                    for c in models) + "</tr>" for i in models)
        parts.append(f"<h4>{_label(str(cohort))}</h4><table class=\"matrix\"><thead><tr><th></th>{head}</tr></thead>"
                     f"<tbody>{body}</tbody></table>")
    return "".join(parts)


def _meta(run_dir: Path) -> dict[str, Any]:
    import yaml

    meta: dict[str, Any] = {"run_dir": str(run_dir)}
    if (run_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        fed = cfg.get("federation", {})
        meta.update(name=cfg.get("name"), mode=fed.get("mode"), strategy=fed.get("strategy"), rounds=fed.get("rounds"),
                    backbone=cfg.get("train", {}).get("backbone"), min_cell_count=cfg.get("privacy", {}).get(
                        "min_cell_count"))
    if (run_dir / "models" / "final.json").is_file():
        fj = json.loads((run_dir / "models" / "final.json").read_text(encoding="utf-8"))
        meta.update(config_digest=fj.get("config_digest"), versions=fj.get("library_versions", {}),
                    trained_at=fj.get("created_at"))
    if (run_dir / "run.db").is_file():
        try:
            from server.store import RunStore

            with RunStore.open_run_dir(run_dir, readonly=True) as store:
                runs = store.runs()
                if len(runs):
                    rid = str(runs["run_id"].iloc[0])
                    meta.update(run_id=rid, status=runs["status"].iloc[0], started_at=runs["created_at"].iloc[0])
                    ev = store.events(rid)
                    joined = ev[ev["kind"] == "site_joined"]
                    meta["sites"] = [f"{r.site}: {r.message.split(' as ')[-1]}" for r in joined.itertuples()]
        except Exception as exc:  # noqa: BLE001 - the report still renders without the run record
            logger.warning("run record not readable (%s); header without it", exc)
    return meta


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;color:#222;
line-height:1.45;padding:0 1rem}h1{margin-bottom:.2rem}h2{border-bottom:2px solid #0072B2;padding-bottom:.2rem;
margin-top:2.2rem}table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0 1rem}th,td{border:1px solid #ddd;
padding:.25rem .5rem;text-align:right}th{background:#f3f6f9}td:first-child,th:first-child{text-align:left}
tr.hl td{background:#fff4d6;font-weight:600}.na{color:#888;font-style:italic}.explain{color:#444;margin:.2rem 0}
figure{display:inline-block;margin:.5rem;vertical-align:top}figure img{max-width:480px;border:1px solid #eee}
figcaption{font-size:.8rem;color:#555;max-width:480px}.meta td{text-align:left}.matrix td{text-align:center}
.small{font-size:.8rem;color:#555}td:last-child{text-align:left;font-size:.75rem;color:#666;max-width:22rem}
"""


def build_report(run_dir: Path) -> Path:
    """Render the figures and ``report.html``; returns the HTML path.

    Raises
    ------
    ReportError
        When ``run_dir`` is not a run directory or its analysis tables are missing.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such directory (give the run directory printed at the end of a run)")
    if not (run_dir / REQUIRED).is_file():
        hint = ("it is not a run directory" if not (run_dir / "config.yaml").is_file() else
                "the analysis stage did not finish; continue the run with `rectalfl simulate --resume "
                f"{run_dir}` (or `rectalfl run --resume` on a deployment)")
        raise ReportError(f"{run_dir / REQUIRED} not found: {hint}")
    figs = {p.stem: p for p in render_figures(run_dir)}
    meta = _meta(run_dir)
    t = {n: _read(run_dir, f"tables/{n}.csv") for n in (
        "table1_baseline", "table2_odds_ratios", "table3_performance", "delong", "calibration", "per_site",
        "fusion_models", "shap_importance", "suppressions", "signature_auc")}
    perf = t["table3_performance"]
    cohorts = list(dict.fromkeys(perf["cohort"]))

    def fig_block(prefix: str, caption: str) -> str:
        blocks = [_img(p, f"{caption}: {_label(k[len(prefix) + 1:])}") for k, p in figs.items()
                  if k.startswith(prefix + "_")]
        return "".join(blocks) or '<p class="na">not available</p>'

    sections = []
    rows = [("Run", meta.get("name")), ("Run id", meta.get("run_id")), ("Status", meta.get("status")),
            ("Started", meta.get("started_at")), ("Config digest", meta.get("config_digest")),
            ("Training", f"{meta.get('mode')} / {meta.get('strategy')} / {meta.get('rounds')} rounds, "
                         f"{meta.get('backbone')}"),
            ("Sites", ", ".join(meta.get("sites", [])) or None),
            ("Disclosure control", f"no number describes fewer than {meta.get('min_cell_count')} patients"),
            ("Libraries", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()) or None)]
    head = "".join(f"<tr><th>{k}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)
    sections.append(f'<table class="meta">{head}</table>')
    sections.append(
        "<h2>How to read this report</h2><p>Every number here was computed from summaries the hospitals "
        "sent (counts, sums, histogram cells on a shared grid, model gradients), never from patient rows. "
        "<b>Training cohort</b>: the training sites' training patients, the only patients any model or "
        "hyper-parameter saw. <b>Internal test</b>: the same sites' held-out patients. <b>External "
        "validation</b>: sites that never trained. FDL fuses the six deep-learning signatures, CR the "
        "clinical-radiological predictors selected below, CRD both; each is an RBF-kernel SVM trained "
        "federatedly. Where disclosure control withheld a number it shows as &ndash; and the last section "
        "says why.</p>")
    sections.append("<h2>Table 1. Baseline characteristics by response</h2><p class=\"explain\">Per cohort: "
                    "good responders (TRG 0-1) vs poor responders, mean &plusmn; SD, median [IQR] or n (%), with "
                    "the test used.</p>")
    t1 = t["table1_baseline"]
    if t1 is not None and len(t1):
        for c, d in t1.groupby("cohort", sort=False):
            sections.append(f"<h4>{_label(str(c))}</h4>" + _table(d, {
                "variable": "Variable", "level": "Level", "good_response": "Good response",
                "poor_response": "Poor response", "p_value": "p", "test": "Test"}, {"p_value": "p"}))
    else:
        sections.append('<p class="na">not available</p>')
    sections.append("<h2>Table 2. Clinical-radiological predictors (training cohort)</h2><p class=\"explain\">"
                    "Univariate logistic regression of good response on each candidate; those with p &lt; 0.10 "
                    "enter one multivariable model; highlighted rows (p &lt; 0.05 there) are the independent "
                    "predictors used by CR and CRD.</p>")
    sections.append(_table(t["table2_odds_ratios"], {
        "predictor": "Predictor", "uni_or": "OR", "uni_lo": "95% CI low", "uni_hi": "95% CI high", "uni_p": "p",
        "multi_or": "adjusted OR", "multi_lo": "95% CI low", "multi_hi": "95% CI high", "multi_p": "p (adj.)",
        "selected": "selected"}, {"uni_p": "p", "multi_p": "p"}, highlight="selected"))
    sections.append("<h2>Table 3. Model performance per cohort</h2><p class=\"explain\">AUC with DeLong 95% CI; "
                    "accuracy, sensitivity, specificity and F1 at the probability threshold shown.</p>")
    for c in cohorts:
        sections.append(f"<h4>{_label(c)}</h4>" + _table(perf[perf["cohort"] == c], {
            "model": "Model", "n_pos": "good", "n_neg": "poor", "auc": "AUC", "auc_lo": "95% CI low",
            "auc_hi": "95% CI high", "accuracy": "Accuracy", "sensitivity": "Sensitivity",
            "specificity": "Specificity", "f1": "F1", "threshold": "Threshold", "note": "Note"},
            {"n_pos": "int", "n_neg": "int"}))
    sections.append("<h2>Figures</h2>" + fig_block("roc", "ROC curves with pointwise 95% (Wilson) bands") +
                    fig_block("calibration", "Calibration (marker size ~ patients per bin)") +
                    fig_block("decision", "Decision curves") +
                    fig_block("signatures", "Signature distributions by response (from pooled histograms)"))
    sections.append("<h2>DeLong tests between models</h2><p class=\"explain\">Two-sided p-values of the paired "
                    "DeLong test for equal AUCs, per cohort.</p>" + _delong_matrices(t["delong"]))
    sections.append("<h2>Calibration</h2><p class=\"explain\">Brier score, expected calibration error (10 bins), "
                    "calibration slope and intercept (logistic recalibration; ideal 1 and 0).</p>" +
                    _table(t["calibration"], {"model": "Model", "cohort": "Cohort", "brier": "Brier", "ece": "ECE",
                                              "slope": "Slope", "intercept": "Intercept"}))
    sections.append("<h2>Per-site view</h2><p class=\"explain\">The fusion models on each site's own test "
                    "patients (external sites: all their patients), to spot a site where a model fails.</p>" +
                    (_img(figs["per_site_auc"], "AUC per site") if "per_site_auc" in figs else "") +
                    _table(t["per_site"], {"model": "Model", "site": "Site", "role": "Role", "n_pos": "good",
                                           "n_neg": "poor", "auc": "AUC", "auc_lo": "95% CI low",
                                           "auc_hi": "95% CI high", "accuracy": "Accuracy",
                                           "sensitivity": "Sensitivity", "specificity": "Specificity", "f1": "F1",
                                           "note": "Note"},
                           {"n_pos": "int", "n_neg": "int"}))
    shap_figs = "".join(_img(p, f"{k[5:]}: mean |SHAP| per input over the training cohort, aggregated from sites")
                        for k, p in figs.items() if k.startswith("shap_"))
    sections.append("<h2>Fusion models</h2><p class=\"explain\">C and gamma chosen by federated 5-fold "
                    "cross-validation (AUC of out-of-fold decision values); Platt scaling A, B; rounds of messages. "
                    "ref_* columns: scikit-learn's SVC on the pooled rows (simulation only).</p>" +
                    _table(t["fusion_models"], {"model": "Model", "inputs": "Inputs", "C": "C", "gamma": "gamma",
                                                "cv_auc": "CV AUC", "platt_a": "Platt A", "platt_b": "Platt B",
                                                "rounds": "rounds", "ref_C": "ref C", "ref_gamma": "ref gamma",
                                                "ref_cv_auc": "ref CV AUC", "ref_auc_internal_test": "ref AUC test",
                                                "ref_auc_external": "ref AUC external"}, {"rounds": "int"}) +
                    "<h4>Global SHAP importance</h4>" + (shap_figs or '<p class="na">not available</p>'))
    sections.append("<h2>Deep-learning signatures</h2><p class=\"explain\">AUC (DeLong 95% CI) of each "
                    "backbone's output alone, per site and pooled.</p>" +
                    _table(t["signature_auc"], {"backbone": "Signature", "site": "Site", "split": "Split",
                                                "n_pos": "good", "n_neg": "poor", "auc": "AUC", "lo": "95% CI low",
                                                "hi": "95% CI high"}, {"n_pos": "int", "n_neg": "int"}))
    sup = t["suppressions"]
    sections.append("<h2>Disclosure control</h2><p class=\"explain\">Every number withheld or coarsened, by "
                    "which site and why. A withheld number is never replaced by a guess.</p>" +
                    (_table(sup, {"quantity": "Quantity", "site": "Site", "reason": "Reason"})
                     if sup is not None and len(sup) else "<p>Nothing was suppressed.</p>"))
    title = f"rectalfl report: {meta.get('name') or run_dir.name}"
    doc = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p class=\"small\">Generated "
           f"{datetime.now(UTC).isoformat(timespec='seconds')} by <code>rectalfl report</code>. Tables as CSV in "
           f"<code>tables/</code>, figures as PNG in <code>figures/</code>.</p>{''.join(sections)}</body></html>")
    path = run_dir / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path
