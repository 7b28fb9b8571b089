"""Federated statistics engine: pooled-exact evaluation numbers without a patient row leaving a site.

Pooled reference functions (run where all rows are available, e.g. in tests and simulations)::

    from shared.stats import (auc_ci, delong_test, binary_metrics, youden_threshold, calibration,
                              net_benefit, logistic_regression, select_predictors, table_one)

Site-computed protocols (:mod:`shared.stats.sitecomputed`): every site adds an additive
contribution, the contributions are securely aggregated (:mod:`shared.secagg`), every site derives
the next state from the totals, and only a disclosure-checked release reaches the server. The
protocols a site may run are registered by name (:data:`SITE_PROTOCOLS`, plus the fusion SVM in
:mod:`shared.fusion`); :func:`~shared.stats.sitecomputed.run_plain` runs one over in-memory sites
(what every site computes), :mod:`client.stats_service` is a site's endpoint and
:mod:`shared.stats_driver` the server's. Nothing here imports Flower.
"""

from .classification import binary_metrics, calibration, net_benefit
from .histogram import Cells, Grid
from .logistic import logistic_regression, select_predictors
from .results import (
    AUCResult,
    BinaryMetrics,
    CalibrationResult,
    DeLongResult,
    Federated,
    SelectionResult,
    Suppression,
    TableOne,
    YoudenResult,
)
from .roc import auc_ci, delong_test, youden_threshold
from .sc_classification import CalibrationSite, NetBenefitSite, ThresholdMetricsSite
from .sc_cohort import CohortSummarySite
from .sc_logistic import LogisticSite, SelectionSite, firth_logistic_regression, pooled_selection
from .sc_registry import SITE_PROTOCOLS
from .sc_roc import ROCSite
from .sc_tableone import TableOneSite
from .tableone import table_one

__all__ = [
    "SITE_PROTOCOLS", "AUCResult", "BinaryMetrics", "CalibrationResult", "CalibrationSite", "Cells",
    "CohortSummarySite", "DeLongResult", "Federated", "Grid", "LogisticSite", "NetBenefitSite", "ROCSite",
    "SelectionResult", "SelectionSite", "Suppression", "TableOne", "TableOneSite", "ThresholdMetricsSite",
    "YoudenResult", "auc_ci", "binary_metrics", "calibration", "delong_test", "firth_logistic_regression",
    "logistic_regression", "net_benefit", "pooled_selection", "select_predictors", "table_one", "youden_threshold",
]
