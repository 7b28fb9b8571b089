"""Fusion models and the study's tables, from site-computed statistics only (no patient row leaves a site).

Every number comes from a site-computed protocol (:mod:`shared.stats.sitecomputed`): the sites
derive every intermediate quantity from securely aggregated totals and release only disclosure-
checked results; this module decides which questions to ask and turns the releases into tables.

Stages:

1. **Selection and Table 1.** Predictor selection (univariate p < 0.10 screening of each candidate on
   its own, Firth's penalty where a candidate separates, multivariable model, backward elimination to
   p < 0.05) on the training cohort; Table 1 (baseline characteristics by response) for every cohort.
2. **Fusion fits.** One federated RBF-SVM per model (FDL, the variants, CR, CRD), training cohort
   only: folds, kernel features, every Newton step, the CV choice of (C, gamma) and Platt scaling are
   derived on the sites (:mod:`shared.fusion`).
3. **Scoring.** The fitted models go to every site, which scores its patients with the models *it
   derived itself* (a model it did not derive is refused) and keeps the scores; the mean |SHAP| per
   input over the training cohort is one more site-computed query.
4. **Evaluation.** Per cohort one ROC query covers every model (AUC, DeLong CI, the DeLong matrix,
   released curve cells, decision curves at released edges); per model and cohort the threshold
   metrics and calibration; the same per site where the site's policy releases numbers about it alone.

Cohorts: ``training`` (training sites, train + val splits), ``internal_test`` (training sites, test
split), ``external`` (sites that never trained); each site maps a cohort to its own splits. Every
file lands in ``run_dir/tables`` and ``run_dir/report_data/curves.json`` (read by :mod:`server.report`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from server.evaluation import StatsRun, query_note
from shared.config import RectalFLConfig
from shared.stats.sc_classification import CalibrationSite, ThresholdMetricsSite
from shared.stats.sc_logistic import SelectionSite
from shared.stats.sc_roc import ROCSite
from shared.stats.sc_tableone import WITHHELD, TableOneSite
from shared.stats_driver import SiteQuery

logger = logging.getLogger(__name__)

TRAINING, INTERNAL, EXTERNAL = "training", "internal_test", "external"
COHORT_SPLITS = {TRAINING: ["train", "val"], INTERNAL: ["test"], EXTERNAL: ["external"]}
DISPLAY_BINS = 20
NORMAL = ("age", "hb")
CATEGORICAL = {"sex_male": [1.0, 0.0], "t_stage": [0.0, 1.0, 2.0, 3.0, 4.0], "n_stage": [0.0, 1.0, 2.0],
               "crm": [1.0, 0.0], "emvi": [1.0, 0.0]}

FusionTransport = Callable[[dict[str, Any]], dict[str, dict[str, Any]]]
"""Send fitted models to every site; ``{site: reply}`` (patients scored)."""


@dataclass
class FusionSpec:
    name: str
    inputs: list[str]
    kind: str  # "signatures" | "clinical" | "combined"


@dataclass
class Analysis:
    """What the analysis produced (also written to disk)."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    curves: dict[str, list] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    specs: list[FusionSpec] = field(default_factory=list)
    queries: list[SiteQuery] = field(default_factory=list)
    """Every query exactly as asked (tests check cohorts and sites)."""


def cohorts(roles: Mapping[str, str]) -> dict[str, list[str]]:
    train = sorted(s for s, r in roles.items() if r == "train")
    ext = sorted(s for s, r in roles.items() if r == "external")
    out = {TRAINING: train, INTERNAL: train}
    if ext:
        out[EXTERNAL] = ext
    return out


def fusion_specs(cfg: RectalFLConfig, selected: list[str]) -> list[FusionSpec]:
    """FDL, the study's variants (when ``fusion.variants``), CR and CRD (when predictors were selected)."""
    seqs, tps = cfg.data.sequences, cfg.data.timepoints
    sig = [f"{tp}_{s}" for s in seqs for tp in tps]
    specs = [FusionSpec("FDL", sig, "signatures")]
    if cfg.fusion.variants:
        if len(seqs) > 1:
            specs += [FusionSpec(f"FDL-{s.upper()}", [f"{tp}_{s}" for tp in tps], "signatures") for s in seqs]
            specs += [FusionSpec(f"FDL-{a.upper()}+{b.upper()}", [f"{tp}_{s}" for s in (a, b) for tp in tps],
                                 "signatures") for a, b in combinations(seqs, 2) if len(seqs) > 2]
        if len(tps) > 1:
            specs += [FusionSpec(f"FDL-{tp}", [f"{tp}_{s}" for s in seqs], "signatures") for tp in tps]
            if set(tps) == {"pre", "post"}:
                specs.append(FusionSpec("FDL+delta", sig + [f"delta_{s}" for s in seqs], "signatures"))
    if selected:
        specs.append(FusionSpec("CR", list(selected), "clinical"))
        specs.append(FusionSpec("CRD", sig + list(selected), "combined"))
    return specs


def clinical_grid() -> list[float]:
    """A grid for clinical values agreed without seeing them: 0 and two significant digits on
    +-[0.001, 990 000] (1 621 edges; medians and quartiles are interpolated within a bin)."""
    mags = np.arange(10, 100) / 10.0
    pos = np.unique(np.concatenate([mags * 10.0 ** e for e in range(-3, 6)]))
    return [*(-pos[::-1]).tolist(), 0.0, *pos.tolist()]


def table_one_variables(cfg: RectalFLConfig) -> list[dict[str, Any]]:
    """Table 1's variables: the declared clinical predictors, typed; grids are config, never data."""
    out = []
    grid = clinical_grid()
    for c in cfg.fusion.clinical_predictors:
        if c in CATEGORICAL:
            out.append({"name": c, "kind": "categorical", "levels": CATEGORICAL[c]})
        else:
            out.append({"name": c, "kind": "normal" if c in NORMAL else "nonnormal", "edges": grid})
    return out


def display_curve(cells: Mapping[str, list]) -> dict[str, list]:
    """ROC points at the released cell edges (exact there): ``fpr, tpr`` from the top cell down."""
    pos = np.asarray(cells["n_pos"], dtype=float)
    neg = np.asarray(cells["n_neg"], dtype=float)
    n1, n0 = pos.sum(), neg.sum()
    tpr = np.concatenate([[0.0], np.cumsum(pos[::-1])]) / n1
    fpr = np.concatenate([[0.0], np.cumsum(neg[::-1])]) / n0
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def wilson(p: np.ndarray, n: int, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise Wilson 95% interval of a proportion ``p`` out of ``n``."""
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return np.clip(mid - half, 0, 1), np.clip(mid + half, 0, 1)


def suppressions(queries: list[SiteQuery]) -> pd.DataFrame:
    """Every number disclosure control withheld or coarsened, every refusal, dropout and failure."""
    rows = []
    for q in queries:
        rel = q.released or {}
        for w in rel.get("withheld", []):
            if isinstance(w, Mapping):
                rows.append({"quantity": q.qid, "site": "", "reason": f"{w.get('quantity', '')}: "
                                                                     f"{w.get('reason', '')}"})
        inc = rel.get("sites_included")
        if inc is not None and inc < len(q.participants):
            rows.append({"quantity": q.qid, "site": "", "reason": f"{len(q.participants) - inc} site(s) excluded: "
                                                                 "fewer than k patients of a class of their own"})
        for s, r in sorted(q.refused.items()):
            rows.append({"quantity": q.qid, "site": s, "reason": f"refused by site policy ({r.get('rule')})"})
        for s in (x for x in q.dropped if x not in q.refused):
            rows.append({"quantity": q.qid, "site": s, "reason": f"left out: {q.failures.get(s) or 'stopped answering'}"})
        if q.error and not q.refused and not q.ok:
            rows.append({"quantity": q.qid, "site": "", "reason": f"not computed: {q.error}"})
    df = pd.DataFrame(rows, columns=["quantity", "site", "reason"])
    return df.drop_duplicates().reset_index(drop=True)


# --------------------------------------------------------------------------- tables from releases
def table1_rows(q: SiteQuery, cohort: str) -> list[dict[str, Any]]:
    note = query_note(q)
    res = q.result if q.ok else None
    if res is None:
        return [{"cohort": cohort, "variable": "", "level": "", "good_response": "", "poor_response": "",
                 "p_value": np.nan, "test": "", "note": note or "withheld"}]
    t, tests = res.table, res.tests
    rows, var = [], ""
    for i, (label, r) in enumerate(t.iterrows()):
        label = str(label)
        if label.startswith("  "):
            level, variable = label.strip(), var
        else:
            var, variable, level = label, label, ""
        base = variable.split(",")[0]
        p = float(tests.loc[base, "p"]) if base in tests.index and not level else np.nan
        rows.append({"cohort": cohort, "variable": variable, "level": level, "good_response": r.get("1", ""),
                     "poor_response": r.get("0", ""), "p_value": p, "test": r.get("test", ""),
                     "note": note if i == 0 else ""})
    return rows


def table2(q: SiteQuery) -> pd.DataFrame:
    cols = ["predictor", "uni_or", "uni_lo", "uni_hi", "uni_p", "uni_method", "uni_converged", "multi_or",
            "multi_lo", "multi_hi", "multi_p", "multi_method", "multi_converged", "selected", "note"]
    if not q.ok:
        return pd.DataFrame([{"predictor": "", "note": query_note(q) or "not computed"}], columns=cols)
    sel = q.result
    final = sel.models[-1] if sel.models else None
    final_fit = sel.fits[-1] if sel.fits else {}
    rows = []
    for term, r in sel.univariate.iterrows():
        row = {"predictor": term, "uni_or": r["odds_ratio"], "uni_lo": r["or_lo"], "uni_hi": r["or_hi"],
               "uni_p": r["p"], "uni_method": r.get("method", ""), "uni_converged": r.get("converged", ""),
               "selected": term in sel.selected, "note": r.get("note", "") if isinstance(r.get("note"), str) else ""}
        if final is not None and term in final.index:
            m = final.loc[term]
            row.update(multi_or=m["odds_ratio"], multi_lo=m["or_lo"], multi_hi=m["or_hi"], multi_p=m["p"],
                       multi_method=final_fit.get("method", ""), multi_converged=final_fit.get("converged", ""))
        rows.append(row)
    out = pd.DataFrame(rows, columns=cols)
    if len(out):
        note = query_note(q)
        out.loc[0, "note"] = "; ".join(n for n in (out.loc[0, "note"], note) if n)
    return out


# --------------------------------------------------------------------------- the analysis
def run_analysis(run_stats: StatsRun, fusion_transport: FusionTransport, cfg: RectalFLConfig,
                 roles: Mapping[str, str], out_dir: Path | None = None, *,
                 reference: Callable[[FusionSpec], dict[str, Any]] | None = None,
                 progress: Callable[[str], None] | None = None) -> Analysis:
    """Run stages 1-4 (module docstring) through ``run_stats``; write tables if ``out_dir`` is given.

    ``reference(spec)`` (simulation only) fits the pooled scikit-learn reference on the same rows
    and returns ``{"C", "gamma", "cv_auc"}`` plus ``{cohort: auc}``.
    """
    from server.fusion_fit import fit_models, shap_table

    say = progress or (lambda s: logger.info(s))
    groups = cohorts(roles)
    train_sites = groups[TRAINING]
    res = Analysis()

    # 1. selection + Table 1
    say("selecting clinical predictors and building Table 1")
    preds = list(cfg.fusion.clinical_predictors)
    q_sel = SiteQuery("select", SelectionSite(preds, cfg.fusion.p_univariate, cfg.fusion.p_multivariate), TRAINING,
                      preds, train_sites)
    q_t1 = {c: SiteQuery(f"table1.{c}", TableOneSite(table_one_variables(cfg), group_labels=["0", "1"]), c, preds,
                         sites) for c, sites in groups.items()}
    run_stats([q_sel, *q_t1.values()])
    res.queries += [q_sel, *q_t1.values()]
    selected = list(q_sel.result.selected) if q_sel.ok else []
    if not q_sel.ok:
        logger.warning("predictor selection not available (%s); CR and CRD are not fitted", query_note(q_sel))
    res.tables["table1_baseline"] = pd.DataFrame(
        [r for c, q in q_t1.items() for r in table1_rows(q, c)],
        columns=["cohort", "variable", "level", "good_response", "poor_response", "p_value", "test", "note"])
    res.tables["table2_odds_ratios"] = table2(q_sel)

    # 2. fusion fits (training cohort only)
    res.specs = fusion_specs(cfg, selected)
    say(f"fitting {len(res.specs)} fusion model(s) by federated cross-validation")
    models, fit_rows, fit_queries = fit_models(run_stats, res.specs, cfg, train_sites, groups.get(EXTERNAL, []),
                                               reference=reference)
    res.models = models
    res.queries += fit_queries
    res.tables["fusion_models"] = pd.DataFrame(fit_rows)

    # 3. scoring on site, SHAP sums
    if models:
        say("scoring every patient on site with the fusion models")
        replies = fusion_transport(models)
        missing = sorted(set(roles) - set(replies))
        if missing:
            logger.warning("site(s) %s did not score the fusion models; they are missing from the evaluation", missing)
    shap, shap_queries = shap_table(run_stats, models, train_sites)
    res.tables["shap_importance"] = shap
    res.queries += shap_queries

    # 4. evaluation
    say("evaluating models per cohort and per site")
    names = [s.name for s in res.specs if s.name in models]
    _evaluate(run_stats, res, names, groups, roles, cfg)
    res.tables["suppressions"] = suppressions(res.queries)
    if out_dir is not None:
        write_outputs(res, Path(out_dir))
    return res


def _evaluate(run_stats: StatsRun, res: Analysis, names: list[str], groups: dict[str, list[str]],
              roles: Mapping[str, str], cfg: RectalFLConfig) -> None:
    col = {m: f"fusion_{m}" for m in names}
    thr = round(float(cfg.fusion.threshold), 2)
    sig_cols = fusion_specs(cfg, [])[0].inputs
    q_roc, q_bin, q_cal, q_sig = {}, {}, {}, {}
    for c, sites in groups.items():
        if names:
            q_roc[c] = SiteQuery(f"roc.{c}", ROCSite([col[m] for m in names], display_bins=DISPLAY_BINS), c,
                                 [col[m] for m in names], sites)
        for m in names:
            q_bin[(m, c)] = SiteQuery(f"bin.{m}.{c}", ThresholdMetricsSite(col[m], thr), c, [col[m]], sites)
            q_cal[(m, c)] = SiteQuery(f"cal.{m}.{c}", CalibrationSite(col[m]), c, [col[m]], sites)
        q_sig[c] = SiteQuery(f"sigdist.{c}", ROCSite(sig_cols, display_bins=DISPLAY_BINS), c, sig_cols, sites)
    q_site_roc, q_site_bin = {}, {}
    for site, role in sorted(roles.items()):
        c = EXTERNAL if role == "external" else INTERNAL
        if names:
            q_site_roc[site] = SiteQuery(f"site.roc.{site}", ROCSite([col[m] for m in names]), c,
                                         [col[m] for m in names], [site])
        for m in names:
            q_site_bin[(m, site)] = SiteQuery(f"site.bin.{m}.{site}", ThresholdMetricsSite(col[m], thr), c, [col[m]],
                                              [site])
    allq = [*q_roc.values(), *q_bin.values(), *q_cal.values(), *q_sig.values(), *q_site_roc.values(),
            *q_site_bin.values()]
    run_stats(allq)
    res.queries += allq

    perf, cal, dl, site_rows = [], [], [], []
    curves: dict[str, list] = {"roc": [], "calibration": [], "decision": [], "distributions": []}
    for c in groups:
        qr = q_roc.get(c)
        roc = qr.result if qr is not None and qr.ok else None
        dec: dict[str, Any] = {"cohort": c, "models": {}}
        for m in names:
            qb, qc = q_bin[(m, c)], q_cal[(m, c)]
            row = _perf_row(m, c, roc, col[m], qb, thr,
                            [query_note(qr, col[m], curves=False) if qr else "", query_note(qb)])
            perf.append(row)
            if roc is not None and col[m] in roc.aucs and col[m] in roc.curves:
                a = roc.aucs[col[m]]
                pts = display_curve(roc.curves[col[m]])
                lo, hi = wilson(np.asarray(pts["tpr"]), int(a.n_pos))
                curves["roc"].append({"model": m, "cohort": c, **pts, "tpr_lo": lo.tolist(), "tpr_hi": hi.tolist(),
                                      "auc": a.auc, "auc_lo": a.lo, "auc_hi": a.hi})
                nb = roc.net_benefit(col[m])
                dec["models"][m] = {"thresholds": nb["threshold"].tolist(), "net_benefit": nb["model"].tolist(),
                                    "treat_all": nb["treat_all"].tolist()}
            crow: dict[str, Any] = {"model": m, "cohort": c, "brier": np.nan, "ece": np.nan, "slope": np.nan,
                                    "intercept": np.nan, "converged": "", "note": query_note(qc)}
            if qc.ok and qc.result.result is not None:
                r = qc.result.result
                crow.update(brier=r.brier, ece=r.ece, slope=r.slope, intercept=r.intercept,
                            converged=all(f.get("converged", False) for f in qc.result.fits.values()))
                bins = r.bins[r.bins["count"] > 0]
                curves["calibration"].append({"model": m, "cohort": c,
                                              "mean_predicted": bins["mean_predicted"].tolist(),
                                              "observed": bins["observed_rate"].tolist(), "n": bins["count"].tolist()})
            cal.append(crow)
        if dec["models"]:
            curves["decision"].append(dec)
        for a, b in combinations(names, 2):
            row = {"cohort": c, "model_a": a, "model_b": b, "auc_a": np.nan, "auc_b": np.nan, "diff": np.nan,
                   "p": np.nan, "note": query_note(qr, curves=False) if qr else ""}
            if roc is not None and col[a] in roc.aucs and col[b] in roc.aucs:
                r = roc.delong(col[a], col[b])
                row.update(auc_a=r.auc_a, auc_b=r.auc_b, diff=r.diff, p=r.p)
            dl.append(row)
        qs = q_sig[c]
        if qs.ok:
            for sig in sig_cols:
                cells = qs.result.curves.get(sig)
                if cells:
                    curves["distributions"].append({"signature": sig, "cohort": c,
                                                    "edges": [*cells["lo"], cells["hi"][-1]],
                                                    "good": cells["n_pos"], "poor": cells["n_neg"]})
    for site, role in sorted(roles.items()):
        qr = q_site_roc.get(site)
        roc = qr.result if qr is not None and qr.ok else None
        for m in names:
            qb = q_site_bin[(m, site)]
            row = _perf_row(m, "", roc, col[m], qb, thr,
                            [query_note(qr, col[m], curves=False) if qr else "", query_note(qb)])
            row.pop("cohort")
            site_rows.append({"model": m, "site": site, "role": role,
                              "split": "external" if role == "external" else "test", **row})
    res.tables["table3_performance"] = pd.DataFrame(perf)
    res.tables["calibration"] = pd.DataFrame(cal)
    res.tables["delong"] = pd.DataFrame(dl, columns=["cohort", "model_a", "model_b", "auc_a", "auc_b", "diff", "p",
                                                     "note"])
    res.tables["per_site"] = pd.DataFrame(site_rows)
    res.curves = curves


def _perf_row(m: str, c: str, roc: Any, column: str, qb: SiteQuery, thr: float, notes: list[str]) -> dict[str, Any]:
    """One Table 3 row. The AUC and the threshold metrics describe the same fixed patient set (the
    site's complete-case set of that cohort); ``n_pos``/``n_neg`` are that set's."""
    row: dict[str, Any] = {"model": m, "cohort": c, "n_pos": 0, "n_neg": 0, "auc": np.nan, "auc_lo": np.nan,
                           "auc_hi": np.nan, "auc_bound": np.nan, "accuracy": np.nan, "sensitivity": np.nan,
                           "specificity": np.nan, "f1": np.nan, "threshold": thr, "approx": False,
                           "note": "; ".join(dict.fromkeys(n for n in notes if n))}
    if roc is not None and column in roc.aucs:
        a = roc.aucs[column]
        row.update(n_pos=int(a.n_pos), n_neg=int(a.n_neg), auc=a.auc, auc_lo=a.lo, auc_hi=a.hi,
                   auc_bound=float(roc.tie_bound.get(column, np.nan)))
    if qb.ok and qb.result.metrics is not None:
        b = qb.result.metrics
        row.update(accuracy=b.accuracy, sensitivity=b.sensitivity, specificity=b.specificity, f1=b.f1,
                   approx=bool(qb.result.approx))
        if roc is None or column not in roc.aucs:
            row.update(n_pos=int(b.tp + b.fn), n_neg=int(b.tn + b.fp))
        elif not row["approx"] and (int(b.tp + b.fn), int(b.tn + b.fp)) != (row["n_pos"], row["n_neg"]):
            row["note"] = "; ".join(n for n in (row["note"], (
                f"accuracy, sensitivity, specificity and F1 describe {int(b.tp + b.fn)} good / {int(b.tn + b.fp)} "
                f"poor responders, the AUC {row['n_pos']} / {row['n_neg']}: not the same patients")) if n)
    return row


def write_outputs(res: Analysis, out_dir: Path) -> list[Path]:
    """``tables/<name>.csv`` for every table and ``report_data/curves.json``; returns the paths."""
    from shared.fusion import models_to_payload

    paths = []
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    for name, df in res.tables.items():
        p = out_dir / "tables" / f"{name}.csv"
        df.to_csv(p, index=False)
        paths.append(p)
    (out_dir / "report_data").mkdir(parents=True, exist_ok=True)
    p = out_dir / "report_data" / "curves.json"
    p.write_text(json.dumps(res.curves, default=float))
    paths.append(p)
    mdir = out_dir / "models"
    mdir.mkdir(parents=True, exist_ok=True)
    arrays, columns = models_to_payload(res.models)
    np.savez(mdir / "fusion.npz", **arrays)
    (mdir / "fusion.json").write_text(json.dumps({"columns": columns, "specs": [s.__dict__ for s in res.specs]},
                                                 indent=2))
    paths += [mdir / "fusion.npz", mdir / "fusion.json"]
    return paths


__all__ = ["WITHHELD", "Analysis", "FusionSpec", "cohorts", "fusion_specs", "run_analysis", "write_outputs"]
