"""The run report: figures (PNG) and one self-contained ``report.html`` (figures embedded as data
URIs, inline CSS, no external resource: it opens offline and can be mailed as one file).

``rectalfl report RUN_DIR`` calls :func:`build_report`; a finished run calls it too. Inputs, all in
the run directory:

* required: ``tables/table3_performance.csv`` (written by the analysis stage, :mod:`server.analysis`);
* optional: the other ``tables/*.csv`` (Table 1, Table 2, DeLong, calibration, per-site, fusion
  models, SHAP, suppressions, signature AUCs), ``report_data/curves.json`` (ROC, calibration and
  decision curves, signature histograms), ``config.yaml``, ``models/final.json`` and ``run.db``.

A missing or unreadable optional input gives a short "not available: <why>" line in the report
and a warning (``rectalfl report`` prints each one); a malformed or truncated input (ragged rows,
a row cut short, no line end at the end of the file, not UTF-8, invalid JSON, a needed column
absent) stops with :class:`ReportError` naming the file, since rendering it would show wrong numbers. Only aggregate numbers are ever here: every figure is drawn from pooled histograms,
counts and sums, never from a patient row. Cohort and model names come from the data.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import logging
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

COHORT_LABELS = {"training": "Training cohort", "internal_test": "Internal test", "external": "External validation"}
COHORT_ORDER = ("training", "internal_test", "external")
# Okabe-Ito: distinguishable with the common colour-vision deficiencies
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
GOOD_COLOUR, POOR_COLOUR = "#009E73", "#D55E00"
MAX_DRAWN = 6
"""At most this many models share one figure; with more, the study's main models (when present) or the
first ones in Table 3 are drawn and the rest stay in the tables."""
PREFERRED = ("FDL", "CR", "CRD")
REQUIRED = "tables/table3_performance.csv"
TABLES = ("table1_baseline", "table2_odds_ratios", "table3_performance", "delong", "calibration", "per_site",
          "fusion_models", "shap_importance", "suppressions", "signature_auc")
MAKER = "the analysis stage of a run (`rectalfl simulate`, or `rectalfl run` on a deployment)"


class ReportError(RuntimeError):
    """The run directory lacks what the report needs, or one of its files is malformed or truncated; the
    message names the file and what makes it."""


COLUMNS: dict[str, tuple[str, ...]] = {
    "table1_baseline": ("cohort", "variable"),
    "table2_odds_ratios": ("predictor",),
    "table3_performance": ("model", "cohort", "auc"),
    "delong": ("cohort", "model_a", "model_b"),
    "calibration": ("model", "cohort"),
    "per_site": ("model", "site"),
    "fusion_models": ("model",),
    "shap_importance": ("model", "feature"),
    "suppressions": ("quantity",),
    "signature_auc": ("backbone", "site", "auc"),
}
"""Columns each table must have (the report reads them); a table without them is malformed."""


def check_csv(path: Path, rel: str, required: tuple[str, ...] = ()) -> str | None:
    """Check that ``path`` is a complete, well-formed CSV table.

    Returns
    -------
    str or None
        Why it cannot be read at all (missing, not a file, no permission, 0 bytes): the report
        goes on without it. None when it is fine.

    Raises
    ------
    ReportError
        The file is malformed (not UTF-8 text, rows with another number of fields than the header,
        a column the report needs is absent) or truncated (cut mid-row: the last line has no line
        end, or fewer fields). Naming the file, the line and what to do.
    """
    if not path.exists():
        return f"{rel} not found (written by {MAKER})"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return f"{rel} cannot be read ({exc.strerror or exc})"
    if not raw.strip():
        return f"{rel} is empty ({'0 bytes' if not raw else 'no header, no rows'})"
    redo = f"re-run {MAKER} (or `--resume` it) to write it again"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReportError(f"{path}: malformed: not a UTF-8 text table (byte {exc.start}); {redo}") from None
    rows = list(csv.reader(io.StringIO(text)))
    header = rows[0] if rows else []
    if not header or "\x00" in text:
        raise ReportError(f"{path}: malformed: not a CSV table (no header line); {redo}")
    if not text.endswith(("\n", "\r")):
        raise ReportError(f"{path}: truncated: the last line ({len(rows)}) has no line end, so the file was cut "
                          f"while being written or copied; {redo}")
    for i, row in enumerate(rows[1:], start=2):
        if row and len(row) != len(header):
            what = "truncated" if i == len(rows) and len(row) < len(header) else "malformed"
            raise ReportError(f"{path}: {what}: line {i} has {len(row)} field(s), the header has {len(header)}; "
                              f"{redo}")
    missing = [c for c in required if c not in header]
    if missing:
        raise ReportError(f"{path}: malformed: no column(s) {', '.join(missing)} (the header is "
                          f"{', '.join(header[:8])}{', ...' if len(header) > 8 else ''}); {redo}")
    return None


# --------------------------------------------------------------------------- inputs
class Inputs:
    """The run directory's tables and curves; ``why(name)`` says why one is not available.

    ``warnings`` lists each optional input that is missing or unreadable (the report shows "not
    available" there); a malformed or truncated input raises :class:`ReportError`.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.tables: dict[str, pd.DataFrame] = {}
        self.missing: dict[str, str] = {}
        self.warnings: list[str] = []
        for name in TABLES:
            rel = f"tables/{name}.csv"
            p = run_dir / rel
            why = check_csv(p, rel, COLUMNS.get(name, ()))
            if why is not None:
                self.missing[name] = why
                self.warnings.append(why)
                continue
            try:
                df = pd.read_csv(p)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
                raise ReportError(f"{p}: malformed: not a readable CSV ({exc}); re-run {MAKER}") from None
            if not len(df):
                self.missing[name] = f"{rel} has no rows"
                self.warnings.append(self.missing[name])
                continue
            self.tables[name] = df
        self.curves: dict[str, Any] = {}
        self.curves_why = ""
        p = run_dir / "report_data" / "curves.json"
        if not p.is_file():
            self.curves_why = f"report_data/curves.json not found (written by {MAKER})"
            self.warnings.append(self.curves_why)
        else:
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except OSError as exc:
                self.curves_why = f"report_data/curves.json cannot be read ({exc.strerror or exc})"
                self.warnings.append(self.curves_why)
            except (ValueError, UnicodeDecodeError) as exc:
                cut = isinstance(exc, json.JSONDecodeError) and "Expecting" in exc.msg and exc.pos >= len(exc.doc) - 1
                raise ReportError(f"{p}: {'truncated' if cut else 'malformed'}: not valid JSON ({exc}); re-run "
                                  f"{MAKER}") from None
            else:
                if not isinstance(data, dict):
                    raise ReportError(f"{p}: malformed: expected a JSON object of curve lists; re-run {MAKER}")
                self.curves = data

    def get(self, name: str) -> pd.DataFrame | None:
        return self.tables.get(name)

    def why(self, name: str) -> str:
        return self.missing.get(name, f"tables/{name}.csv has nothing to show")

    def curve(self, key: str) -> list[dict[str, Any]]:
        v = self.curves.get(key)
        return [c for c in v if isinstance(c, dict)] if isinstance(v, list) else []

    def curve_why(self, key: str) -> str:
        return self.curves_why or f"report_data/curves.json has no {key!r} entries"


def _label(cohort: Any) -> str:
    return COHORT_LABELS.get(str(cohort), str(cohort))


def _ordered(values: Any) -> list[str]:
    """Distinct values, the known cohorts first in their natural order, the rest as they come."""
    seen = [str(v) for v in dict.fromkeys(values) if not _missing(v)]
    return [c for c in COHORT_ORDER if c in seen] + [c for c in seen if c not in COHORT_ORDER]


def _slug(name: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(name))


def _missing(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    if isinstance(v, (float, np.floating)):
        return not math.isfinite(float(v))
    return isinstance(v, str) and v.strip() == ""


def _truthy(v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if _missing(v):
        return False
    return str(v).strip().lower() in ("true", "1", "1.0", "yes")


def _models(inp: Inputs) -> list[str]:
    """Every model, in Table 3's order, then any other the curves name."""
    names: list[str] = []
    perf = inp.get("table3_performance")
    if perf is not None and "model" in perf:
        names += [str(m) for m in perf["model"] if not _missing(m)]
    for c in inp.curve("roc") + inp.curve("calibration"):
        if "model" in c:
            names.append(str(c["model"]))
    for d in inp.curve("decision"):
        names += [str(m) for m in (d.get("models") or {})]
    return list(dict.fromkeys(names))


def drawn_models(models: list[str]) -> list[str]:
    """The models drawn in the comparison figures (see :data:`MAX_DRAWN`)."""
    if len(models) <= MAX_DRAWN:
        return list(models)
    main = [m for m in PREFERRED if m in models]
    return main or list(models[:MAX_DRAWN])


# --------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8,
                         "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 150,
                         "axes.grid": True, "grid.alpha": 0.25})
    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    _plt().close(fig)
    return path


def _arr(v: Any) -> np.ndarray:
    try:
        return np.asarray([np.nan if x is None else x for x in (v or [])], dtype=float)
    except (TypeError, ValueError):
        return np.asarray([], dtype=float)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _fig_roc(inp: Inputs, cohort: str, shown: list[str], colour: dict[str, str], path: Path) -> Path | None:
    plt = _plt()
    curves = [c for c in inp.curve("roc") if str(c.get("cohort")) == cohort and str(c.get("model")) in shown]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 4.6))
    for c in curves:
        m = str(c["model"])
        fpr, tpr = _arr(c.get("fpr")), _arr(c.get("tpr"))
        if not len(fpr) or len(fpr) != len(tpr):
            continue
        order = np.argsort(fpr, kind="stable")
        auc, lo, hi = _num(c.get("auc")), _num(c.get("auc_lo")), _num(c.get("auc_hi"))
        lab = m if math.isnan(auc) else f"{m} (AUC {auc:.3f}" + (
            f" [{lo:.3f}-{hi:.3f}])" if not (math.isnan(lo) or math.isnan(hi)) else ")")
        ax.plot(fpr[order], tpr[order], color=colour[m], lw=1.8, label=lab)
        tlo, thi = _arr(c.get("tpr_lo")), _arr(c.get("tpr_hi"))
        if len(tlo) == len(fpr) == len(thi):
            ax.fill_between(fpr[order], tlo[order], thi[order], color=colour[m], alpha=0.15, lw=0)
    ax.plot([0, 1], [0, 1], ls="--", color="#888888", lw=1, label="chance")
    ax.set(xlabel="1 - specificity", ylabel="Sensitivity", title=f"ROC, {_label(cohort)}", xlim=(0, 1),
           ylim=(0, 1.01))
    ax.set_aspect("equal")
    ax.legend(loc="lower right", frameon=False)
    return _save(fig, path)


def _fig_calibration(inp: Inputs, cohort: str, shown: list[str], colour: dict[str, str], path: Path) -> Path | None:
    plt = _plt()
    curves = [c for c in inp.curve("calibration") if str(c.get("cohort")) == cohort and str(c.get("model")) in shown]
    if not curves:
        return None
    cal = inp.get("calibration")
    n_max = max([float(np.nanmax(n)) for c in curves if len(n := _arr(c.get("n"))) and np.isfinite(n).any()] or [1.0])
    fig, ax = plt.subplots(figsize=(5.0, 4.6))
    for c in curves:
        m = str(c["model"])
        x, y, n = _arr(c.get("mean_predicted")), _arr(c.get("observed")), _arr(c.get("n"))
        if not len(x) or len(x) != len(y):
            continue
        lab = m
        if cal is not None and {"model", "cohort", "brier", "ece"} <= set(cal.columns):
            r = cal[(cal["model"].astype(str) == m) & (cal["cohort"].astype(str) == cohort)]
            if len(r):
                b, e = _num(r["brier"].iloc[0]), _num(r["ece"].iloc[0])
                bits = [f"Brier {b:.3f}" if not math.isnan(b) else "", f"ECE {e:.3f}" if not math.isnan(e) else ""]
                if any(bits):
                    lab += f" ({', '.join(b for b in bits if b)})"
        ok = np.isfinite(x) & np.isfinite(y)
        size = (15 + 185 * np.nan_to_num(n, nan=0.0) / max(n_max, 1.0))[ok] if len(n) == len(x) else 30
        ax.plot(x[ok], y[ok], "-", color=colour[m], lw=1.2, alpha=0.8)
        ax.scatter(x[ok], y[ok], s=size, color=colour[m], alpha=0.75, edgecolors="white", linewidths=0.5, label=lab)
    ax.plot([0, 1], [0, 1], ls="--", color="#888888", lw=1, label="ideal")
    ax.set(xlabel="Mean predicted probability", ylabel="Observed rate of good response",
           title=f"Calibration, {_label(cohort)}", xlim=(0, 1), ylim=(0, 1))
    ax.set_aspect("equal")
    ax.legend(loc="upper left", frameon=False)
    return _save(fig, path)


def _fig_decision(d: dict[str, Any], shown: list[str], colour: dict[str, str], path: Path) -> Path | None:
    """Decision curves. Each model's curve is drawn at the thresholds its released cells decide exactly
    (``models: {m: {thresholds, net_benefit, treat_all}}``); an older layout with one shared threshold
    list (``thresholds`` + ``models: {m: [...]}``, ``treat_all``) is read too."""
    plt = _plt()
    shared_t = _arr(d.get("thresholds"))
    lines = []
    for m, v in (d.get("models") or {}).items():
        if str(m) not in shown:
            continue
        if isinstance(v, dict):
            t, nb, ta = _arr(v.get("thresholds")), _arr(v.get("net_benefit")), _arr(v.get("treat_all"))
        else:
            t, nb, ta = shared_t, _arr(v), _arr(d.get("treat_all"))
        if len(t) and len(nb) == len(t):
            lines.append((str(m), t, nb, ta if len(ta) == len(t) else None))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    top, lo_t, hi_t = 0.0, 1.0, 0.0
    for m, t, nb, _ in lines:
        ax.plot(t, nb, color=colour[m], lw=1.8, label=m, marker="." if len(t) < 25 else None)
        if np.isfinite(nb).any():
            top = max(top, float(np.nanmax(nb)))
        lo_t, hi_t = min(lo_t, float(np.nanmin(t))), max(hi_t, float(np.nanmax(t)))
    ref = max(lines, key=lambda x: len(x[1]))
    if ref[3] is not None:
        ax.plot(ref[1], ref[3], color="#777777", lw=1.2, ls="-.", label="treat all")
        if np.isfinite(ref[3]).any():
            top = max(top, float(np.nanmax(ref[3])))
    ax.axhline(0, color="#000000", lw=1, ls=":", label="treat none")
    ax.set(xlabel="Threshold probability", ylabel="Net benefit",
           title=f"Decision curve, {_label(d.get('cohort', ''))}", ylim=(-0.05, top + 0.05),
           xlim=(lo_t, hi_t if hi_t > lo_t else lo_t + 1e-3))
    ax.legend(frameon=False)
    return _save(fig, path)


def _fig_signatures(items: list[dict[str, Any]], cohort: str, path: Path) -> Path | None:
    plt = _plt()
    good = []
    for d in items:
        e, g, p = _arr(d.get("edges")), _arr(d.get("good")), _arr(d.get("poor"))
        if len(e) >= 2 and len(g) == len(p) == len(e) - 1:
            good.append((str(d.get("signature", "?")), e, g, p))
    if not good:
        return None
    ncol = min(3, len(good))
    nrow = math.ceil(len(good) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 2.5 * nrow), squeeze=False)
    for ax, (sig, e, g, p) in zip(axes.flat, good, strict=False):
        w = np.diff(e)
        for cnt, col, lab in ((g, GOOD_COLOUR, "good response"), (p, POOR_COLOUR, "poor response")):
            tot = np.nansum(cnt)
            dens = cnt / tot / w if tot > 0 else np.zeros_like(cnt)
            ax.stairs(dens, e, color=col, lw=1.6, label=lab)
        ax.set_title(f"{sig} (good {int(np.nansum(g))}, poor {int(np.nansum(p))})", fontsize=9)
        ax.set_xlim(e[0], e[-1])
        ax.set_xlabel("signature", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
    axes.flat[0].legend(fontsize=7, frameon=False)
    for ax in list(axes.flat)[len(good):]:
        ax.axis("off")
    fig.suptitle(f"Signature distributions by response, {_label(cohort)}", fontsize=10)
    return _save(fig, path)


def _fig_shap(s: pd.DataFrame, model: str, path: Path) -> Path | None:
    plt = _plt()
    s = s.assign(mean_abs_shap=pd.to_numeric(s["mean_abs_shap"], errors="coerce")).dropna(subset=["mean_abs_shap"])
    if not len(s):
        return None
    s = s.sort_values("mean_abs_shap")
    fig, ax = plt.subplots(figsize=(5.0, max(2.2, 0.8 + 0.3 * len(s))))
    ax.barh(s["feature"].astype(str), s["mean_abs_shap"], color=PALETTE[0])
    n = pd.to_numeric(s["n_patients"], errors="coerce").max() if "n_patients" in s else math.nan
    ax.set(xlabel="mean |SHAP| (probability of good response)",
           title=f"{model}: global importance" + (f" (n={int(n)})" if pd.notna(n) else ""))
    ax.grid(axis="y", visible=False)
    return _save(fig, path)


def _fig_per_site(ps: pd.DataFrame, colour: dict[str, str], shown: list[str], path: Path) -> Path | None:
    plt = _plt()
    if not {"model", "site", "auc", "auc_lo", "auc_hi"} <= set(ps.columns):
        return None
    ps = ps.copy()
    for c in ("auc", "auc_lo", "auc_hi"):
        ps[c] = pd.to_numeric(ps[c], errors="coerce")
    ps["model"] = ps["model"].astype(str)
    ms = [m for m in shown if m in set(ps["model"])] or drawn_models(list(dict.fromkeys(ps["model"])))
    ps = ps[ps["model"].isin(ms)]
    if not ps["auc"].notna().any():
        return None
    ps["row"] = ps["site"].astype(str)
    if "split" in ps and ps.groupby(["model", "row"]).size().max() > 1:
        ps["row"] = ps["row"] + " / " + ps["split"].astype(str)
    rows = list(dict.fromkeys(ps["row"]))
    roles = ps.drop_duplicates("row").set_index("row")["role"] if "role" in ps else pd.Series(dtype=str)
    fig, ax = plt.subplots(figsize=(5.6, 1.2 + 0.6 * len(rows)))
    for j, m in enumerate(ms):
        r = ps[ps["model"] == m].drop_duplicates("row").set_index("row").reindex(rows)
        y = np.arange(len(rows)) + (j - (len(ms) - 1) / 2) * min(0.18, 0.8 / max(len(ms), 1))
        ok = r["auc"].notna().to_numpy()
        if not ok.any():
            continue
        lo = (r["auc"] - r["auc_lo"]).clip(lower=0).fillna(0)[ok]
        hi = (r["auc_hi"] - r["auc"]).clip(lower=0).fillna(0)[ok]
        ax.errorbar(r["auc"][ok], y[ok], xerr=[lo, hi], fmt="o", color=colour.get(m, "#666666"), ms=4, capsize=2,
                    label=m)
    ax.axvline(0.5, color="#888888", ls="--", lw=1)
    ax.set_yticks(np.arange(len(rows)), [f"{r} ({roles.get(r, '')})" if len(roles) else r for r in rows])
    ax.invert_yaxis()
    ax.set(xlabel="AUC (95% CI) on the site's held-out patients", xlim=(0, 1), title="Per-site performance")
    ax.legend(frameon=False, loc="best")
    return _save(fig, path)


def _render(run_dir: Path, inp: Inputs) -> tuple[dict[str, Path], dict[str, str]]:
    """Every figure the inputs allow, as ``{stem: path}``, and ``{figure kind: why not drawn}``."""
    fig_dir = run_dir / "figures"
    figs: dict[str, Path] = {}
    why: dict[str, str] = {}
    shown = drawn_models(_models(inp))
    colour = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(shown)}

    def attempt(kind: str, stem: str, fn: Any, *args: Any) -> None:
        try:
            p = fn(*args, fig_dir / f"{stem}.png")
        except Exception as exc:  # noqa: BLE001 - one malformed curve must not cost the whole report
            logger.warning("figure %s not drawn: %s", stem, exc)
            why.setdefault(kind, f"{stem}.png could not be drawn ({type(exc).__name__}: {exc})")
            return
        if p is not None:
            figs[stem] = p

    for c in _ordered(c.get("cohort") for c in inp.curve("roc")):
        attempt("roc", f"roc_{_slug(c)}", _fig_roc, inp, c, shown, colour)
    for c in _ordered(c.get("cohort") for c in inp.curve("calibration")):
        attempt("calibration", f"calibration_{_slug(c)}", _fig_calibration, inp, c, shown, colour)
    dec = {str(d.get("cohort")): d for d in inp.curve("decision")}
    for c in _ordered(dec):
        attempt("decision", f"decision_{_slug(c)}", _fig_decision, dec[c], shown, colour)
    dists = inp.curve("distributions")
    for c in _ordered(d.get("cohort") for d in dists):
        attempt("signatures", f"signatures_{_slug(c)}", _fig_signatures,
                [d for d in dists if str(d.get("cohort")) == c], c)
    shap = inp.get("shap_importance")
    if shap is not None and {"model", "feature", "mean_abs_shap"} <= set(shap.columns):
        for m in dict.fromkeys(shap["model"].astype(str)):
            attempt("shap", f"shap_{_slug(m)}", _fig_shap, shap[shap["model"].astype(str) == m], m)
    ps = inp.get("per_site")
    if ps is not None:
        attempt("per_site", "per_site_auc", _fig_per_site, ps, colour, shown)
    for kind, key in (("roc", "roc"), ("calibration", "calibration"), ("decision", "decision"),
                      ("signatures", "distributions")):
        if not any(s.startswith(kind + "_") for s in figs):
            why.setdefault(kind, inp.curve_why(key) if not inp.curve(key) else "no entry could be drawn")
    if not any(s.startswith("shap_") for s in figs):
        why.setdefault("shap", inp.why("shap_importance") if shap is None else "no importance value to draw")
    if "per_site_auc" not in figs:
        why.setdefault("per_site", inp.why("per_site") if ps is None else "no per-site AUC to draw")
    return figs, why


def render_figures(run_dir: Path | str) -> list[Path]:
    """Draw every figure the inputs allow into ``run_dir/figures``; returns the paths written.

    ``roc_<cohort>``, ``calibration_<cohort>``, ``decision_<cohort>``, ``signatures_<cohort>``,
    ``shap_<model>`` and ``per_site_auc`` (PNG, 150 dpi, Okabe-Ito colours).
    """
    run_dir = Path(run_dir)
    return list(_render(run_dir, Inputs(run_dir))[0].values())


# --------------------------------------------------------------------------- formatting
def fmt(v: Any, kind: str = "num") -> str:
    """One table cell as HTML: ``num`` 3 decimals, ``p`` 3 significant digits or ``<0.001``, ``or``
    2 decimals, ``g`` 3 significant digits, ``int``, ``bool``, ``text``, ``label`` (blank when empty)."""
    if _missing(v):
        return "" if kind == "label" else "&ndash;"
    if kind == "bool":
        return "yes" if _truthy(v) else "no"
    if kind in ("text", "label") or (isinstance(v, str) and kind != "p"):
        if isinstance(v, (float, np.floating)):
            return str(int(v)) if float(v).is_integer() else f"{float(v):.3f}"
        return html.escape(str(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return html.escape(str(v))
    if kind == "p":
        return "&lt;0.001" if f < 0.001 else f"{min(f, 1.0):.3g}"
    if kind == "or":
        return f"{f:.2f}" if abs(f) < 1000 else f"{f:.3g}"
    if kind == "g":
        return f"{f:.3g}"
    if kind == "int":
        return f"{int(round(f)):,}"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{f:.3f}"


def _na(why: str) -> str:
    return f'<p class="na">not available: {html.escape(why)}</p>'


def _table(df: pd.DataFrame | None, columns: dict[str, str], kinds: dict[str, str] | None = None, *,
           highlight: str | None = None, why: str = "", note: bool = False) -> str:
    """An HTML table of ``columns`` (``{column: header}``); absent columns show as dashes.

    With ``note``, each distinct sentence of the rows' notes (notes are ``"; "``-joined sentences) is
    written once, as a numbered footnote under the table, and a row's Note cell holds its markers.
    """
    if df is None or not len(df):
        return _na(why or "nothing to show")
    kinds = kinds or {}
    cols = dict(columns)
    notes: dict[str, int] = {}
    if note:
        cols["note"] = "Note"
        parts = [p for v in (df["note"] if "note" in df else []) for p in _note_parts(v)]
        anchor = "n" + hashlib.sha1("\n".join([*cols.values(), *parts]).encode()).hexdigest()[:10]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in cols.values())
    rows = []
    for _, r in df.iterrows():
        cls = ' class="hl"' if highlight and _truthy(r.get(highlight)) else ""
        cells = []
        for c in cols:
            if c == "note":
                marks = [notes.setdefault(part, len(notes) + 1) for part in _note_parts(r.get("note"))]
                text = ", ".join(f'<a href="#{anchor}-{m}">{m}</a>' for m in dict.fromkeys(marks))
                cells.append(f"<td class=note>{f'<sup>{text}</sup>' if text else ''}</td>")
            else:
                cells.append(f"<td>{fmt(r.get(c), kinds.get(c, 'num'))}</td>")
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    out = f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    if notes:
        items = "".join(f'<li id="{anchor}-{m}">{html.escape(t)}</li>' for t, m in notes.items())
        out += f'<ol class="notes small">{items}</ol>'
    return out


def not_converged(table2: pd.DataFrame | None, fusion: pd.DataFrame | None) -> list[str]:
    """Every fit of the run that records it did not converge (Table 2's logistic fits, the fusion SVMs and
    their Platt scaling): one line each, empty when all converged or nothing says otherwise."""
    out = []
    for df, name_col, checks in ((table2, "predictor", (("uni_converged", "univariate logistic fit"),
                                                         ("multi_converged", "multivariable logistic fit"))),
                                 (fusion, "model", (("converged", "SVM fit"), ("platt_converged", "Platt scaling")))):
        if df is None:
            continue
        for _, r in df.iterrows():
            for col, what in checks:
                v = r.get(col)
                if not _missing(v) and str(v).strip() != "" and not _truthy(v):
                    out.append(f"{r.get(name_col)}: {what} did not converge")
        if df is fusion and "cv_fits_converged" in df:
            for _, r in df.iterrows():
                m = re.match(r"^\s*(\d+)\s*/\s*(\d+)\s*$", str(r.get("cv_fits_converged", "")))
                if m and int(m.group(1)) < int(m.group(2)):
                    out.append(f"{r.get('model')}: {m.group(1)} of {m.group(2)} cross-validation fits converged")
    return out


def _convergence_warning(table2: pd.DataFrame | None, fusion: pd.DataFrame | None) -> str:
    lines = not_converged(table2, fusion)
    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(x)}</li>" for x in lines)
    return (f'<div class="warn"><b>Fits that did not converge</b> (their numbers are the last iterate: read them '
            f"with care; see the converged / iterations / gradient-norm columns):<ul>{items}</ul></div>")


_NOTE_START = re.compile(r"; (?=[A-Za-z_][\w.]*(?:\[[^\]]*\])?: )")
"""Where one note of a ``"; "``-joined note cell ends: before the next ``<quantity>: `` (a reason's own
``;`` stays inside its note)."""


def _note_parts(value: Any) -> list[str]:
    """The notes of a note cell, each ``<quantity>: <reason>`` or free text; empty for a missing note."""
    if _missing(value) or not str(value).strip():
        return []
    return [p.strip() for p in _NOTE_START.split(str(value)) if p.strip()]


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _explain(text: str) -> str:
    return f'<p class="explain">{text}</p>'


# --------------------------------------------------------------------------- sections
def _delong(dl: pd.DataFrame | None, why: str) -> str:
    if dl is None or not {"cohort", "model_a", "model_b", "p"} <= set(dl.columns):
        return _na(why if dl is None else "tables/delong.csv lacks the cohort/model_a/model_b/p columns")
    parts = []
    for cohort in _ordered(dl["cohort"]):
        d = dl[dl["cohort"].astype(str) == cohort]
        models = list(dict.fromkeys([*d["model_a"].astype(str), *d["model_b"].astype(str)]))
        cell: dict[tuple[str, str], str] = {}
        for _, r in d.iterrows():
            p = fmt(r["p"], "p")
            if _missing(r["p"]) and not _missing(r.get("note")):
                p = "&ndash;<sup>*</sup>"
            cell[(str(r["model_a"]), str(r["model_b"]))] = cell[(str(r["model_b"]), str(r["model_a"]))] = p
        head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
        body = "".join(
            f"<tr><th>{html.escape(a)}</th>" + "".join(
                f"<td>{'&middot;' if a == b else cell.get((a, b), '&ndash;')}</td>" for b in models) + "</tr>"
            for a in models)
        parts.append(f"<h4>{html.escape(_label(cohort))}</h4><table class=\"matrix\"><thead><tr><th>Model</th>"
                     f"{head}</tr></thead><tbody>{body}</tbody></table>")
    return "".join(parts) + '<p class="small"><sup>*</sup> withheld by disclosure control (see the last section).</p>'


def _meta(run_dir: Path, inp: Inputs) -> dict[str, Any]:
    import yaml

    meta: dict[str, Any] = {}
    cfg: Any = {}
    if (run_dir / "config.yaml").is_file():
        try:
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            logger.warning("config.yaml not readable (%s); header without it", exc)
        cfg = cfg if isinstance(cfg, dict) else {}
        fed = cfg.get("federation") or {}
        meta.update(name=cfg.get("name"), mode=fed.get("mode"), strategy=fed.get("strategy"),
                    rounds=fed.get("rounds"), backbone=(cfg.get("train") or {}).get("backbone"),
                    min_cell_count=(cfg.get("privacy") or {}).get("min_cell_count"))
    if (run_dir / "models" / "final.json").is_file():
        try:
            fj = json.loads((run_dir / "models" / "final.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            logger.warning("models/final.json not readable (%s); header without it", exc)
            fj = {}
        fj = fj if isinstance(fj, dict) else {}
        for k in ("mode", "strategy", "rounds", "config_digest"):
            if meta.get(k) is None and fj.get(k) is not None:
                meta[k] = fj[k]
        meta.update(versions=fj.get("library_versions") or {}, trained_at=fj.get("created_at"),
                    backbone=meta.get("backbone") or fj.get("network"))
    if (run_dir / "run.db").is_file():
        try:
            from server.store import RunStore

            with RunStore.open_run_dir(run_dir, readonly=True) as store:
                runs = store.runs()
                if len(runs):
                    r = runs.iloc[-1]
                    rid = str(r["run_id"])
                    meta.update(run_id=rid, status=r.get("status"), started_at=r.get("created_at"),
                                finished_at=r.get("finished_at"), engine=r.get("engine"))
                    for k, col in (("config_digest", "config_digest"), ("name", "name"), ("mode", "mode"),
                                   ("strategy", "strategy")):
                        meta[k] = meta.get(k) or r.get(col)
                    ev = store.events(rid)
                    joined = ev[ev["kind"] == "site_joined"] if "kind" in ev else ev.iloc[:0]
                    sites = {}
                    for e in joined.itertuples():
                        msg = str(e.message)
                        sites[str(e.site)] = msg.split(" as ")[-1] if " as " in msg else ""
                    if sites:
                        meta["sites"] = sites
        except Exception as exc:  # noqa: BLE001 - the report still renders without the run record
            logger.warning("run record not readable (%s); header without it", exc)
    if not meta.get("sites"):
        ps = inp.get("per_site")
        if ps is not None and {"site", "role"} <= set(ps.columns):
            meta["sites"] = {str(s): str(r) for s, r in ps.drop_duplicates("site")[["site", "role"]].itertuples(
                index=False) if not str(s).startswith("pooled")}
        elif cfg:
            ext = set((cfg.get("federation") or {}).get("external_sites") or [])
            specs = (cfg.get("synth") or {}).get("sites") or []
            meta["sites"] = {str(s.get("name")): "external" if s.get("external") or s.get("name") in ext else "train"
                             for s in specs if isinstance(s, dict)}
    return meta


def _header(meta: dict[str, Any], run_dir: Path) -> str:
    def v(k: str) -> Any:
        x = meta.get(k)
        return None if _missing(x) else x

    parts = [str(v(k)) for k in ("mode", "strategy") if v(k) is not None]
    if v("rounds") is not None:
        parts.append(f"{v('rounds')} rounds")
    training = " / ".join(parts) + (f", {v('backbone')}" if v("backbone") else "")
    sites = meta.get("sites") or {}
    rows = [("Run", v("name") or run_dir.name), ("Run id", v("run_id")), ("Status", v("status")),
            ("Date", v("finished_at") or v("started_at") or v("trained_at")), ("Config digest", v("config_digest")),
            ("Mode / strategy / rounds", training or None), ("Engine", v("engine")),
            ("Sites (role)", ", ".join(f"{s} ({r})" if r else s for s, r in sites.items()) or None),
            ("Disclosure control", f"statistics computed by the sites and securely aggregated; every released count "
                                   f"is 0 or at least k = {v('min_cell_count')} (the recipe's floor; a site's own "
                                   "floor can be higher), see the suppression log"
             if v("min_cell_count") is not None else None),
            ("Libraries", ", ".join(f"{k} {x}" for k, x in (meta.get("versions") or {}).items()) or None),
            ("Run directory", str(run_dir))]
    missing = '<span class="na">not recorded</span>'
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{missing if x is None else fmt(x, 'text')}</td></tr>"
                   for k, x in rows)
    return f'<table class="meta">{body}</table>'


_KEYS = {"table1_baseline": ("cohort", "variable", "level"), "table2_odds_ratios": ("predictor",),
         "table3_performance": ("model", "cohort"), "delong": ("cohort", "model_a", "model_b"),
         "calibration": ("model", "cohort"), "per_site": ("model", "site", "split"),
         "fusion_models": ("model",), "shap_importance": ("model", "feature"),
         "signature_auc": ("backbone", "site", "split")}
_VALUES = {"table2_odds_ratios": ("uni_or", "uni_p", "multi_or", "multi_p"),
           "table3_performance": ("auc", "auc_lo", "auc_hi", "accuracy", "sensitivity", "specificity", "f1"),
           "delong": ("auc_a", "auc_b", "diff", "p"), "calibration": ("brier", "ece", "slope", "intercept"),
           "per_site": ("auc", "auc_lo", "auc_hi", "accuracy", "sensitivity", "specificity", "f1"),
           "fusion_models": ("C", "gamma", "cv_auc", "platt_a", "platt_b"),
           "shap_importance": ("mean_abs_shap",), "signature_auc": ("auc", "lo", "hi")}
_TITLES = {"table1_baseline": "Table 1", "table2_odds_ratios": "Table 2", "table3_performance": "Table 3",
           "delong": "DeLong", "calibration": "Calibration", "per_site": "Per-site", "fusion_models": "Fusion models",
           "shap_importance": "SHAP", "signature_auc": "Signature AUC"}


def _empty_values(name: str, r: pd.Series, columns: Any) -> list[str]:
    """The value cells of a table row that are empty although the row should have them."""
    if name == "table1_baseline":
        # an "n" row has no p-value, a categorical variable's header row no counts, its level rows no p-value
        header = _missing(r.get("level")) and "(%)" in str(r.get("variable"))
        cand = () if header else ("good_response", "poor_response")
        if str(r.get("variable")) != "n" and _missing(r.get("level")):
            cand += ("p_value",)
    elif name == "table2_odds_ratios" and not _truthy(r.get("selected")):
        cand = ("uni_or", "uni_p")  # multi_* are empty by design outside the multivariable model
    else:
        cand = _VALUES[name]
    return [c for c in cand if c in columns and _missing(r.get(c))]


def noted_rows(inp: Inputs) -> pd.DataFrame:
    """Every table row with a disclosure note: ``table, row, withheld`` (its empty value cells), ``note``."""
    out = []
    for name, keys in _KEYS.items():
        df = inp.get(name)
        if df is None or "note" not in df.columns:
            continue
        for _, r in df.iterrows():
            if _missing(r.get("note")):
                continue
            row = " / ".join(str(r.get(k)) for k in keys if k in df.columns and not _missing(r.get(k)))
            out.append({"table": _TITLES[name], "row": row or "(whole table)",
                        "withheld": ", ".join(_empty_values(name, r, df.columns)), "note": str(r["note"])})
    return pd.DataFrame(out, columns=["table", "row", "withheld", "note"])


def _disclosure(inp: Inputs) -> str:
    parts = []
    noted = noted_rows(inp)
    withheld = noted[noted["withheld"] != ""]
    rest = noted[noted["withheld"] == ""]
    parts.append("<h3>Numbers withheld</h3>" + _explain(
        "Each row of a table above with withheld numbers (listed), and the note saying which site's summary "
        "failed the minimum cell count."))
    if len(withheld):
        parts.append(_table(withheld, {"table": "Table", "row": "Row", "withheld": "Withheld"},
                            {"table": "text", "row": "text", "withheld": "text"}, note=True))
    else:
        parts.append("<p>No number in the tables above was withheld.</p>")
    if len(rest):
        parts.append(f"<details><summary>{len(rest)} further rows carry a note but no withheld number (e.g. "
                     "histograms coarsened: small cells merged with their neighbours)</summary>" +
                     _table(rest, {"table": "Table", "row": "Row"}, {"table": "text", "row": "text"}, note=True) +
                     "</details>")
    sup = inp.get("suppressions")
    parts.append("<h3>Suppression log</h3>" + _explain(
        "Every summary a site withheld or coarsened, as the sites reported it (<code>tables/suppressions.csv</code>)"
        ", grouped by site and reason; the full list below."))
    if sup is None:
        parts.append("<p>Nothing was suppressed.</p>" if inp.why("suppressions").endswith("has no rows")
                     else _na(inp.why("suppressions")))
    else:
        sup = sup.reindex(columns=["quantity", "site", "reason"])
        sup = sup.astype(object).where(sup.notna(), "")
        g = (sup.groupby(["site", "reason"], sort=False)["quantity"]
             .agg(n="size", quantities=lambda q: ", ".join(list(dict.fromkeys(map(str, q)))[:6]) +
                  (", ..." if q.nunique() > 6 else "")).reset_index())
        parts.append(_table(g, {"site": "Site", "reason": "Reason", "n": "Quantities", "quantities": "e.g."},
                            {"site": "text", "reason": "text", "n": "int", "quantities": "text"}))
        parts.append(f"<details><summary>All {len(sup)} suppressions</summary>" +
                     _table(sup, {"quantity": "Quantity", "site": "Site", "reason": "Reason"},
                            {"quantity": "text", "site": "text", "reason": "text"}) + "</details>")
    return "".join(parts)


def _privacy(run_dir: Path) -> str:
    """The Privacy section: each site's differential-privacy ledger, the DP settings and the architecture
    change (``models/final.json``), and where the disclosure-control log is."""
    parts = []
    meta: dict[str, Any] = {}
    try:
        meta = (json.loads((run_dir / "models" / "final.json").read_text(encoding="utf-8")).get("privacy") or {})
    except (OSError, ValueError):
        pass
    path = run_dir / "tables" / "privacy_ledger.csv"
    ledger = None
    if path.is_file():
        try:
            ledger = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
            ledger = None
    if not meta.get("dp") and ledger is None:
        parts.append(_explain(
            "Differential privacy was off (<code>privacy.dp: false</code>): the trained weights carry no formal "
            "privacy guarantee; what protected patients is that no image, row or per-patient value left a site, "
            "and the disclosure control of every statistic (below)."))
    else:
        parts.append(_explain(
            "Every network was trained on site with DP-SGD (Poisson sampling, per-sample gradient clipping, Gaussian "
            "noise). Each site accounts its own spend (&epsilon; at &delta;) per stage, over all the backbones it "
            "trains (a patient is in each), and refuses a round that would exceed its own budget. The table is what "
            "the sites reported after their last round (<code>tables/privacy_ledger.csv</code>); &epsilon; grows with "
            "every round; smaller is more private. The guarantee covers the weights and everything computed from "
            "them; the evaluation statistics are protected by disclosure control."))
        if meta.get("dp"):
            settings = {k: meta.get(k) for k in ("max_grad_norm", "noise_multiplier", "target_epsilon", "delta",
                                                  "accountant")}
            parts.append("<p>Settings: " + ", ".join(f"<code>{html.escape(k)}</code> {html.escape(str(v))}"
                                                     for k, v in settings.items() if v is not None) + ".</p>")
            arch = meta.get("architecture_change") or {}
            if arch.get("summary"):
                parts.append(f"<p>Architecture change for DP: {html.escape(str(arch['summary']))} (Opacus "
                             "<code>ModuleValidator.fix</code>: batch normalisation mixes the patients of a batch).</p>")
        parts.append(_table(ledger, {"site": "Site", "stage": "Stage", "rounds": "Rounds", "epsilon": "epsilon",
                                     "delta": "delta", "noise_multiplier": "Noise multiplier",
                                     "max_grad_norm": "Clipping bound", "sample_rate": "Sample rate",
                                     "accountant": "Accountant"},
                            {"site": "text", "stage": "text", "rounds": "int", "delta": "g", "noise_multiplier": "g",
                             "max_grad_norm": "g", "sample_rate": "g", "accountant": "text"},
                            why="tables/privacy_ledger.csv not found (written at the end of training)"))
    parts.append("<p>Disclosure control of the statistics: every number a site withheld or coarsened is in the "
                 "<a href=\"#disclosure\">Disclosure control</a> section and in <code>tables/suppressions.csv</code>."
                 "</p>")
    return "".join(parts)


CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1150px;color:#222;
line-height:1.45;padding:0 1rem}h1{margin-bottom:.2rem}h2{border-bottom:2px solid #0072B2;padding-bottom:.2rem;
margin-top:2.4rem}h3{margin-top:1.6rem}table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0 1rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right;vertical-align:top}th{background:#f3f6f9}
td:first-child,th:first-child{text-align:left}tr.hl td{background:#fff4d6;font-weight:600}
.na{color:#888;font-style:italic}.explain{color:#444;margin:.2rem 0 .4rem}
figure{display:inline-block;margin:.5rem;vertical-align:top}figure img{max-width:520px;width:100%;
border:1px solid #eee}figcaption{font-size:.8rem;color:#555;max-width:520px}.meta td,.meta th{text-align:left}
.matrix td{text-align:center}.small{font-size:.8rem;color:#555}td.note{text-align:left;font-size:.72rem;color:#666;
max-width:24rem}nav{font-size:.85rem}nav a{margin-right:.8rem}details{margin:.4rem 0 1rem}summary{cursor:pointer}
.warn{border-left:4px solid #D55E00;background:#fff3ec;padding:.4rem .8rem;margin:.6rem 0}ol.notes{margin:-.6rem 0 1rem}
"""

PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title><style>$css</style></head>
<body><h1>$title</h1>
<p class="small">Generated $generated by <code>rectalfl report</code>. Tables as CSV in <code>tables/</code>,
figures as PNG in <code>figures/</code>.</p>
$header
<nav>$nav</nav>
$sections
</body></html>
""")


def _section(sid: str, title: str, body: str) -> tuple[str, str, str]:
    return sid, title, f'<section id="{sid}"><h2>{html.escape(title)}</h2>{body}</section>'


def _check(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such directory (give the run directory printed at the end of a run)")
    if not (run_dir / REQUIRED).is_file():
        if not ((run_dir / "config.yaml").is_file() or (run_dir / "run.db").is_file()):
            raise ReportError(f"{run_dir} is not a run directory (it has no config.yaml or run.db, and no {REQUIRED}"
                              "); give the directory printed at the end of a run")
        raise ReportError(f"{run_dir / REQUIRED} not found: it is written by {MAKER}, which did not finish here; "
                          f"continue the run with `rectalfl simulate --resume {run_dir}` (or `rectalfl run "
                          f"--resume {run_dir}` on a deployment)")


def build_report(run_dir: Path | str, *, warn: Callable[[str], None] | None = None,
                 status: str | None = None) -> Path:
    """Render the figures and ``run_dir/report.html``; returns the HTML path.

    Parameters
    ----------
    run_dir : Path
    warn : callable, optional
        Called with one line per optional input that is missing or unreadable (default: a log
        warning); the report shows "not available" in its place.
    status : str, optional
        The run's status to print instead of the run record's: the pipeline writes the report as its
        last stage, while the record still says ``running``, and passes ``"completed"``.

    Raises
    ------
    ReportError
        When ``run_dir`` is not a run directory, lacks ``tables/table3_performance.csv``, or any of
        its tables or curves is malformed or truncated (the message names the file).
    """
    run_dir = Path(run_dir)
    _check(run_dir)
    inp = Inputs(run_dir)
    for line in inp.warnings:
        (warn or logger.warning)(f"{line}; the report shows it as not available")
    perf = inp.get("table3_performance")
    if perf is None:
        raise ReportError(f"{run_dir / REQUIRED}: {inp.why('table3_performance')}; re-run {MAKER}")
    if not {"model", "cohort", "auc"} <= set(perf.columns):
        raise ReportError(f"{run_dir / REQUIRED} lacks the model, cohort or auc column; re-run {MAKER}")
    figs, fig_why = _render(run_dir, inp)
    meta = _meta(run_dir, inp)
    if status is not None:
        meta["status"] = status
    t = inp.get
    models = _models(inp)
    shown = drawn_models(models)

    def fig_block(kind: str, caption: str) -> str:
        blocks = [_img(p, f"{caption}, {_label(k[len(kind) + 1:])}") for k, p in figs.items()
                  if k.startswith(kind + "_")]
        return "".join(blocks) or _na(fig_why.get(kind, "no data"))

    sections = [_section("read", "How to read this report", (
        "<p>Every number here was computed from summaries the hospitals sent (counts, sums, histogram cells on "
        "a shared grid, model gradients), never from patient rows, and equals what pooling the patients would "
        "give (up to the stated grid bound). <b>Training cohort</b>: the training sites' training patients, the "
        "only patients any model or hyper-parameter saw. <b>Internal test</b>: the same sites' held-out patients. "
        "<b>External validation</b>: sites that never trained. FDL fuses the deep-learning signatures, CR the "
        "clinical-radiological predictors selected in Table 2, CRD both; each is an RBF-kernel SVM trained "
        "federatedly; other models are the study's variants. Judge a model on the internal test and external "
        "cohorts: AUC (discrimination, 0.5 = chance) with its 95% CI, calibration (are the predicted probabilities "
        "right?) and net benefit (is acting on it better than treating everyone or no one?). A number withheld "
        "by disclosure control shows as &ndash;; the last section lists each one and why.</p>"))]

    t1 = t("table1_baseline")
    body = _explain("Per cohort: good responders (TRG 0-1) vs poor responders (TRG 2-3); mean &plusmn; SD, "
                    "median [IQR] or n (%), and the test behind each p-value.")
    if t1 is not None and "cohort" in t1:
        for c in _ordered(t1["cohort"]):
            body += f"<h4>{html.escape(_label(c))}</h4>" + _table(t1[t1["cohort"].astype(str) == c], {
                "variable": "Variable", "level": "Level", "good_response": "Good response",
                "poor_response": "Poor response", "p_value": "p", "test": "Test"},
                {"variable": "text", "level": "label", "good_response": "text", "poor_response": "text",
                 "p_value": "p", "test": "label"}, note=True)
    else:
        body += _na(inp.why("table1_baseline") if t1 is None else "tables/table1_baseline.csv has no cohort column")
    sections.append(_section("table1", "Table 1. Baseline characteristics by response", body))

    sections.append(_section("table2", "Table 2. Clinical-radiological predictors (training cohort)", _explain(
        "Odds ratios (per unit) of good response from univariate logistic regression; candidates with p &lt; 0.10 "
        "enter one multivariable model; highlighted rows are the independent predictors (p &lt; 0.05 there) used by "
        "CR and CRD.") + _table(t("table2_odds_ratios"), {
            "predictor": "Predictor", "uni_or": "OR", "uni_lo": "95% CI low", "uni_hi": "95% CI high", "uni_p": "p",
            "multi_or": "adjusted OR", "multi_lo": "adj. 95% CI low", "multi_hi": "adj. 95% CI high",
            "multi_p": "p (adj.)", "selected": "selected", "uni_method": "fit", "uni_converged": "converged",
            "multi_converged": "adj. converged"},
            {"predictor": "text", "uni_or": "or", "uni_lo": "or", "uni_hi": "or", "uni_p": "p", "multi_or": "or",
             "multi_lo": "or", "multi_hi": "or", "multi_p": "p", "selected": "bool", "uni_method": "label",
             "uni_converged": "label", "multi_converged": "label"},
            highlight="selected", why=inp.why("table2_odds_ratios"), note=True)))

    bound = "auc_bound" in perf and bool(pd.to_numeric(perf["auc_bound"], errors="coerce").notna().any())
    body = _explain("Discrimination (AUC with DeLong 95% CI) and accuracy, sensitivity, specificity and F1 at the "
                    "probability threshold shown; good = good responders (the positives), poor = poor responders."
                    + (" The AUC is computed by the sites from fine-grid histograms of the scores; <i>grid bound</i> "
                       "is the most it can differ from the AUC of the exact scores (good-poor pairs sharing a grid "
                       "cell count one half; 0 = no such pair)." if bound else ""))
    cols3 = {"model": "Model", "n_pos": "good", "n_neg": "poor", "auc": "AUC", "auc_lo": "95% CI low",
             "auc_hi": "95% CI high", **({"auc_bound": "grid bound"} if bound else {}), "accuracy": "Accuracy",
             "sensitivity": "Sensitivity", "specificity": "Specificity", "f1": "F1", "threshold": "Threshold"}
    for c in _ordered(perf["cohort"]):
        body += f"<h4>{html.escape(_label(c))}</h4>" + _table(perf[perf["cohort"].astype(str) == c], cols3,
            {"model": "text", "n_pos": "int", "n_neg": "int", "threshold": "g", "auc_bound": "g"}, note=True)
    sections.append(_section("table3", "Table 3. Model performance per cohort", body))

    sections.append(_section("delong", "DeLong tests between models", _explain(
        "Two-sided p-values of the paired DeLong test that two models' AUCs are equal, per cohort (models in rows "
        "and columns).") + _delong(t("delong"), inp.why("delong"))))

    sections.append(_section("calibration", "Calibration", _explain(
        "Brier score (mean squared error of the probabilities, lower is better), expected calibration error "
        "(ECE), calibration slope and intercept (logistic recalibration; ideal 1 and 0).") + _table(
        t("calibration"), {"model": "Model", "cohort": "Cohort", "brier": "Brier", "ece": "ECE", "slope": "Slope",
                           "intercept": "Intercept"}, {"model": "text", "cohort": "text"},
        why=inp.why("calibration"), note=True)))

    drawn = ("" if shown == models else
             f" The figures draw {', '.join(shown)}; the other {len(models) - len(shown)} models are in the tables.")
    sections.append(_section("figures", "Figures", _explain(
        "ROC curves with pointwise 95% bands; calibration (observed vs predicted per bin, marker area ~ patients in "
        "the bin); decision curves (net benefit against the threshold probability at which one would act); the "
        "signatures' distributions in good and poor responders." + html.escape(drawn)) +
        "<h3>ROC curves</h3>" + fig_block("roc", "ROC curves with pointwise 95% bands") +
        "<h3>Calibration curves</h3>" + fig_block("calibration", "Calibration (marker area ~ patients per bin)") +
        "<h3>Decision curves</h3>" + fig_block("decision", "Decision curves") +
        "<h3>Signature distributions</h3>" +
        fig_block("signatures", "Signature distributions by response (from pooled histograms)")))

    sections.append(_section("per_site", "Per-site view", _explain(
        "Each model on each site's own held-out patients (external sites: all their patients), to spot a site "
        "where a model fails; the dashed line is chance.") +
        (_img(figs["per_site_auc"], "AUC with 95% CI per site") if "per_site_auc" in figs
         else _na(fig_why.get("per_site", "no per-site AUC"))) +
        _table(t("per_site"), {"model": "Model", "site": "Site", "role": "Role", "split": "Split", "n_pos": "good",
                               "n_neg": "poor", "auc": "AUC", "auc_lo": "95% CI low", "auc_hi": "95% CI high",
                               "accuracy": "Accuracy", "sensitivity": "Sensitivity", "specificity": "Specificity",
                               "f1": "F1"},
               {"model": "text", "site": "text", "role": "text", "split": "text", "n_pos": "int", "n_neg": "int"},
               why=inp.why("per_site"), note=True)))

    fm = t("fusion_models")
    fcols = {"model": "Model", "inputs": "Inputs", "C": "C", "gamma": "gamma", "n_components": "RFF components",
             "cv_auc": "CV AUC", "platt_a": "Platt A", "platt_b": "Platt B", "converged": "converged",
             "iterations": "Newton iterations", "grad_norm": "final gradient norm",
             "platt_converged": "Platt converged", "cv_fits_converged": "CV fits converged", "rounds": "Rounds",
             "bytes_per_site": "Bytes per site"}
    fkinds = {"model": "text", "inputs": "text", "C": "g", "gamma": "g", "n_components": "int", "rounds": "int",
              "bytes_per_site": "int", "converged": "label", "iterations": "int", "grad_norm": "g",
              "platt_converged": "label", "cv_fits_converged": "label"}
    ref_note = ""
    if fm is not None:
        fm = fm.copy()
        fcols = {c: h for c, h in fcols.items() if c == "model" or c in fm}  # a wide table: only what the run has
        if "inputs" in fm:
            fm["inputs"] = fm["inputs"].map(lambda s: s if _missing(s) else str(s).replace(";", ", "))
        refs = [c for c in fm.columns if c.startswith("ref_")]
        if refs and fm[refs].notna().any().any():
            for c in refs:
                fcols[c] = {"ref_C": "ref C", "ref_gamma": "ref gamma", "ref_cv_auc": "ref CV AUC"}.get(
                    c, "ref AUC " + _label(c[len("ref_auc_"):]) if c.startswith("ref_auc_") else c)
            fkinds.update({"ref_C": "g", "ref_gamma": "g"})
            ref_note = (" Columns <i>ref</i>: scikit-learn's SVC fitted on the pooled rows (simulation only), the "
                        "reference the federated fit should approach.")
        else:
            ref_note = " Pooled reference: not available (not run; a deployment never pools rows)."
    shap_figs = "".join(_img(p, f"{k[5:]}: mean |SHAP| per input over the training cohort, summed at the sites")
                        for k, p in figs.items() if k.startswith("shap_"))
    sections.append(_section("fusion", "Fusion models", _convergence_warning(t("table2_odds_ratios"), fm) + _explain(
        "Hyper-parameters chosen by federated 5-fold cross-validation (C, RBF gamma; CV AUC of out-of-fold decision "
        "values), random-Fourier-feature dimension, federated Platt scaling (A, B), message rounds and bytes each "
        "site sent." + ref_note) + _table(fm, fcols, fkinds, why=inp.why("fusion_models"), note=True) +
        "<h3>Global SHAP importance</h3>" + _explain(
            "Mean absolute SHAP value of each input on the predicted probability: how much the model leans on it.") +
        (shap_figs or _na(fig_why.get("shap", "no SHAP values")))))

    sections.append(_section("signatures", "Deep-learning signatures", _explain(
        "AUC (DeLong 95% CI) of each backbone's output alone, per site and pooled; bound: the certified largest "
        "difference from the AUC of the raw scores caused by the shared histogram grid.") + _table(
        t("signature_auc"), {"backbone": "Signature", "site": "Site", "split": "Split", "n_pos": "good",
                             "n_neg": "poor", "auc": "AUC", "lo": "95% CI low", "hi": "95% CI high",
                             "bound": "bound"},
        {"backbone": "text", "site": "text", "split": "text", "n_pos": "int", "n_neg": "int", "bound": "g"},
        why=inp.why("signature_auc"), note=True)))

    sections.append(_section("privacy", "Privacy", _privacy(run_dir)))
    sections.append(_section("disclosure", "Disclosure control", _explain(
        "Every number withheld or coarsened, by which site and why. A withheld number is never replaced by a "
        "guess.") + _disclosure(inp)))

    title = f"rectalfl report: {meta.get('name') or run_dir.name}"
    doc = PAGE.substitute(
        title=html.escape(title), css=CSS, generated=datetime.now(UTC).isoformat(timespec="seconds"),
        header=_header(meta, run_dir),
        nav="".join(f'<a href="#{sid}">{html.escape(tt.split(".")[0] if tt.startswith("Table") else tt)}</a>'
                    for sid, tt, _ in sections),
        sections="\n".join(s for _, _, s in sections))
    path = run_dir / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path
