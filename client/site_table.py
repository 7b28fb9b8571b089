"""A site's analysis table and what it does with fitted fusion models; none of it leaves the site.

The *site table* is one row per patient: ``patient_id``, ``split`` (train/val/test, or
``external``), ``label``, the deep-learning signatures (``<cache>/signatures.csv``), the
clinical-radiological predictors encoded as numbers (:func:`encode_clinical`) and, once the fusion
models are fitted, their probabilities (``<cache>/fusion_scores.csv``, columns ``fusion_<model>``).
Site-computed statistics (:mod:`client.stats_service`) read columns of this table.

:func:`apply_fusion` scores every patient with the fitted models and writes the scores and each
patient's SHAP values (``<cache>/fusion_shap.csv``, for the site's own plots); only counts return.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shared.config import RectalFLConfig
from shared.fusion import SVMModel, shapley_values

logger = logging.getLogger(__name__)

SCORES_FILE = "fusion_scores.csv"
SHAP_FILE = "fusion_shap.csv"


def _stage_number(v: Any) -> float:
    m = re.match(r"^[TN](\d)", str(v)) if isinstance(v, str) else None
    return float(m.group(1)) if m else np.nan


def encode_clinical(patients: pd.DataFrame) -> pd.DataFrame:
    """Numeric predictors from the validated patient table (index: patient_id).

    ``sex`` becomes ``sex_male`` (1/0), ``t_stage``/``n_stage`` their number (T3b -> 3, Tx -> NaN);
    numeric and 0/1 columns are kept as float. Unknown or missing values stay NaN (a patient with
    a NaN in a model's inputs is left out of that model's fit and counted, never imputed silently).
    """
    df = patients.set_index(patients["patient_id"].astype(str))
    out = pd.DataFrame(index=df.index)
    for col in ("age", "hb", "cea", "ca19_9", "pre_ld", "post_ld", "pre_mwt", "post_mwt", "pre_dtav", "post_dtav",
                "crm", "emvi"):
        if col in df:
            out[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    if "sex" in df:
        out["sex_male"] = df["sex"].map({"M": 1.0, "F": 0.0}).astype(float)
    for col in ("t_stage", "n_stage"):
        if col in df:
            out[col] = df[col].map(_stage_number).astype(float)
    return out


def build_site_table(signatures: pd.DataFrame, clinical: pd.DataFrame, scores: pd.DataFrame | None) -> pd.DataFrame:
    """Join signatures (patient_id, split, label, ...) with clinical predictors and fusion scores."""
    table = signatures.set_index(signatures["patient_id"].astype(str))
    extra = clinical.drop(columns=[c for c in clinical.columns if c in table.columns])
    table = table.join(extra, how="left")
    if scores is not None and len(scores):
        s = scores.set_index(scores["patient_id"].astype(str)).drop(columns=["patient_id"])
        table = table.join(s.drop(columns=[c for c in s.columns if c in table.columns]), how="left")
    return table.reset_index(drop=True)


def read_scores(cache_dir: Path) -> pd.DataFrame | None:
    path = Path(cache_dir) / SCORES_FILE
    return pd.read_csv(path, dtype={"patient_id": str}) if path.is_file() else None


def _write(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)


def apply_fusion(table: pd.DataFrame, models: Mapping[str, SVMModel], cache_dir: Path, *, site: str,
                 run_id: str | None = None) -> dict[str, Any]:
    """Score every patient with each fusion model; scores and per-patient SHAP stay on site.

    Writes ``<cache>/fusion_scores.csv`` (one ``fusion_<model>`` column per model, NaN where an input
    is missing) stamped with the run and the models' hash, and ``<cache>/fusion_shap.csv`` (each
    patient's exact Shapley values, for the site's own plots). The global mean |SHAP| is a
    site-computed query on the models the site derived (:class:`shared.fusion.ShapSumsSite`).

    Returns
    -------
    dict
        ``<model>|scored``: how many patients each model scored (counts only).
    """
    cache_dir = Path(cache_dir)
    scores = pd.DataFrame({"patient_id": table["patient_id"].astype(str)})
    shap_rows = []
    out: dict[str, Any] = {}
    for name, model in models.items():
        missing = [c for c in model.columns if c not in table.columns]
        if missing:
            raise ValueError(f"site {site}: fusion model {name} needs column(s) {missing}, which this site lacks")
        X = table[model.columns].to_numpy(dtype=float)
        ok = np.isfinite(X).all(axis=1)
        prob = np.full(len(table), np.nan)
        if ok.any():
            prob[ok] = model.predict_proba(X[ok])
            phi = shapley_values(model, X[ok], model.mean)
            frame = pd.DataFrame(phi, columns=model.columns)
            frame.insert(0, "model", name)
            frame.insert(0, "patient_id", table["patient_id"].astype(str).to_numpy()[ok])
            shap_rows.append(frame.melt(id_vars=["patient_id", "model"], var_name="input", value_name="shap"))
        scores[f"fusion_{name}"] = prob
        out[f"{name}|scored"] = int(ok.sum())
        if (~ok).any():
            logger.info("site %s: %d patient(s) not scored by %s (missing inputs)", site, int((~ok).sum()), name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write(scores, cache_dir / SCORES_FILE)
    if run_id is not None:  # which run and models made the scores: statistics for another run are refused
        from client.site_policy import SCORES_STAMP, digest_arrays, write_stamp
        from shared.fusion import models_to_payload

        write_stamp(cache_dir / SCORES_STAMP, run=run_id, models=digest_arrays(models_to_payload(dict(models))[0]))
    if shap_rows:
        _write(pd.concat(shap_rows, ignore_index=True), cache_dir / SHAP_FILE)
    return out


class SiteTables:
    """A site's tables without the deep-learning stack (no torch import): what the analysis stages need.

    The ClientApp uses it for ``evaluate.stats`` and ``evaluate.fusion`` so that those messages,
    the most numerous, start fast on the Deployment Engine (one ClientApp process per message).
    :class:`client.algorithm.SiteAlgorithm` extends it with training and signatures.
    """

    def __init__(self, site: str, site_dir: Path, cache_dir: Path, cfg: RectalFLConfig, **_: Any):
        self.site = site
        self.site_dir = Path(site_dir)
        self.cache_dir = Path(cache_dir)
        self.cfg = cfg

    @cached_property
    def clinical(self) -> pd.DataFrame:
        """Clinical-radiological predictors as numbers (index patient_id)."""
        from shared.cohort import load_patients

        return encode_clinical(load_patients(self.site_dir, self.cfg))

    def load_signatures(self) -> pd.DataFrame:
        path = self.cache_dir / "signatures.csv"
        if not path.is_file():
            raise FileNotFoundError(f"site {self.site}: no signatures yet ({path}); the signatures stage must run first")
        return pd.read_csv(path, dtype={"patient_id": str})

    def site_table(self) -> pd.DataFrame:
        """Signatures + clinical predictors + fusion scores: what federated queries read (never sent)."""
        return build_site_table(self.load_signatures(), self.clinical, read_scores(self.cache_dir))

    def apply_fusion(self, models: dict, run_id: str | None = None) -> dict:
        """Score every patient with the fitted fusion models (kept on site); counts come back."""
        return apply_fusion(self.site_table(), models, self.cache_dir, site=self.site, run_id=run_id)
