"""Federated logistic regression (Newton-Raphson on summed gradients and information matrices).

Each round the server sends the current coefficients of every model still being fitted; each
site returns, per model, ``X'(y - mu)`` (shape (p,)), ``X'WX`` (shape (p, p)) and its
log-likelihood, all evaluated on its own patients. The server sums them and takes a Newton
step with the same :class:`shared.stats.logistic.NewtonSolver` the pooled function uses, so the
federated fit follows the pooled iterates (equal to ~1e-12). Several models (e.g. the univariate
screens of :func:`federated_select_predictors`) are fitted in the same rounds.

Disclosure: a site with ``0 < n < min_count`` patients in an outcome class is excluded (for one
positive, ``X'y`` would be that patient's row). Nothing else is suppressed: every message is a
sum over at least ``min_count`` patients of each present class.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._checks import DEFAULT_MIN_COUNT, as_binary, check_alpha, small, where
from .logistic import COLUMNS, INTERCEPT, NewtonSolver, design, newton_terms
from .protocol import EXCLUDED_CLASS, FederatedProtocol, Final, Params, Summary, run_protocol, site_min_count
from .results import Federated, SelectionResult

logger = logging.getLogger(__name__)


class LogisticProtocol(FederatedProtocol):
    """Fit one or more logistic models on the same federated data.

    Parameters
    ----------
    columns : sequence of str
        The predictor columns every site holds, in the agreed order.
    models : sequence of sequence of int
        Each model's predictors as indices into ``columns`` (an intercept is always added).
    alpha : float
    tol, max_iter : float, int
        Newton settings (as the pooled function).
    min_count : int

    Site data is ``(X, y)``: a DataFrame with ``columns`` and a 0/1 vector.
    """

    name = "logistic"

    def __init__(self, columns: Sequence[str], models: Sequence[Sequence[int]] | None = None, alpha: float = 0.05,
                 tol: float = 1e-10, max_iter: int = 100, *, min_count: int = DEFAULT_MIN_COUNT) -> None:
        super().__init__(min_count=min_count)
        self.columns = [str(c) for c in columns]
        self.alpha = check_alpha(alpha)
        self.tol, self.max_iter = tol, max_iter
        self.included: list[str] | None = None
        self._set_models([list(range(len(self.columns)))] if models is None else [list(m) for m in models])

    def _set_models(self, models: list[list[int]]) -> None:
        self.models = models
        self.terms = [[INTERCEPT, *(self.columns[c] for c in m)] for m in models]
        self.solvers = [NewtonSolver(len(t), self.tol, self.max_iter, tuple(t)) for t in self.terms]

    def _params(self) -> Params:
        self.round += 1
        p: Params = {"round": self.round, "min_count": self.min_count, "n_models": len(self.models)}
        for i, (m, s) in enumerate(zip(self.models, self.solvers, strict=True)):
            if not s.converged:
                p[f"m{i}.cols"] = np.asarray(m, dtype=np.int64)
                p[f"m{i}.beta"] = s.beta.copy()
        return p

    def start(self) -> Params:
        return self._params()

    @staticmethod
    def site_step(data: tuple[pd.DataFrame, np.ndarray], params: Params, *, site: str | None = None,
                  min_count: int = DEFAULT_MIN_COUNT) -> Summary:
        """Gradient, information and log-likelihood of each requested model on this site.

        Parameters
        ----------
        data : (DataFrame of shape (n, n_columns), ndarray of shape (n,))
        params : dict
            ``m{i}.cols`` (int, shape (p_i - 1,)) and ``m{i}.beta`` (shape (p_i,)) per model.
        """
        k = site_min_count(params, min_count)
        X, y = data
        yy = as_binary(y, "y", site)
        if len(X) != yy.size:
            raise ValueError(f"X{where(site)} has {len(X)} rows but y has {yy.size}")
        n1 = int(yy.sum())
        out: Summary = {"round": int(params["round"]), "min_count": k}
        if small(n1, k) or small(yy.size - n1, k):
            out.update({"excluded": 1, "supp.logistic": EXCLUDED_CLASS})
            return out
        D, _ = design(X, site)
        out.update({"excluded": 0, "n": int(yy.size), "n_pos": n1})
        yf = yy.astype(np.float64)
        for i in range(int(params["n_models"])):
            if f"m{i}.beta" not in params:
                continue
            cols = np.concatenate([[0], np.asarray(params[f"m{i}.cols"], dtype=np.int64) + 1])
            beta = np.asarray(params[f"m{i}.beta"], dtype=np.float64)
            if cols.max() >= D.shape[1] or beta.shape != cols.shape:
                raise ValueError(f"server parameters for model {i} do not match the site's columns{where(site)}")
            g, h, ll = newton_terms(D[:, cols], yf, beta)
            out.update({f"m{i}.grad": g, f"m{i}.info": h, f"m{i}.loglik": ll})
        return out

    def server_step(self, summaries: Mapping[str, Summary]) -> Params | Final:
        self.log_suppressions(summaries)
        if self.included is None:
            self.included = [s for s, v in summaries.items() if not int(v.get("excluded", 0))]
            n = sum(int(summaries[s]["n"]) for s in self.included)
            n1 = sum(int(summaries[s]["n_pos"]) for s in self.included)
            if n1 in (0, n):
                raise ValueError(f"the included sites {self.included} hold a single outcome class")
        missing = [s for s in self.included if int(summaries.get(s, {}).get("excluded", 1))]
        if missing:
            raise ValueError(f"site(s) {missing} stopped answering")
        for i, s in enumerate(self.solvers):
            if s.converged:
                continue
            g = sum(np.asarray(summaries[x][f"m{i}.grad"]) for x in self.included)
            h = sum(np.asarray(summaries[x][f"m{i}.info"]) for x in self.included)
            ll = sum(float(summaries[x][f"m{i}.loglik"]) for x in self.included)
            s.update(g, h, ll)
        if all(s.converged for s in self.solvers):
            return self.finish()
        return self._params()

    def tables(self) -> list[pd.DataFrame]:
        return [s.table(t, self.alpha) for s, t in zip(self.solvers, self.terms, strict=True)]

    def finish(self) -> Params | Final:
        """Called when every model converged; returns the final result (override to chain fits)."""
        return Final(self.tables()[0])


class SelectPredictorsProtocol(LogisticProtocol):
    """Univariate screens (all in the same rounds), then one multivariate model.

    Parameters as :class:`LogisticProtocol`, plus ``p_univariate`` and ``p_multivariate``.
    """

    name = "select_predictors"

    def __init__(self, columns: Sequence[str], p_univariate: float = 0.10, p_multivariate: float = 0.05,
                 alpha: float = 0.05, tol: float = 1e-10, max_iter: int = 100,
                 *, min_count: int = DEFAULT_MIN_COUNT) -> None:
        super().__init__(columns, [[i] for i in range(len(columns))], alpha, tol, max_iter, min_count=min_count)
        self.p_uni, self.p_multi = p_univariate, p_multivariate
        self.univariate: pd.DataFrame | None = None

    def finish(self) -> Params | Final:
        if self.univariate is None:
            tabs = self.tables()
            self.univariate = (pd.concat([t.iloc[[1]] for t in tabs]) if tabs
                               else pd.DataFrame(columns=list(COLUMNS)))
            keep = [i for i, c in enumerate(self.columns) if self.univariate.loc[c, "p"] < self.p_uni]
            if not keep:
                return Final(SelectionResult(self.univariate, pd.DataFrame(columns=list(COLUMNS)), ()))
            self._set_models([keep])
            return self._params()
        multi = self.tables()[0]
        sel = tuple(t for t in multi.index if t != INTERCEPT and multi.loc[t, "p"] < self.p_multi)
        return Final(SelectionResult(self.univariate, multi, sel))


def _columns(sites: Sequence[Any] | Mapping[str, Any]) -> list[str]:
    first = next(iter(sites.values() if isinstance(sites, Mapping) else sites))
    return [str(c) for c in first[0].columns]


def federated_logistic_regression(
    sites: Sequence[tuple[pd.DataFrame, np.ndarray]] | Mapping[str, tuple[pd.DataFrame, np.ndarray]],
    alpha: float = 0.05, min_count: int = DEFAULT_MIN_COUNT,
) -> Federated[pd.DataFrame]:
    """Federated :func:`shared.stats.logistic_regression`; one ``(X, y)`` per site (same columns)."""
    return run_protocol(LogisticProtocol(_columns(sites), alpha=alpha, min_count=min_count), sites)


def federated_select_predictors(
    sites: Sequence[tuple[pd.DataFrame, np.ndarray]] | Mapping[str, tuple[pd.DataFrame, np.ndarray]],
    p_univariate: float = 0.10, p_multivariate: float = 0.05, alpha: float = 0.05,
    min_count: int = DEFAULT_MIN_COUNT,
) -> Federated[SelectionResult]:
    """Federated :func:`shared.stats.select_predictors`."""
    proto = SelectPredictorsProtocol(_columns(sites), p_univariate, p_multivariate, alpha, min_count=min_count)
    return run_protocol(proto, sites)
