"""scikit-learn style estimators: the federated fusion SVM over in-memory sites, and the pooled reference."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from shared.stats.sitecomputed import CohortData, run_plain

from .protocol import DEFAULT_C, DEFAULT_GAMMA_FACTORS, FusionFit, FusionSVMSite

logger = logging.getLogger(__name__)


def _check_xy(X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"X must be (n, d) and y (n,), got {X.shape} and {y.shape}")
    if set(np.unique(y).tolist()) - {0, 1}:
        raise ValueError("y must hold 0/1 labels")
    return X, y.astype(np.int64)


class FederatedSVC(ClassifierMixin, BaseEstimator):
    """The site-computed fusion SVM (:class:`~shared.fusion.protocol.FusionSVMSite`) as an estimator.

    ``fit(X, y, sites=site_of_each_row)`` runs the protocol with every site in this process
    (:func:`shared.stats.sitecomputed.run_plain`: exactly what each site computes after secure
    aggregation), each site seeing only its own rows.

    Parameters
    ----------
    C_grid, gamma_factors : sequences of float
        Candidates; ``gamma = factor / n_features``.
    n_components : int
        Landmarks (or random features).
    n_folds : int
        Cross-validation folds asked for (the protocol may use fewer, see ``n_folds_``).
    seed : int
    min_count : int
        Disclosure floor ``k`` (folds and release).
    loss : {"huber_hinge", "squared_hinge"}
    huber_h : float
    kernel : {"landmarks", "rff"}
    max_iter : int

    Attributes
    ----------
    model_ : SVMModel
    fit_ : FusionFit
        The protocol's result (convergence, counts, notes, cost).
    C_, gamma_, cv_auc_, cv_results_ :
        Chosen candidate, its pooled out-of-fold AUC, every candidate's.
    convergence_ : dict
        Final fit and Platt scaling: converged / iterations / gradient norm; CV fits converged.
    n_folds_ : int
    n_rounds_ : int
    bytes_sent_ : dict
        Per site: 8 bytes per value contributed over all rounds (plain float64; secure
        aggregation adds about 32 bytes per round plus the key exchange).
    classes_, n_features_in_ :
    """

    def __init__(self, C_grid: Sequence[float] = DEFAULT_C, gamma_factors: Sequence[float] = DEFAULT_GAMMA_FACTORS,
                 n_components: int = 256, n_folds: int = 5, seed: int = 0, min_count: int = 5,
                 loss: str = "huber_hinge", huber_h: float = 0.1, kernel: str = "landmarks",
                 max_iter: int = 100) -> None:
        self.C_grid = C_grid
        self.gamma_factors = gamma_factors
        self.n_components = n_components
        self.n_folds = n_folds
        self.seed = seed
        self.min_count = min_count
        self.loss = loss
        self.huber_h = huber_h
        self.kernel = kernel
        self.max_iter = max_iter

    def protocol(self, columns: Sequence[str]) -> FusionSVMSite:
        """The protocol instance :meth:`fit` runs (parameters validated there)."""
        return FusionSVMSite(list(columns), list(self.C_grid), list(self.gamma_factors), self.kernel,
                             int(self.n_components), int(self.n_folds), self.loss, float(self.huber_h),
                             int(self.max_iter), int(self.seed), int(self.min_count))

    def fit(self, X: Any, y: Any, sites: Any = None, patient_ids: Any = None,
            columns: Sequence[str] | None = None) -> FederatedSVC:
        """Fit over the sites.

        Parameters
        ----------
        X : array-like of shape (n, d)
        y : array-like of shape (n,)
            0/1 labels.
        sites : array-like of shape (n,), optional
            Site of each row (default: one site).
        patient_ids : array-like of shape (n,), optional
            Patient ids (fold assignment); default ``"<site>/<row within site>"``.
        columns : list of str, optional
            Input names (default ``x0, x1, ...``).

        Returns
        -------
        self

        Raises
        ------
        ValueError
            Bad input (naming the site) or a refused fit (with the protocol's reason).
        """
        X, y = _check_xy(X, y)
        sites = np.zeros(len(y), dtype=int) if sites is None else np.asarray(sites)
        if sites.shape != y.shape:
            raise ValueError(f"sites must give one site per row, got shape {sites.shape}")
        cols = [f"x{i}" for i in range(X.shape[1])] if columns is None else list(columns)
        ids = None if patient_ids is None else np.asarray(patient_ids).astype(str)
        data = {}
        for s in dict.fromkeys(sites.tolist()):
            rows = sites == s
            Xs = X[rows]
            if not np.isfinite(Xs).all():
                bad = np.flatnonzero(~np.isfinite(Xs).all(axis=1))
                raise ValueError(f"site {str(s)!r}: non-finite input in {bad.size} row(s) (first: row {int(bad[0])} "
                                 f"of that site): drop or impute them before fitting")
            pid = ids[rows] if ids is not None else np.array([f"{s}/{i}" for i in range(int(rows.sum()))])
            data[str(s)] = CohortData(y[rows], Xs, tuple(cols), {"patient_id": pid.tolist(), "site": str(s)})
        proto = self.protocol(cols)
        run = run_plain(proto, data, min_count=int(self.min_count))
        fit: FusionFit = run.result
        if not fit.fitted:
            raise ValueError(f"fusion SVM fit refused: {fit.reason}")
        m = fit.model
        self.fit_, self.model_ = fit, m
        self.C_, self.gamma_, self.cv_auc_ = m.C, m.gamma, m.cv_auc
        self.cv_results_ = m.cv_table
        self.convergence_ = dict(m.convergence)
        self.n_folds_ = int(m.counts["n_folds"])
        self.n_rounds_ = run.rounds
        self.bytes_sent_ = dict.fromkeys(data, 8 * fit.cost["values_sent_per_site"])
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = X.shape[1]
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Decision values, shape (n,)."""
        return self.model_.decision_function(X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Platt-scaled probabilities, shape (n, 2)."""
        p = self.model_.predict_proba(X)
        return np.column_stack([1 - p, p])

    def predict(self, X: Any) -> np.ndarray:
        """Class at probability >= 0.5."""
        return (self.model_.predict_proba(X) >= 0.5).astype(np.int64)


class PooledSVC(ClassifierMixin, BaseEstimator):
    """Reference: scikit-learn's RBF ``SVC`` with Platt scaling on the pooled rows.

    Pooled standardisation, the same ``(C, gamma)`` grid, stratified K-fold CV scored by the AUC of
    the pooled out-of-fold decision values, first best candidate in grid order; Platt scaling on
    the out-of-fold decision values of the chosen candidate, then one SVC on all rows (libsvm's
    ``probability=True`` with the CV folds).

    ``fit(X, y, folds=...)`` takes a fold per row instead of ``StratifiedKFold`` (to compare with
    the federated fit on the same folds).
    """

    def __init__(self, C_grid: Sequence[float] = DEFAULT_C, gamma_factors: Sequence[float] = DEFAULT_GAMMA_FACTORS,
                 n_folds: int = 5, seed: int = 0) -> None:
        self.C_grid = C_grid
        self.gamma_factors = gamma_factors
        self.n_folds = n_folds
        self.seed = seed

    def fit(self, X: Any, y: Any, folds: Any = None) -> PooledSVC:
        """Fit on pooled rows; ``folds`` (optional, shape (n,)) fixes the CV folds."""
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import PredefinedSplit, StratifiedKFold, cross_val_predict
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        X, y = _check_xy(X, y)
        self.scaler_ = StandardScaler().fit(X)
        Xs = self.scaler_.transform(X)
        cv = (StratifiedKFold(self.n_folds, shuffle=True, random_state=self.seed) if folds is None
              else PredefinedSplit(np.asarray(folds)))
        self.cv_results_ = []
        for C in self.C_grid:
            for fac in self.gamma_factors:
                gamma = float(fac) / X.shape[1]
                f = cross_val_predict(SVC(C=C, gamma=gamma), Xs, y, cv=cv, method="decision_function")
                self.cv_results_.append({"C": float(C), "gamma": gamma, "cv_auc": float(roc_auc_score(y, f))})
        best = max(range(len(self.cv_results_)), key=lambda i: (round(self.cv_results_[i]["cv_auc"], 12), -i))
        self.C_, self.gamma_ = self.cv_results_[best]["C"], self.cv_results_[best]["gamma"]
        self.cv_auc_ = self.cv_results_[best]["cv_auc"]
        self.svc_ = CalibratedClassifierCV(SVC(C=self.C_, gamma=self.gamma_), method="sigmoid", cv=cv,
                                           ensemble=False).fit(Xs, y)
        self.classes_ = self.svc_.classes_
        self.n_features_in_ = X.shape[1]
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Decision values of the SVC fitted on all rows, shape (n,)."""
        est = self.svc_.calibrated_classifiers_[0].estimator
        return est.decision_function(self.scaler_.transform(np.asarray(X, dtype=np.float64)))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Platt-scaled probabilities, shape (n, 2)."""
        return self.svc_.predict_proba(self.scaler_.transform(np.asarray(X, dtype=np.float64)))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class."""
        return self.svc_.predict(self.scaler_.transform(np.asarray(X, dtype=np.float64)))
