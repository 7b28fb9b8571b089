"""Federated statistics engine: pooled-exact evaluation numbers from site summaries.

Pooled reference functions (run where all rows are available, e.g. in tests)::

    from shared.stats import (auc_ci, delong_test, binary_metrics, youden_threshold, calibration,
                              net_benefit, logistic_regression, select_predictors, table_one)

Federated counterparts (``federated_*``) take one local dataset per site, run the protocol in
plain Python exactly as messages would flow (:func:`run_protocol`) and return
:class:`Federated` objects: the same result type as the pooled function, the disclosure log
(``suppressed``), certified error bounds of grid-based numbers (``bound``), the number of rounds
and the bytes each site sent. The protocol classes (:data:`PROTOCOLS`) are what a Flower
ServerApp / ClientApp calls: see :mod:`shared.stats.protocol` for the interface. Nothing here
imports Flower.

Privacy boundary: a site only ever sends counts, sums, sums of squares / cross-products,
histogram cells on a shared grid holding 0 or >= ``min_count`` patients, and gradients /
information matrices of low-dimensional logistic models, each summed over >= ``min_count``
patients of every outcome class it involves.
"""

from .classification import binary_metrics, calibration, net_benefit
from .fed_classification import (
    BinaryMetricsProtocol,
    CalibrationProtocol,
    NetBenefitProtocol,
    federated_binary_metrics,
    federated_calibration,
    federated_net_benefit,
)
from .fed_logistic import (
    LogisticProtocol,
    SelectPredictorsProtocol,
    federated_logistic_regression,
    federated_select_predictors,
)
from .fed_roc import ROCProtocol, federated_auc_ci, federated_delong_test, federated_youden_threshold
from .fed_tableone import TableOneProtocol, TableSpec, federated_table_one
from .histogram import Cells, Grid
from .logistic import logistic_regression, select_predictors
from .protocol import FederatedProtocol, Final, Params, Summary, join_summary, run_protocol, split_summary
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
from .tableone import table_one

#: Protocol classes by name, for a ClientApp to find the ``site_step`` a message asks for.
PROTOCOLS: dict[str, type[FederatedProtocol]] = {
    p.name: p
    for p in (ROCProtocol, LogisticProtocol, SelectPredictorsProtocol, BinaryMetricsProtocol,
              CalibrationProtocol, NetBenefitProtocol, TableOneProtocol)
}

__all__ = [
    "AUCResult", "BinaryMetrics", "BinaryMetricsProtocol", "CalibrationProtocol", "CalibrationResult", "Cells",
    "DeLongResult", "Federated", "FederatedProtocol", "Final", "Grid", "LogisticProtocol", "NetBenefitProtocol",
    "PROTOCOLS", "Params", "ROCProtocol", "SelectPredictorsProtocol", "SelectionResult", "Summary", "Suppression",
    "TableOne", "TableOneProtocol", "TableSpec", "YoudenResult", "auc_ci", "binary_metrics", "calibration",
    "delong_test", "federated_auc_ci", "federated_binary_metrics", "federated_calibration",
    "federated_delong_test", "federated_logistic_regression", "federated_net_benefit",
    "federated_select_predictors", "federated_table_one", "federated_youden_threshold", "join_summary",
    "logistic_regression", "net_benefit", "run_protocol", "select_predictors", "split_summary", "table_one",
    "youden_threshold",
]

# Site-computed protocols (issue 11): sites derive every parameter from securely aggregated totals.
from .sc_classification import CalibrationSite, NetBenefitSite, ThresholdMetricsSite  # noqa: E402
from .sc_cohort import CohortSummarySite  # noqa: E402
from .sc_logistic import (  # noqa: E402
    LogisticSite,
    SelectionSite,
    firth_logistic_regression,
    pooled_selection,
)
from .sc_registry import SITE_PROTOCOLS  # noqa: E402
from .sc_roc import ROCSite  # noqa: E402
from .sc_tableone import TableOneSite  # noqa: E402

__all__ += [
    "SITE_PROTOCOLS", "CalibrationSite", "CohortSummarySite", "LogisticSite", "NetBenefitSite", "ROCSite",
    "SelectionSite", "TableOneSite", "ThresholdMetricsSite", "firth_logistic_regression", "pooled_selection",
]
