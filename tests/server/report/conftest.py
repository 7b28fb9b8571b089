"""A small but realistic run directory, written by hand (no federation): the inputs server.report reads.

Three models (FDL, CR, CRD) x three cohorts, three sites (two training, one external), plausible
numbers, some disclosure notes and withheld (empty) cells, a suppression log, the curve data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

MODELS = ("FDL", "CR", "CRD")
COHORTS = ("training", "internal_test", "external")
SITES = {"site_a": "train", "site_b": "train", "ext": "external"}
SIGNATURES = ("pre_t2w", "post_t2w", "pre_dwi", "post_dwi")
NOTE_BINARY = "ext: every site was excluded from binary_metrics by disclosure control"
NOTE_COARSE = "site_a: histogram coarsened: cells with 0 < count < min_count=5 merged with neighbouring cells"
SUPPRESSIONS = [
    {"quantity": "binary_metrics@CR@external", "site": "ext", "reason": "site excluded from this quantity: a "
     "confusion-matrix cell has 0 < count < min_count=5"},
    {"quantity": "table1@external", "site": "ext", "reason": "site excluded from this quantity: a table cell has "
     "0 < count < min_count=5"},
    {"quantity": "roc@FDL@training", "site": "site_a", "reason": "histogram coarsened: cells with 0 < count < "
     "min_count=5 merged with neighbouring cells"},
    {"quantity": "delong@external", "site": "ext", "reason": "placement sums withheld: fewer than min_count=5 "
     "cases"},
]
# planted, easy to recognise in the HTML
AUC = {("FDL", "internal_test"): 0.84123, ("CR", "internal_test"): 0.74012, ("CRD", "internal_test"): 0.85149}
UNI_OR_POST_LD = 0.912345
P_TINY = 0.0000123
P_SMALL = 0.0123456


def _roc(rng: np.random.Generator, sep: float, n_pos: int, n_neg: int) -> dict:
    pos, neg = rng.normal(sep, 1, n_pos), rng.normal(0, 1, n_neg)
    thr = np.r_[np.inf, np.sort(np.r_[pos, neg])[::-1]]
    tpr = np.array([(pos >= t).mean() for t in thr])
    fpr = np.array([(neg >= t).mean() for t in thr])
    half = 1.96 * np.sqrt(tpr * (1 - tpr) / n_pos) + 0.02
    auc = float(np.trapezoid(tpr, fpr))
    return {"fpr": fpr.round(4).tolist(), "tpr": tpr.round(4).tolist(),
            "tpr_lo": np.clip(tpr - half, 0, 1).round(4).tolist(), "tpr_hi": np.clip(tpr + half, 0, 1).round(4).tolist(),
            "auc": auc, "auc_lo": max(auc - 0.09, 0.0), "auc_hi": min(auc + 0.08, 1.0)}


def write_run_dir(rd: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (rd / "tables").mkdir(parents=True)
    (rd / "report_data").mkdir()
    (rd / "models").mkdir()
    (rd / "config.yaml").write_text(yaml.safe_dump({
        "name": "unit-report", "seed": 1, "federation": {"mode": "federated", "strategy": "fedprox", "rounds": 12},
        "train": {"backbone": "densenet121"}, "privacy": {"min_cell_count": 5}}), encoding="utf-8")
    (rd / "models" / "final.json").write_text(json.dumps({
        "config_digest": "0123abcd4567ef89", "created_at": "2026-11-20T10:00:00+00:00",
        "library_versions": {"python": "3.11.7", "flwr": "1.41.0", "monai": "1.6.1"}}), encoding="utf-8")
    n = {"training": (40, 60), "internal_test": (12, 18), "external": (14, 20)}

    t1 = []
    for c in COHORTS:
        g, p = n[c]
        t1 += [{"cohort": c, "variable": "n", "level": "", "good_response": str(g), "poor_response": str(p),
                "p_value": np.nan, "test": "", "note": NOTE_COARSE if c == "training" else ""},
               {"cohort": c, "variable": "age, mean ± SD", "level": "", "good_response": "61.2 ± 9.4",
                "poor_response": "63.0 ± 10.1", "p_value": 0.41, "test": "Welch t-test", "note": ""},
               {"cohort": c, "variable": "post_ld, median [IQR]", "level": "", "good_response": "18.6 [12.4, 27.5]",
                "poor_response": "31.9 [24.8, 43.9]", "p_value": P_TINY, "test": "Mann-Whitney U", "note": ""},
               {"cohort": c, "variable": "crm, n (%)", "level": "", "good_response": "", "poor_response": "",
                "p_value": 0.03 if c != "external" else np.nan, "test": "chi-square" if c != "external" else "",
                "note": "" if c != "external" else SUPPRESSIONS[1]["site"] + ": " + SUPPRESSIONS[1]["reason"]},
               {"cohort": c, "variable": "crm, n (%)", "level": "1", "good_response": "" if c == "external" else
                "8 (20.0%)", "poor_response": "" if c == "external" else "25 (41.7%)", "p_value": np.nan,
                "test": "", "note": ""},
               {"cohort": c, "variable": "crm, n (%)", "level": "0", "good_response": "" if c == "external" else
                "32 (80.0%)", "poor_response": "" if c == "external" else "35 (58.3%)", "p_value": np.nan,
                "test": "", "note": ""}]
    pd.DataFrame(t1).to_csv(rd / "tables" / "table1_baseline.csv", index=False)

    pd.DataFrame([
        {"predictor": "age", "uni_or": 0.987, "uni_lo": 0.95, "uni_hi": 1.02, "uni_p": 0.41, "multi_or": np.nan,
         "multi_lo": np.nan, "multi_hi": np.nan, "multi_p": np.nan, "selected": False, "note": ""},
        {"predictor": "post_ld", "uni_or": UNI_OR_POST_LD, "uni_lo": 0.87, "uni_hi": 0.95, "uni_p": P_TINY,
         "multi_or": 0.921, "multi_lo": 0.88, "multi_hi": 0.96, "multi_p": 0.0004, "selected": True, "note": ""},
        {"predictor": "crm", "uni_or": 0.35, "uni_lo": 0.14, "uni_hi": 0.86, "uni_p": 0.022, "multi_or": 0.41,
         "multi_lo": 0.16, "multi_hi": 1.07, "multi_p": 0.068, "selected": False, "note": ""},
        {"predictor": "cea", "uni_or": 0.96, "uni_lo": 0.91, "uni_hi": 1.01, "uni_p": P_SMALL, "multi_or": 0.95,
         "multi_lo": 0.91, "multi_hi": 0.99, "multi_p": 0.031, "selected": True, "note": ""},
    ]).to_csv(rd / "tables" / "table2_odds_ratios.csv", index=False)

    perf, cal, curves_roc, curves_cal, dec = [], [], [], [], []
    sep = {"FDL": 1.4, "CR": 0.9, "CRD": 1.5}
    for c in COHORTS:
        g, p = n[c]
        thresholds = np.round(np.arange(0.01, 1.0, 0.01), 2)
        prev = g / (g + p)
        dec.append({"cohort": c, "thresholds": thresholds.tolist(),
                    "treat_all": (prev - (1 - prev) * thresholds / (1 - thresholds)).tolist(), "models": {}})
        for m in MODELS:
            roc = _roc(rng, sep[m], g, p)
            auc = AUC.get((m, c), roc["auc"])
            roc.update(auc=auc, auc_lo=auc - 0.09, auc_hi=min(auc + 0.08, 1.0))
            curves_roc.append({"model": m, "cohort": c, **roc})
            withheld = m == "CR" and c == "external"
            perf.append({"model": m, "cohort": c, "n_pos": g, "n_neg": p,
                         "accuracy": np.nan if withheld else 0.74 + 0.01 * len(m),
                         "auc": auc, "auc_lo": auc - 0.09, "auc_hi": min(auc + 0.08, 1.0),
                         "sensitivity": np.nan if withheld else 0.71, "specificity": np.nan if withheld else 0.78,
                         "f1": np.nan if withheld else 0.69, "threshold": 0.5,
                         "note": NOTE_BINARY if withheld else (NOTE_COARSE if c == "training" else "")})
            cal.append({"model": m, "cohort": c, "brier": 0.17 + 0.01 * len(m), "ece": 0.06, "slope": 0.93,
                        "intercept": -0.04, "note": ""})
            bins = np.linspace(0.05, 0.95, 10)
            curves_cal.append({"model": m, "cohort": c, "mean_predicted": bins.round(3).tolist(),
                               "observed": np.clip(bins + rng.normal(0, 0.06, 10), 0, 1).round(3).tolist(),
                               "n": rng.integers(5, 15, 10).tolist()})
            dec[-1]["models"][m] = (prev * 0.8 - (1 - prev) * 0.3 * thresholds / (1 - thresholds) +
                                    0.05 * np.sin(thresholds * 3)).round(4).tolist()
    pd.DataFrame(perf).to_csv(rd / "tables" / "table3_performance.csv", index=False)
    pd.DataFrame(cal).to_csv(rd / "tables" / "calibration.csv", index=False)

    dl = []
    for c in COHORTS:
        for a, b, pv in (("FDL", "CR", P_SMALL), ("FDL", "CRD", 0.62), ("CR", "CRD", P_TINY)):
            pv = np.nan if (c == "external" and a == "CR") else pv
            dl.append({"cohort": c, "model_a": a, "model_b": b, "auc_a": 0.84, "auc_b": 0.80, "diff": 0.04, "p": pv,
                       "note": "ext: " + SUPPRESSIONS[3]["reason"] if np.isnan(pv) else ""})
    pd.DataFrame(dl).to_csv(rd / "tables" / "delong.csv", index=False)

    ps = []
    for m in MODELS:
        for s, role in SITES.items():
            low = m == "CR" and s == "site_b"
            auc = 0.58 if low else 0.82
            ps.append({"model": m, "site": s, "role": role, "split": "external" if role == "external" else "test",
                       "n_pos": 7, "n_neg": 9, "auc": auc, "auc_lo": auc - 0.2, "auc_hi": min(auc + 0.15, 1.0),
                       "accuracy": np.nan if low else 0.75, "sensitivity": np.nan if low else 0.71,
                       "specificity": np.nan if low else 0.78, "f1": np.nan if low else 0.7,
                       "note": "site_b: every site was excluded from binary_metrics by disclosure control" if low
                       else ""})
    pd.DataFrame(ps).to_csv(rd / "tables" / "per_site.csv", index=False)

    pd.DataFrame([
        {"model": "FDL", "inputs": ";".join(SIGNATURES), "C": 1.0, "gamma": 0.25, "n_components": 64, "cv_auc": 0.83,
         "platt_a": -4.1, "platt_b": 0.2, "rounds": 15, "bytes_per_site": 182344, "ref_C": 1.0, "ref_gamma": 0.25,
         "ref_cv_auc": 0.85},
        {"model": "CR", "inputs": "post_ld;cea", "C": 0.1, "gamma": 0.5, "n_components": 64, "cv_auc": 0.74,
         "platt_a": -2.3, "platt_b": 0.1, "rounds": 13, "bytes_per_site": 90211, "ref_C": np.nan, "ref_gamma": np.nan,
         "ref_cv_auc": np.nan},
        {"model": "CRD", "inputs": ";".join((*SIGNATURES, "post_ld", "cea")), "C": 10.0, "gamma": 0.0417,
         "n_components": 64, "cv_auc": 0.86, "platt_a": -5.0, "platt_b": -0.3, "rounds": 15,
         "bytes_per_site": 201877, "ref_C": 10.0, "ref_gamma": 0.0417, "ref_cv_auc": 0.87},
    ]).to_csv(rd / "tables" / "fusion_models.csv", index=False)

    shap = []
    for m, feats in (("FDL", SIGNATURES), ("CR", ("post_ld", "cea")), ("CRD", (*SIGNATURES, "post_ld", "cea"))):
        for i, f in enumerate(feats):
            shap.append({"model": m, "feature": f, "mean_abs_shap": 0.02 + 0.015 * i, "n_patients": 100, "note": ""})
    pd.DataFrame(shap).to_csv(rd / "tables" / "shap_importance.csv", index=False)

    pd.DataFrame(SUPPRESSIONS).to_csv(rd / "tables" / "suppressions.csv", index=False)

    sig = []
    for b in SIGNATURES:
        for s, split in (("site_a", "test"), ("site_b", "test"), ("pooled (training sites)", "test"),
                         ("ext", "external")):
            sig.append({"backbone": b, "site": s, "split": split, "n_pos": 8, "n_neg": 10, "auc": 0.71, "lo": 0.52,
                        "hi": 0.9, "bound": 0.004, "note": ""})
    sig[1].update(auc=np.nan, lo=np.nan, hi=np.nan, note="site_b: site excluded: fewer than min_count=5 cases")
    pd.DataFrame(sig).to_csv(rd / "tables" / "signature_auc.csv", index=False)

    edges = np.linspace(0, 1, 21)
    dists = []
    for c in COHORTS:
        g, p = n[c]
        for j, s in enumerate(SIGNATURES):
            good = np.histogram(np.clip(rng.normal(0.62 + 0.03 * j, 0.14, g), 0, 1), edges)[0]
            poor = np.histogram(np.clip(rng.normal(0.42, 0.14, p), 0, 1), edges)[0]
            dists.append({"signature": s, "cohort": c, "edges": edges.round(3).tolist(), "good": good.tolist(),
                          "poor": poor.tolist()})
    (rd / "report_data" / "curves.json").write_text(json.dumps(
        {"roc": curves_roc, "calibration": curves_cal, "decision": dec, "distributions": dists}), encoding="utf-8")
    return rd


@pytest.fixture(scope="session")
def pristine_run(tmp_path_factory) -> Path:
    """The run directory as the analysis leaves it (no figures, no report); copy before changing it."""
    return write_run_dir(tmp_path_factory.mktemp("report_src") / "run")


@pytest.fixture(scope="session")
def built_run(pristine_run, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the run directory with its report built once: ``(run_dir, report.html)``."""
    from server.report import build_report

    rd = tmp_path_factory.mktemp("report_built") / "run"
    shutil.copytree(pristine_run, rd)
    return rd, build_report(rd)


@pytest.fixture
def run_copy(pristine_run, tmp_path) -> Path:
    """A fresh, writable copy of the run directory for one test."""
    rd = tmp_path / "run"
    shutil.copytree(pristine_run, rd)
    return rd
