"""Fusion models and the study's tables, from federated queries only (no patient row leaves a site).

Stages (each a batch of :mod:`shared.queries` queries answered by the sites' own tables):

1. **Selection and Table 1.** Predictor selection (univariate p < 0.10, multivariable p < 0.05) on
   the training cohort; Table 1 (baseline characteristics by response) for every cohort.
2. **Fusion fits.** One federated RFF-SVM per model (:mod:`shared.fusion`): FDL (all signatures),
   the variants, CR (selected predictors) and CRD (signatures + selected predictors). Only the
   training cohort takes part: the training sites' train/val splits.
3. **Scoring.** The fitted models go to every site, which scores its patients and keeps the scores
   (and per-patient SHAP values); only sums of |SHAP| over the training cohort come back.
4. **Evaluation.** Per model and cohort: AUC with DeLong CI and the ROC curve, accuracy,
   sensitivity, specificity, F1 at ``fusion.threshold``, calibration, decision curve; the DeLong
   matrix between models; the same per site; the signatures' distributions by response.

Cohorts: ``training`` (training sites, train + val splits), ``internal_test`` (training sites, test
split), ``external`` (sites that never trained). Every file lands in ``run_dir/tables`` and
``run_dir/report_data/curves.json`` (the formats :mod:`server.report` reads).
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

from shared.config import RectalFLConfig
from shared.fusion import FusionSVMProtocol, SVMModel, models_to_payload
from shared.queries import Query, Transport, run_queries, table_spec_to_json
from shared.stats import (
    BinaryMetricsProtocol,
    CalibrationProtocol,
    Grid,
    NetBenefitProtocol,
    ROCProtocol,
    SelectPredictorsProtocol,
    TableOneProtocol,
    TableSpec,
)
from shared.stats.histogram import Cells

logger = logging.getLogger(__name__)

TRAINING, INTERNAL, EXTERNAL = "training", "internal_test", "external"
COHORT_SPLITS = {TRAINING: ["train", "val"], INTERNAL: ["test"], EXTERNAL: ["external"]}
NET_BENEFIT_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)
DISPLAY_BINS = 20
NORMAL = ("age", "hb")
CATEGORICAL = {"sex_male": [1.0, 0.0], "t_stage": [0.0, 1.0, 2.0, 3.0, 4.0], "n_stage": [0.0, 1.0, 2.0],
               "crm": [1.0, 0.0], "emvi": [1.0, 0.0]}

FusionTransport = Callable[[dict[str, SVMModel]], dict[str, dict[str, Any]]]
"""Send fitted models to every site; ``{site: reply values}`` (SHAP sums, counts)."""


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
    models: dict[str, SVMModel] = field(default_factory=dict)
    specs: list[FusionSpec] = field(default_factory=list)
    fit_queries: list[Query] = field(default_factory=list)
    """The fusion-fit queries exactly as sent (tests check which splits and sites they named)."""


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


def _wide_grid() -> Grid:
    """A grid for clinical values agreed without seeing them: 3 significant digits on +-[1e-3, 1e6]."""
    mags = np.arange(100, 1000) / 100.0
    pos = np.unique(np.concatenate([mags * 10.0 ** e for e in range(-3, 7)]))
    return Grid.from_edges(np.concatenate([-pos[::-1], [0.0], pos]))


def table_one_spec(cfg: RectalFLConfig) -> TableSpec:
    cols = [c for c in cfg.fusion.clinical_predictors]
    nonnormal = tuple(c for c in cols if c not in NORMAL and c not in CATEGORICAL)
    grid = _wide_grid()
    return TableSpec("label", (1, 0), tuple(cols), {c: v for c, v in CATEGORICAL.items() if c in cols}, nonnormal,
                     dict.fromkeys(nonnormal, grid))


# --------------------------------------------------------------------------- ROC with curve and histogram
class CurveROCProtocol(ROCProtocol):
    """``roc`` on the wire; also keeps the pooled ROC curve and the class histograms of round 1."""

    def _round1(self, summaries: Mapping[str, Any]) -> Any:
        res = super()._round1(summaries)
        pos, neg = self.cells[0]["pos"], self.cells[0]["neg"]
        b = np.arange(self.grid.n_bins + 1)
        tp_s, tp_p = pos.at_or_above(np.minimum(b, self.grid.n_bins - 1))
        fp_s, fp_p = neg.at_or_above(np.minimum(b, self.grid.n_bins - 1))
        tp_s[-1] = tp_p[-1] = fp_s[-1] = fp_p[-1] = 0.0
        tpr, fpr = (tp_s + tp_p) / 2 / self.n1, (fp_s + fp_p) / 2 / self.n0
        pts = np.unique(np.column_stack([fpr, tpr]), axis=0)
        self.curve = {"fpr": pts[:, 0], "tpr": pts[:, 1]}
        self.hist = {"pos": display_counts(pos, self.grid), "neg": display_counts(neg, self.grid)}
        return res


def display_counts(cells: Cells, grid: Grid, n_display: int = DISPLAY_BINS) -> np.ndarray:
    """Counts on ``n_display`` equal bins of [0, 1], each cell spread evenly over its fine bins."""
    fine = np.zeros(cells.n_bins)
    for a, z, c in zip(cells.start, cells.stop, cells.count, strict=True):
        fine[a:z] += c / (z - a)
    idx = np.clip((grid.points * n_display).astype(int), 0, n_display - 1)
    return np.bincount(idx, weights=fine, minlength=n_display)


def wilson(p: np.ndarray, n: int, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise Wilson 95% interval of a proportion ``p`` out of ``n``."""
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return np.clip(mid - half, 0, 1), np.clip(mid + half, 0, 1)


# --------------------------------------------------------------------------- helpers
def _note(q: Query) -> str:
    notes = list(dict.fromkeys(f"{s.site}: {s.reason}" for s in q.suppressed))
    if q.dropped:
        notes.append(f"without {', '.join(q.dropped)} (no answer)")
    if q.error:
        notes.append(q.error)
    return "; ".join(notes)


def _suppressions(queries: list[Query]) -> list[dict[str, str]]:
    rows = [{"quantity": q.qid, "site": s.site, "reason": s.reason} for q in queries for s in q.suppressed]
    rows += [{"quantity": q.qid, "site": ", ".join(q.dropped), "reason": "no answer (left out)"}
             for q in queries if q.dropped]
    rows += [{"quantity": q.qid, "site": "", "reason": f"not computed: {q.error}"} for q in queries if q.error]
    return [dict(t) for t in dict.fromkeys(tuple(r.items()) for r in rows)]


def _table1(q: Query, cohort: str) -> list[dict[str, Any]]:
    if q.final is None:
        return [{"cohort": cohort, "variable": "", "level": "", "good_response": "", "poor_response": "",
                 "p_value": np.nan, "test": "", "note": _note(q)}]
    t, tests = q.final.result.table, q.final.result.tests
    rows, var = [], ""
    for label, r in t.iterrows():
        label = str(label)
        if label.startswith("  "):
            level, variable = label.strip(), var
        else:
            var, variable, level = label, label, ""
        base = variable.split(",")[0]
        p = float(tests.loc[base, "p"]) if base in tests.index and not level else np.nan
        rows.append({"cohort": cohort, "variable": variable, "level": level, "good_response": r.get(1, r.get("1", "")),
                     "poor_response": r.get(0, r.get("0", "")), "p_value": p, "test": r.get("test", ""),
                     "note": _note(q) if label == "n" else ""})
    return rows


def _table2(q: Query) -> pd.DataFrame:
    cols = ["predictor", "uni_or", "uni_lo", "uni_hi", "uni_p", "multi_or", "multi_lo", "multi_hi", "multi_p",
            "selected", "note"]
    if q.final is None:
        return pd.DataFrame([{"predictor": "", "note": _note(q)}], columns=cols)
    sel = q.final.result
    rows = []
    for term, r in sel.univariate.iterrows():
        row = {"predictor": term, "uni_or": r["odds_ratio"], "uni_lo": r["or_lo"], "uni_hi": r["or_hi"],
               "uni_p": r["p"], "selected": term in sel.selected, "note": ""}
        if term in sel.multivariate.index:
            m = sel.multivariate.loc[term]
            row.update(multi_or=m["odds_ratio"], multi_lo=m["or_lo"], multi_hi=m["or_hi"], multi_p=m["p"])
        rows.append(row)
    out = pd.DataFrame(rows, columns=cols)
    if len(out):
        out.loc[0, "note"] = _note(q)
    return out


# --------------------------------------------------------------------------- the analysis
def run_analysis(transport: Transport, fusion_transport: FusionTransport, cfg: RectalFLConfig,
                 roles: Mapping[str, str], out_dir: Path | None = None, *,
                 reference: Callable[[FusionSpec], dict[str, Any]] | None = None,
                 progress: Callable[[str], None] | None = None) -> Analysis:
    """Run stages 1-4 (module docstring) through ``transport``; write tables if ``out_dir`` is given.

    ``reference(spec)`` (simulation only) fits the pooled scikit-learn reference on the same rows
    and returns ``{"C", "gamma", "cv_auc"}`` plus ``{cohort: auc}``.
    """
    say = progress or (lambda s: logger.info(s))
    k = cfg.privacy.min_cell_count
    groups = cohorts(roles)
    train_sites = groups[TRAINING]
    res = Analysis()
    all_q: list[Query] = []

    # 1. selection + Table 1
    say("selecting clinical predictors and building Table 1")
    preds = list(cfg.fusion.clinical_predictors)
    q_sel = Query("select", SelectPredictorsProtocol(preds, cfg.fusion.p_univariate, cfg.fusion.p_multivariate,
                                                     min_count=k), preds, COHORT_SPLITS[TRAINING], train_sites)
    tspec = table_one_spec(cfg)
    q_t1 = {c: Query(f"table1@{c}", TableOneProtocol(tspec, min_count=k), list(tspec.columns), COHORT_SPLITS[c],
                     sites, extra={"table": table_spec_to_json(tspec)}) for c, sites in groups.items()}
    run_queries([q_sel, *q_t1.values()], transport)
    all_q += [q_sel, *q_t1.values()]
    selected = list(q_sel.final.result.selected) if q_sel.final is not None else []
    if q_sel.final is None:
        logger.warning("predictor selection failed (%s); CR and CRD are not fitted", q_sel.error)
    res.tables["table1_baseline"] = pd.DataFrame(
        [r for c, q in q_t1.items() for r in _table1(q, c)],
        columns=["cohort", "variable", "level", "good_response", "poor_response", "p_value", "test", "note"])
    res.tables["table2_odds_ratios"] = _table2(q_sel)

    # 2. fusion fits (training cohort only)
    res.specs = fusion_specs(cfg, selected)
    say(f"fitting {len(res.specs)} fusion model(s) by federated cross-validation")
    fits = [Query(f"fit@{s.name}", FusionSVMProtocol(len(s.inputs), cfg.fusion.C_grid, cfg.fusion.gamma_factors,
                                                     cfg.fusion.n_components, cfg.split.cv_folds, cfg.seed,
                                                     loss=cfg.fusion.loss, huber_h=cfg.fusion.huber_h, min_count=k),
                  list(s.inputs), COHORT_SPLITS[TRAINING], train_sites) for s in res.specs]
    run_queries(fits, transport, max_rounds=400)
    res.fit_queries = fits
    all_q += fits
    fit_rows = []
    for s, q in zip(res.specs, fits, strict=True):
        row: dict[str, Any] = {"model": s.name, "inputs": ";".join(s.inputs), "C": np.nan, "gamma": np.nan,
                               "n_components": cfg.fusion.n_components, "cv_auc": np.nan, "platt_a": np.nan,
                               "platt_b": np.nan, "rounds": q.protocol.round, "bytes_per_site": np.nan,
                               "ref_C": np.nan, "ref_gamma": np.nan, "ref_cv_auc": np.nan, "note": _note(q)}
        if q.final is not None:
            m: SVMModel = q.final.result
            m.columns = list(s.inputs)
            res.models[s.name] = m
            row.update(C=m.C, gamma=m.gamma, cv_auc=m.cv_auc, platt_a=m.platt_a, platt_b=m.platt_b)
            withheld = int(q.final.bound.get("withheld_contributions", 0))
            if withheld:
                row["note"] = (row["note"] + "; " if row["note"] else "") + (
                    f"{withheld} site contribution(s) withheld by disclosure control (fit approximate)")
        if reference is not None:
            ref = reference(s)
            row.update(ref_C=ref.get("C"), ref_gamma=ref.get("gamma"), ref_cv_auc=ref.get("cv_auc"))
            for c in (INTERNAL, EXTERNAL):
                if c in ref:
                    row[f"ref_auc_{c}"] = ref[c]
        fit_rows.append(row)
    res.tables["fusion_models"] = pd.DataFrame(fit_rows)

    # 3. scoring on site
    shap_rows = []
    if res.models:
        say("scoring every patient on site with the fusion models")
        replies = fusion_transport(res.models)
        for name, m in res.models.items():
            sums = [v for v in replies.values() if not int(v.get(f"{name}|withheld", 0))]
            n = sum(int(v.get(f"{name}|n", 0)) for v in sums)
            held = sorted(s for s, v in replies.items() if int(v.get(f"{name}|withheld", 0)))
            note = f"withheld by {', '.join(held)} (fewer than {k} patients)" if held else ""
            tot = sum(np.asarray(v[f"{name}|abs_shap"], dtype=float) for v in sums if f"{name}|abs_shap" in v)
            for j, col in enumerate(m.columns):
                shap_rows.append({"model": name, "feature": col,
                                  "mean_abs_shap": float(tot[j]) / n if n else np.nan, "n_patients": n, "note": note})
        missing = sorted(set(roles) - set(replies))
        if missing:
            logger.warning("site(s) %s did not score the fusion models; they are missing from the evaluation", missing)
    res.tables["shap_importance"] = pd.DataFrame(shap_rows, columns=["model", "feature", "mean_abs_shap",
                                                                     "n_patients", "note"])

    # 4. evaluation
    say("evaluating models per cohort and per site")
    models = [s.name for s in res.specs if s.name in res.models]
    col = {m: f"fusion_{m}" for m in models}
    ev: dict[tuple, Query] = {}

    def add(kind: str, key: tuple, proto: Any, columns: list[str], splits: list[str], sites: list[str]) -> None:
        ev[(kind, *key)] = Query("@".join([kind, *key]), proto, columns, splits, sites)

    for c, sites in groups.items():
        for m in models:
            add("roc", (m, c), CurveROCProtocol(1, min_count=k), [col[m]], COHORT_SPLITS[c], sites)
            add("bin", (m, c), BinaryMetricsProtocol(cfg.fusion.threshold, min_count=k), [col[m]], COHORT_SPLITS[c], sites)
            add("cal", (m, c), CalibrationProtocol(min_count=k), [col[m]], COHORT_SPLITS[c], sites)
            add("dca", (m, c), NetBenefitProtocol(NET_BENEFIT_THRESHOLDS, min_count=k), [col[m]], COHORT_SPLITS[c],
                sites)
        for a, b in combinations(models, 2):
            add("delong", (a, b, c), ROCProtocol(2, output="delong", min_count=k), [col[a], col[b]],
                COHORT_SPLITS[c], sites)
        for sig in fusion_specs(cfg, [])[0].inputs:
            add("sig", (sig, c), CurveROCProtocol(1, min_count=k), [sig], COHORT_SPLITS[c], sites)
    for site, role in sorted(roles.items()):
        split = ["external"] if role == "external" else ["test"]
        for m in models:
            add("site_roc", (m, site), ROCProtocol(1, min_count=k), [col[m]], split, [site])
            add("site_bin", (m, site), BinaryMetricsProtocol(cfg.fusion.threshold, min_count=k), [col[m]], split,
                [site])
    run_queries(list(ev.values()), transport)
    all_q += list(ev.values())
    _evaluation_tables(res, ev, groups, models, roles, cfg)
    res.tables["suppressions"] = pd.DataFrame(_suppressions(all_q), columns=["quantity", "site", "reason"])
    if out_dir is not None:
        write_outputs(res, Path(out_dir))
    return res


def _evaluation_tables(res: Analysis, ev: dict[tuple, Query], groups: dict[str, list[str]], models: list[str],
                       roles: Mapping[str, str], cfg: RectalFLConfig) -> None:
    perf, cal, dl, site_rows = [], [], [], []
    curves: dict[str, list] = {"roc": [], "calibration": [], "decision": [], "distributions": []}
    for c in groups:
        dec: dict[str, Any] = {"cohort": c, "thresholds": NET_BENEFIT_THRESHOLDS.tolist(), "treat_all": [],
                               "models": {}}
        for m in models:
            qr, qb, qc, qd = ev[("roc", m, c)], ev[("bin", m, c)], ev[("cal", m, c)], ev[("dca", m, c)]
            row: dict[str, Any] = {"model": m, "cohort": c, "n_pos": 0, "n_neg": 0, "accuracy": np.nan,
                                   "auc": np.nan, "auc_lo": np.nan, "auc_hi": np.nan, "sensitivity": np.nan,
                                   "specificity": np.nan, "f1": np.nan, "threshold": cfg.fusion.threshold,
                                   "note": "; ".join(n for n in (_note(qr), _note(qb)) if n)}
            if qr.final is not None:
                r = qr.final.result
                row.update(n_pos=r.n_pos, n_neg=r.n_neg, auc=r.auc, auc_lo=r.lo, auc_hi=r.hi)
                lo, hi = wilson(qr.protocol.curve["tpr"], r.n_pos)
                curves["roc"].append({"model": m, "cohort": c, "fpr": qr.protocol.curve["fpr"].tolist(),
                                      "tpr": qr.protocol.curve["tpr"].tolist(), "tpr_lo": lo.tolist(),
                                      "tpr_hi": hi.tolist(), "auc": r.auc, "auc_lo": r.lo, "auc_hi": r.hi})
            if qb.final is not None:
                b = qb.final.result
                row.update(accuracy=b.accuracy, sensitivity=b.sensitivity, specificity=b.specificity, f1=b.f1)
            perf.append(row)
            crow = {"model": m, "cohort": c, "brier": np.nan, "ece": np.nan, "slope": np.nan, "intercept": np.nan,
                    "note": _note(qc)}
            if qc.final is not None:
                r = qc.final.result
                crow.update(brier=r.brier, ece=r.ece, slope=r.slope, intercept=r.intercept)
                bins = r.bins[r.bins["count"] > 0]
                curves["calibration"].append({"model": m, "cohort": c,
                                              "mean_predicted": bins["mean_predicted"].tolist(),
                                              "observed": bins["observed_rate"].tolist(), "n": bins["count"].tolist()})
            cal.append(crow)
            if qd.final is not None:
                f = qd.final.result
                dec["models"][m] = f["model"].tolist()
                dec["treat_all"] = f["treat_all"].tolist()
        if dec["models"]:
            curves["decision"].append(dec)
        for a, b in combinations(models, 2):
            q = ev[("delong", a, b, c)]
            row = {"cohort": c, "model_a": a, "model_b": b, "auc_a": np.nan, "auc_b": np.nan, "diff": np.nan,
                   "p": np.nan, "note": _note(q)}
            if q.final is not None:
                r = q.final.result
                row.update(auc_a=r.auc_a, auc_b=r.auc_b, diff=r.diff, p=r.p)
            dl.append(row)
        for sig in fusion_specs(cfg, [])[0].inputs:
            q = ev[("sig", sig, c)]
            if q.final is not None:
                curves["distributions"].append({"signature": sig, "cohort": c,
                                                "edges": np.linspace(0, 1, DISPLAY_BINS + 1).tolist(),
                                                "good": q.protocol.hist["pos"].tolist(),
                                                "poor": q.protocol.hist["neg"].tolist()})
    for site, role in sorted(roles.items()):
        for m in models:
            qr, qb = ev[("site_roc", m, site)], ev[("site_bin", m, site)]
            row = {"model": m, "site": site, "role": role, "split": "external" if role == "external" else "test",
                   "n_pos": 0, "n_neg": 0, "auc": np.nan, "auc_lo": np.nan, "auc_hi": np.nan, "accuracy": np.nan,
                   "sensitivity": np.nan, "specificity": np.nan, "f1": np.nan,
                   "note": "; ".join(n for n in (_note(qr), _note(qb)) if n)}
            if qr.final is not None:
                r = qr.final.result
                row.update(n_pos=r.n_pos, n_neg=r.n_neg, auc=r.auc, auc_lo=r.lo, auc_hi=r.hi)
            if qb.final is not None:
                b = qb.final.result
                row.update(accuracy=b.accuracy, sensitivity=b.sensitivity, specificity=b.specificity, f1=b.f1)
            site_rows.append(row)
    res.tables["table3_performance"] = pd.DataFrame(perf)
    res.tables["calibration"] = pd.DataFrame(cal)
    res.tables["delong"] = pd.DataFrame(dl, columns=["cohort", "model_a", "model_b", "auc_a", "auc_b", "diff", "p",
                                                     "note"])
    res.tables["per_site"] = pd.DataFrame(site_rows)
    res.curves = curves


def write_outputs(res: Analysis, out_dir: Path) -> list[Path]:
    """``tables/<name>.csv`` for every table and ``report_data/curves.json``; returns the paths."""
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
