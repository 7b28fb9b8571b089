"""The fusion SVMs as site-computed queries: what the server asks, and the tables it writes from the releases.

Each model is one :class:`shared.fusion.FusionSVMSite` query on the training cohort (folds, kernel
features, standardisation, every Newton step, the cross-validated choice of C and gamma and Platt
scaling are derived by the sites; the release is the model, its convergence and pooled counts). The
mean |SHAP| of each input is one :class:`shared.fusion.ShapSumsSite` query per model, which every
site answers only with the model it derived itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from server.evaluation import StatsRun, query_note
from shared.config import RectalFLConfig
from shared.fusion import FusionSVMSite, ShapSumsSite, SVMModel
from shared.stats_driver import SiteQuery

logger = logging.getLogger(__name__)

FIT_COLUMNS = ["model", "inputs", "C", "gamma", "kernel", "n_components", "cv_auc", "platt_a", "platt_b",
               "n_pos", "n_neg", "folds", "converged", "iterations", "grad_norm", "platt_converged",
               "cv_fits_converged", "rounds", "ref_C", "ref_gamma", "ref_cv_auc", "note"]
SHAP_COLUMNS = ["model", "feature", "mean_abs_shap", "n_patients", "note"]


def fit_models(run_stats: StatsRun, specs: Sequence[Any], cfg: RectalFLConfig, train_sites: list[str],
               observers: Sequence[str] = (), *, reference: Callable[[Any], dict[str, Any]] | None = None
               ) -> tuple[dict[str, SVMModel], list[dict[str, Any]], list[SiteQuery]]:
    """Fit every fusion model; returns ``(models, fusion_models.csv rows, queries)``.

    The training sites' train/val patients are the data; ``observers`` (the external sites) take part
    with no patients so that they derive the models themselves and can score with them.
    """
    f = cfg.fusion
    # folds and landmark cells are built for the run's floor k (the release checks it again)
    k = int(run_stats.min_count()) if hasattr(run_stats, "min_count") else cfg.privacy.min_cell_count
    queries = [SiteQuery(f"fit.{s.name}", FusionSVMSite(list(s.inputs), C_grid=f.C_grid, gamma_factors=f.gamma_factors,
                                                        n_components=f.n_components, cv_folds=cfg.split.cv_folds,
                                                        loss=f.loss, huber_h=f.huber_h, seed=cfg.seed, min_count=k),
                         "training", list(s.inputs), sorted({*train_sites, *observers})) for s in specs]
    run_stats(queries)
    models: dict[str, SVMModel] = {}
    rows = []
    for s, q in zip(specs, queries, strict=True):
        row: dict[str, Any] = dict.fromkeys(FIT_COLUMNS, np.nan)
        row.update(model=s.name, inputs=";".join(s.inputs), rounds=q.rounds, note=query_note(q))
        fit = q.result if q.ok else None
        if fit is not None and fit.model is not None:
            m = fit.model
            models[s.name] = m
            cv = fit.convergence
            row.update(C=m.C, gamma=m.gamma, kernel=m.kernel, n_components=int(np.asarray(m.coef).size), cv_auc=m.cv_auc,
                       platt_a=m.platt_a, platt_b=m.platt_b, n_pos=fit.counts.get("n_pos"),
                       n_neg=fit.counts.get("n_neg"), folds=fit.counts.get("n_folds"),
                       converged=cv.get("final_converged"), iterations=cv.get("final_iterations"),
                       grad_norm=cv.get("final_grad_norm"), platt_converged=cv.get("platt_converged"),
                       cv_fits_converged=f"{cv.get('cv_fits_converged')}/{cv.get('cv_fits')}")
            notes = [row["note"], *fit.notes]
            if not cv.get("final_converged", True) or not cv.get("platt_converged", True):
                notes.append("did not converge: see converged/iterations/grad_norm")
            row["note"] = "; ".join(n for n in notes if n)
        elif fit is not None:
            row["note"] = "; ".join(n for n in (row["note"], f"not fitted: {fit.reason}") if n)
        if reference is not None:
            ref = reference(s)
            row.update(ref_C=ref.get("C"), ref_gamma=ref.get("gamma"), ref_cv_auc=ref.get("cv_auc"))
            for c in ("internal_test", "external"):
                if c in ref:
                    row[f"ref_auc_{c}"] = ref[c]
        rows.append(row)
    return models, rows, queries


def shap_table(run_stats: StatsRun, models: dict[str, SVMModel], train_sites: list[str]
               ) -> tuple[pd.DataFrame, list[SiteQuery]]:
    """Mean |SHAP| per input over the training cohort, per model (exact Shapley values, summed on site)."""
    queries = {name: SiteQuery(f"shap.{name}", ShapSumsSite(list(m.columns), m.digest()), "training",
                               list(m.columns), train_sites) for name, m in models.items()}
    if queries:
        run_stats(list(queries.values()))
    rows = []
    for name, q in queries.items():
        rel = q.released or {}
        note = query_note(q)
        for j, col in enumerate(models[name].columns):
            val = rel["mean_abs_shap"][j] if rel.get("released") else np.nan
            rows.append({"model": name, "feature": col, "mean_abs_shap": val, "n_patients": rel.get("n", 0),
                         "note": note})
    return pd.DataFrame(rows, columns=SHAP_COLUMNS), list(queries.values())
