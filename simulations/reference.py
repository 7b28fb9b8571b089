"""Simulation-only references that read every simulated site's data in one process.

Only a simulation may do this: the simulated hospitals share this machine. Nothing here runs in a
real consortium.

- :func:`pooled_reference`: scikit-learn's ``SVC`` (+ Platt) on the pooled training-cohort rows of
  every site, the yardstick the federated fusion SVM is compared with (``ref_*`` columns);
(Sites held in this process, answering with the same site-side code as the ClientApp, are
:class:`simulations.sites.InProcessConsortium`.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from client.site_table import build_site_table, encode_clinical
from server.analysis import COHORT_SPLITS, EXTERNAL, INTERNAL, TRAINING, FusionSpec, cohorts
from shared.cohort import load_patients
from shared.config import RectalFLConfig
from shared.fusion import PooledSVC

logger = logging.getLogger(__name__)


def pooled_reference(cfg: RectalFLConfig, sim_sites: list[dict], roles: Mapping[str, str]
                     ) -> Callable[[FusionSpec], dict[str, Any]]:
    """Simulation only: scikit-learn's ``SVC`` on the pooled training-cohort rows of every site.

    This reads each simulated site's table directly (possible only because the simulated sites
    share this machine); it is the yardstick for the federated fit and never runs in deployment.
    """
    from sklearn.metrics import roc_auc_score


    tables = {}
    for s in sim_sites:
        path = Path(s["cache_dir"]) / "signatures.csv"
        if s["name"] not in roles:
            continue
        if not path.is_file():
            logger.warning("pooled reference skipped: %s has no signatures (%s)", s["name"], path)
            return lambda spec: {}
        sig = pd.read_csv(path, dtype={"patient_id": str})
        tables[s["name"]] = build_site_table(sig, encode_clinical(load_patients(s["data_dir"], cfg)), None)
    groups = cohorts(roles)

    def rows(cohort: str, cols: list[str]) -> pd.DataFrame:
        parts = [tables[s][tables[s]["split"].isin(COHORT_SPLITS[cohort])] for s in groups.get(cohort, [])]
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["label", *cols])
        return df.dropna(subset=["label", *cols])

    def fit(spec: FusionSpec) -> dict[str, Any]:
        tr = rows(TRAINING, spec.inputs)
        try:
            ref = PooledSVC(cfg.fusion.C_grid, cfg.fusion.gamma_factors, cfg.split.cv_folds, cfg.seed).fit(
                tr[spec.inputs].to_numpy(float), tr["label"].to_numpy(int))
        except ValueError as exc:
            logger.warning("pooled reference for %s not fitted: %s", spec.name, exc)
            return {}
        out: dict[str, Any] = {"C": ref.C_, "gamma": ref.gamma_, "cv_auc": ref.cv_auc_}
        for c in (INTERNAL, EXTERNAL):
            te = rows(c, spec.inputs)
            if len(te) and te["label"].nunique() == 2:
                out[c] = float(roc_auc_score(te["label"].to_numpy(int),
                                             ref.predict_proba(te[spec.inputs].to_numpy(float))[:, 1]))
        return out

    return fit


def reference_factory(sim_sites: list[dict]) -> Callable[[RectalFLConfig, Mapping[str, str]], Callable[..., dict]]:
    """``(cfg, roles) -> reference(spec)`` for :func:`server.pipeline.run_pipeline` (simulation only)."""
    return lambda cfg, roles: pooled_reference(cfg, sim_sites, roles)
