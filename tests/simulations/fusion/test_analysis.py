"""server.analysis on in-process sites: tables, curves, scores kept on site, no tuning on test/external rows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from tests.simulations.fusion.conftest import SIGS, analyse

REQUIRED = {
    "table1_baseline": ["cohort", "variable", "level", "good_response", "poor_response", "p_value", "test", "note"],
    "table2_odds_ratios": ["predictor", "uni_or", "uni_lo", "uni_hi", "uni_p", "multi_or", "multi_lo", "multi_hi",
                           "multi_p", "selected"],
    "table3_performance": ["model", "cohort", "n_pos", "n_neg", "accuracy", "auc", "auc_lo", "auc_hi", "sensitivity",
                           "specificity", "f1", "threshold", "note"],
    "delong": ["cohort", "model_a", "model_b", "auc_a", "auc_b", "diff", "p", "note"],
    "calibration": ["model", "cohort", "brier", "ece", "slope", "intercept", "note"],
    "per_site": ["model", "site", "role", "split", "n_pos", "n_neg", "auc", "auc_lo", "auc_hi", "accuracy",
                 "sensitivity", "specificity", "f1", "note"],
    "fusion_models": ["model", "inputs", "C", "gamma", "n_components", "cv_auc", "platt_a", "platt_b", "rounds"],
    "shap_importance": ["model", "feature", "mean_abs_shap", "n_patients", "note"],
    "suppressions": ["quantity", "site", "reason"],
}


def test_tables_and_curves_written(result):
    tmp, tabs, res = result
    for name, cols in REQUIRED.items():
        df = pd.read_csv(tmp / "run" / "tables" / f"{name}.csv")
        assert set(cols) <= set(df.columns), (name, set(cols) - set(df.columns))
    perf = pd.read_csv(tmp / "run" / "tables" / "table3_performance.csv")
    assert {"FDL", "CR", "CRD"} <= set(perf["model"])
    assert set(perf["cohort"]) == {"training", "internal_test", "external"}
    fdl_ext = perf[(perf.model == "FDL") & (perf.cohort == "external")].iloc[0]
    n_ext = tabs["ext"]["label"].value_counts()
    assert (fdl_ext.n_pos, fdl_ext.n_neg) == (n_ext[1], n_ext[0])
    assert fdl_ext.auc > 0.7  # the signatures carry signal
    t2 = pd.read_csv(tmp / "run" / "tables" / "table2_odds_ratios.csv")
    assert "post_ld" in set(t2.loc[t2.selected, "predictor"])  # the planted predictor is found
    curves = json.loads((tmp / "run" / "report_data" / "curves.json").read_text())
    assert {"roc", "calibration", "decision", "distributions"} <= set(curves)
    roc = curves["roc"][0]
    assert roc["fpr"][0] == 0 and roc["tpr"][-1] == 1 and len(roc["tpr_lo"]) == len(roc["tpr"])
    dist = curves["distributions"][0]
    assert len(dist["edges"]) == len(dist["good"]) + 1
    shap = pd.read_csv(tmp / "run" / "tables" / "shap_importance.csv")
    assert (shap["mean_abs_shap"] > 0).all()


def test_scores_and_shap_stay_on_site(result):
    tmp, tabs, res = result
    for site, df in tabs.items():
        scores = pd.read_csv(tmp / "cache" / site / "fusion_scores.csv", dtype={"patient_id": str})
        assert list(scores["patient_id"]) == list(df["patient_id"])
        assert {"fusion_FDL", "fusion_CR", "fusion_CRD"} <= set(scores.columns)
        assert scores["fusion_FDL"].between(0, 1).all()
    # per-patient SHAP values are written for the site's own plots, never sent
    assert (tmp / "cache" / "site_a" / "fusion_shap.csv").is_file()


def test_no_tuning_step_touches_test_or_external_patients(result, tmp_path):
    tmp, tabs, res = result
    fits = [q for q in res.queries if q.protocol.name == "fusion_svm_fit"]
    assert fits
    for q in fits:
        assert q.cohort == "training", q.qid
        # the external site takes part with no patients (it derives the model it will score with)
        assert set(q.participants) == {"site_a", "site_b", "site_c", "ext"}, q.qid
    # scramble every test and external patient: the fitted models do not move, the evaluation does
    rng = np.random.default_rng(99)
    scrambled = {}
    for s, df in tabs.items():
        df = df.copy()
        held_out = df["split"].isin(["test", "external"])
        for c in [*SIGS, "post_ld", "age"]:
            df.loc[held_out, c] = rng.permutation(df.loc[held_out, c].to_numpy())
        df.loc[held_out, "label"] = rng.permutation(df.loc[held_out, "label"].to_numpy())
        scrambled[s] = df
    res2, _ = analyse(tmp_path, scrambled)
    assert set(res2.models) == set(res.models)
    for name, m in res.models.items():
        m2 = res2.models[name]
        assert (m2.C, m2.gamma) == (m.C, m.gamma)
        np.testing.assert_array_equal(m2.coef, m.coef)
        assert (m2.platt_a, m2.platt_b) == (m.platt_a, m.platt_b)
    before = res.tables["table3_performance"].set_index(["model", "cohort"])["auc"]
    after = res2.tables["table3_performance"].set_index(["model", "cohort"])["auc"]
    assert before.loc[("FDL", "training")] == after.loc[("FDL", "training")]
    assert before.loc[("FDL", "external")] != after.loc[("FDL", "external")]


def test_a_table3_row_says_when_its_auc_and_binary_metrics_describe_different_patients() -> None:
    from types import SimpleNamespace as NS

    from server.analysis import _perf_row

    roc = NS(aucs={"FDL": NS(n_pos=20, n_neg=30, auc=0.8, lo=0.7, hi=0.9)}, tie_bound={"FDL": 0.0})

    def binary(tp, fn, tn, fp, approx=False):
        m = NS(accuracy=0.7, sensitivity=0.6, specificity=0.8, f1=0.65, tp=tp, fn=fn, tn=tn, fp=fp)
        return NS(ok=True, result=NS(metrics=m, approx=approx))

    same = _perf_row("FDL", "external", roc, "FDL", binary(12, 8, 24, 6), 0.5, [])
    assert same["note"] == "" and (same["n_pos"], same["n_neg"]) == (20, 30)
    other = _perf_row("FDL", "external", roc, "FDL", binary(9, 5, 20, 6), 0.5, ["a site's note"])
    assert other["note"].startswith("a site's note; ") and "14 good / 26 poor" in other["note"]
    assert "the AUC 20 / 30" in other["note"]
    rounded = _perf_row("FDL", "external", roc, "FDL", binary(10, 5, 25, 5, approx=True), 0.5, [])
    assert rounded["note"] == ""  # cells rounded to base k by disclosure control: flagged by approx, not here
