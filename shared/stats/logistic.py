"""Logistic regression by Newton-Raphson, written so the same iterations run pooled or federated.

The server side of the fit is :class:`NewtonSolver`: it holds the coefficients, receives the
gradient ``X'(y - mu)``, the information matrix ``X'WX`` and the log-likelihood at the current
coefficients (summed over sites, or computed on the pooled data), and proposes the next
coefficients. :func:`logistic_regression` drives it with the pooled data; the federated protocol
drives it with site sums, so both follow the same iterates (they differ only in summation
order, ~1e-13). Standard errors come from the inverse information matrix, Wald z, two-sided
normal p-values and Wald CIs of the odds ratios, as statsmodels ``Logit`` and R ``glm``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special, stats

from ._checks import as_binary, check_alpha, where
from .results import SelectionResult

logger = logging.getLogger(__name__)

INTERCEPT = "intercept"
COLUMNS = ("coef", "se", "z", "p", "odds_ratio", "or_lo", "or_hi")


def newton_terms(
    X: np.ndarray, y: np.ndarray, beta: np.ndarray, offset: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Gradient, information matrix and log-likelihood of a logistic model.

    Parameters
    ----------
    X : ndarray of shape (n, p)
        Design matrix (the intercept column included by the caller).
    y : ndarray of shape (n,), 0/1
    beta : ndarray of shape (p,)
    offset : ndarray of shape (n,), optional

    Returns
    -------
    grad : ndarray of shape (p,)
        ``X'(y - mu)``.
    info : ndarray of shape (p, p)
        ``X' diag(mu (1 - mu)) X``.
    loglik : float
    """
    eta = X @ beta
    if offset is not None:
        eta = eta + offset
    mu = special.expit(eta)
    w = mu * (1.0 - mu)
    grad = X.T @ (y - mu)
    info = X.T @ (X * w[:, None])
    loglik = float(y @ eta - np.logaddexp(0.0, eta).sum())
    return grad, info, loglik


@dataclass
class NewtonSolver:
    """Server-side Newton-Raphson with step halving.

    Call :meth:`update` with the summed ``(grad, info, loglik)`` evaluated at :attr:`beta`; it
    returns True when converged (then :attr:`beta` is final and :attr:`info` is the information
    at the last evaluated point, for standard errors).

    Parameters
    ----------
    n_params : int
    tol : float
        Converged when the largest Newton step is below ``tol``.
    max_iter : int
        Evaluations allowed before :class:`ValueError` (typically separation).
    """

    n_params: int
    tol: float = 1e-10
    max_iter: int = 100
    terms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.beta = np.zeros(self.n_params)
        self.info = np.zeros((self.n_params, self.n_params))
        self.loglik = -np.inf
        self.n_eval = 0
        self.converged = False
        self._prev: tuple[np.ndarray, np.ndarray, float, np.ndarray] | None = None

    def update(self, grad: np.ndarray, info: np.ndarray, loglik: float) -> bool:
        self.n_eval += 1
        if self._prev is not None and loglik < self._prev[2] - 1e-9 * (1 + abs(self._prev[2])):
            beta0, _, _, step = self._prev  # overshoot: halve the step
            if np.abs(step).max() < self.tol:
                raise ValueError(self._fail("step halving stalled"))
            step = step / 2
            self._prev = (beta0, self._prev[1], self._prev[2], step)
            self.beta = beta0 + step
            return self._check_budget()
        try:
            step = np.linalg.solve(info, grad)
        except np.linalg.LinAlgError:
            raise ValueError(self._fail("singular information matrix")) from None
        if not np.isfinite(step).all():
            raise ValueError(self._fail("non-finite Newton step"))
        self.info, self.loglik = info, loglik
        self._prev = (self.beta.copy(), info, loglik, step)
        self.beta = self.beta + step
        if np.abs(step).max() < self.tol:
            self.converged = True
            return True
        return self._check_budget()

    def _check_budget(self) -> bool:
        if self.n_eval >= self.max_iter:
            raise ValueError(self._fail(f"no convergence in {self.max_iter} iterations"))
        return False

    def _fail(self, why: str) -> str:
        big = ""
        if self.terms:
            order = np.argsort(-np.abs(self.beta))[:3]
            big = " (largest |coef|: " + ", ".join(f"{self.terms[i]}={self.beta[i]:.3g}" for i in order) + ")"
        return (
            f"logistic regression failed: {why}; the predictors may be collinear or separate the "
            f"outcome (complete or quasi-complete separation){big}"
        )

    def table(self, terms: list[str], alpha: float = 0.05) -> pd.DataFrame:
        """Coefficient table indexed by term: coef, se, z, p, odds_ratio, or_lo, or_hi."""
        cov = np.linalg.inv(self.info)
        se = np.sqrt(np.diag(cov))
        z = self.beta / se
        q = stats.norm.ppf(1 - alpha / 2)
        return pd.DataFrame(
            {
                "coef": self.beta,
                "se": se,
                "z": z,
                "p": 2 * stats.norm.sf(np.abs(z)),
                "odds_ratio": np.exp(self.beta),
                "or_lo": np.exp(self.beta - q * se),
                "or_hi": np.exp(self.beta + q * se),
            },
            index=pd.Index(terms, name="term"),
        )


def design(X: pd.DataFrame, site: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Intercept + the numeric columns of ``X``.

    Returns
    -------
    D : ndarray of shape (n, 1 + p)
    terms : list of str
        ``["intercept", *X.columns]``.
    """
    if not isinstance(X, pd.DataFrame):
        raise ValueError("X must be a pandas DataFrame (its columns name the terms)")
    if INTERCEPT in X.columns:
        raise ValueError(f"X must not contain a column named {INTERCEPT!r}; it is added")
    cols = [str(c) for c in X.columns]
    for c in X.columns:
        if not (pd.api.types.is_numeric_dtype(X[c]) or pd.api.types.is_bool_dtype(X[c])):
            raise ValueError(f"column {c!r}{where(site)} is not numeric; encode it (e.g. dummies) first")
    D = np.column_stack([np.ones(len(X)), X.to_numpy(dtype=np.float64)]) if cols else np.ones((len(X), 1))
    bad = ~np.isfinite(D).all(axis=0)
    if bad.any():
        names = [(["intercept", *cols])[i] for i in np.flatnonzero(bad)]
        raise ValueError(f"column(s) {names}{where(site)} contain NaN or infinite values")
    return D, [INTERCEPT, *cols]


def fit(
    D: np.ndarray, y: np.ndarray, terms: list[str], offset: np.ndarray | None = None,
    tol: float = 1e-10, max_iter: int = 100,
) -> NewtonSolver:
    """Pooled Newton-Raphson fit (the same solver the federated server runs)."""
    solver = NewtonSolver(D.shape[1], tol, max_iter, tuple(terms))
    while not solver.update(*newton_terms(D, y, solver.beta, offset)):
        pass
    return solver


def logistic_regression(X: pd.DataFrame, y: np.ndarray, alpha: float = 0.05) -> pd.DataFrame:
    """Maximum-likelihood logistic regression with Wald inference.

    Parameters
    ----------
    X : DataFrame of shape (n_samples, n_predictors)
        Numeric predictors; an intercept is added.
    y : array-like of shape (n_samples,)
        0/1 outcome.
    alpha : float
        For the odds-ratio confidence intervals.

    Returns
    -------
    DataFrame
        Indexed by term (``"intercept"`` first), columns ``coef, se, z, p, odds_ratio, or_lo,
        or_hi``.

    Raises
    ------
    ValueError
        Non-numeric or missing predictors, a single outcome class, collinearity or separation.
    """
    alpha = check_alpha(alpha)
    yy = as_binary(y, "y")
    D, terms = design(X)
    if D.shape[0] != yy.size:
        raise ValueError(f"X has {D.shape[0]} rows but y has {yy.size}")
    if yy.sum() in (0, yy.size):
        raise ValueError("y has a single class; the model is not identifiable")
    return fit(D, yy.astype(np.float64), terms).table(terms, alpha)


def select_predictors(
    X: pd.DataFrame, y: np.ndarray, p_univariate: float = 0.10, p_multivariate: float = 0.05,
    alpha: float = 0.05,
) -> SelectionResult:
    """Univariate screening, then one multivariate model of the screened predictors.

    Parameters
    ----------
    X : DataFrame of shape (n_samples, n_candidates)
    y : array-like of shape (n_samples,)
    p_univariate : float
        A candidate enters the multivariate model when its univariate Wald p < this.
    p_multivariate : float
        A term of the multivariate model is selected when its Wald p < this.

    Returns
    -------
    SelectionResult
    """
    uni = pd.concat(
        [logistic_regression(X[[c]], y, alpha).loc[[str(c)]] for c in X.columns]
    ) if len(X.columns) else pd.DataFrame(columns=list(COLUMNS))
    keep = [c for c in X.columns if uni.loc[str(c), "p"] < p_univariate]
    if not keep:
        return SelectionResult(uni, pd.DataFrame(columns=list(COLUMNS)), ())
    multi = logistic_regression(X[keep], y, alpha)
    sel = tuple(t for t in multi.index if t != INTERCEPT and multi.loc[t, "p"] < p_multivariate)
    return SelectionResult(uni, multi, sel)
