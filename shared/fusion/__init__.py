"""Fusion models (FDL, CR, CRD and the study's variants): RBF-kernel SVMs fitted without moving a row.

The study fuses the deep-learning signatures (and clinical-radiological predictors) with an RBF
SVM whose ``C`` and ``gamma`` are tuned by cross-validation, with Platt-scaled probabilities.

* :mod:`shared.fusion.protocol`: :class:`FusionSVMSite`, the fit as a *site-computed* protocol
  (the sites assign folds, derive the kernel map, standardisation, every Newton iterate, the
  CV selection and Platt scaling from securely aggregated totals; only the fitted model is
  released), and :class:`ShapSumsSite` (mean |SHAP| over a cohort).
* :mod:`shared.fusion.model`: :class:`SVMModel` (what a site needs to score a patient), the kernel
  feature maps (Nystrom on grid landmarks, random Fourier features), :func:`shapley_values` and
  the scoring payload.
* :mod:`shared.fusion.newton`: the primal SVM's Newton terms (site) and update (every site).
* :mod:`shared.fusion.estimators`: :class:`FederatedSVC` (the protocol over in-memory sites,
  scikit-learn conventions) and :class:`PooledSVC` (scikit-learn's ``SVC`` + Platt on pooled rows,
  the reference).
"""

from typing import Any

from .model import SVMModel, landmarks, models_from_payload, models_to_payload, rff, shapley_values, sigmoid
from .protocol import (
    DEFAULT_C,
    DEFAULT_GAMMA_FACTORS,
    LOSSES,
    FusionFit,
    FusionSVMSite,
    ShapSumsSite,
    assign_folds,
)

__all__ = [
    "DEFAULT_C",
    "DEFAULT_GAMMA_FACTORS",
    "LOSSES",
    "FederatedSVC",
    "FusionFit",
    "FusionSVMSite",
    "PooledSVC",
    "SVMModel",
    "ShapSumsSite",
    "assign_folds",
    "landmarks",
    "models_from_payload",
    "models_to_payload",
    "rff",
    "shapley_values",
    "sigmoid",
]


def __getattr__(name: str) -> Any:
    """``FederatedSVC`` / ``PooledSVC`` on first use: they import scikit-learn (~0.6 s), which a site's
    ClientApp (a fresh process for every message in deployment) never needs for its own work."""
    if name in ("FederatedSVC", "PooledSVC"):
        from . import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

