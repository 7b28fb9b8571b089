"""Site-computed logistic regression, Firth's penalised logistic regression and predictor selection.

Every iterate is derived on the sites from the securely summed totals
(:mod:`shared.stats.sc_newton`); the server chooses nothing but the validated parameters.

Rounds
------
1. Each site adds its class counts, per column the sum of values, the count of values that are
   not 0/1 and, per class, the count of values equal to 1.
2. Each site adds per column the sum of squares around the pooled mean. Every site now holds the
   pooled mean and SD of each column and standardises ``z = (x - mean) / sd`` on site: the fits
   run on the standardised scale (bounded sums, well-conditioned Newton steps) and the released
   coefficients are transformed back exactly (both maximum likelihood and Firth's estimate are
   equivariant under affine changes of the columns). A column with SD <= 1e-8 * max(1, |mean|)
   is constant and cannot be fitted.
3. Newton rounds: per active fit, score, information, log-likelihood (and Firth's third-order
   sums) at the fit's current coefficients (:func:`shared.stats.sc_newton.local_terms`).

Methods
-------
``ml``: maximum likelihood (Newton-Raphson with step halving; :mod:`shared.stats.logistic`).
A fit fails when it does not converge in ``max_iter`` evaluations, its information matrix is
singular, or a standardised coefficient exceeds 20 log-odds per SD (separation: the ML estimate
does not exist). ``firth``: Firth's penalised likelihood (Jeffreys prior), exact from the same
site sums; finite under separation. ``auto``: ML, and Firth when the ML fit fails (the release
says so and why). Inference is Wald (``se`` from the inverse information at the estimate, normal
p-values and confidence intervals), for Firth fits too (logistf's ``pl=FALSE``; logistf's default
profile penalised-likelihood intervals are not computed).

:class:`SelectionSite` (Table 2): univariate screening of each candidate on its own (a candidate
whose ML fit fails is refitted with Firth's penalty instead, so one separated candidate never
stops the screen), a multivariable model of the candidates with univariate ``p < p_univariate``,
then backward elimination (drop the term with the largest p while it is ``>= p_multivariate``,
refit; ties: the first in candidate order) until every term has ``p < p_multivariate``. Every
step runs on the same fixed patient set, and every decision is taken by every site from totals.

Release (what the server sees)
------------------------------
Nothing but ``withheld`` unless the pooled cohort has at least ``k`` positives and ``k``
negatives. Then coefficient tables (``coef, se, z, p, odds_ratio, or_lo, or_hi`` per term on the
original scale), each fit's method, ``converged``, ``iterations``, ``grad_norm`` (of the score, or
Firth's modified score, at the estimate) and why ML failed where Firth was used; for the
selection the screened candidates, every model of the elimination and the selected terms.

Disclosure control: a univariate fit of a 0/1 predictor reproduces its 2x2 table with the
outcome (coefficients and standard errors determine the four counts). When the pooled column is
0/1 and a cell of that table is in (0, k), the coefficients of every model whose only predictor
it is are withheld (the screening decision, a yes/no, is still used and released). In models
with further predictors its coefficient is released (it no longer determines the counts). A
predictor that is discrete with a rare level should be given as 0/1 dummies so that this rule
applies to it. Pooled means and SDs of the columns stay on the sites.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

from ._checks import as_binary, check_min_count
from .logistic import COLUMNS, INTERCEPT, design
from .logistic import fit as ml_fit
from .results import SelectionResult
from .sc_common import (
    MAX_ITER_LIMIT,
    check_alpha,
    check_choice,
    check_columns,
    check_float,
    check_int,
    column_of,
    fnan,
    fnum,
    withheld,
)
from .sc_newton import (
    CONVERGED,
    convergence,
    covariance,
    is_active,
    is_firth,
    local_terms,
    new_fit,
    prefixed,
    term_layout,
    update,
)
from .sc_newton import beta as fit_beta
from .sitecomputed import (
    BIG_SUM_SPEC,
    COUNT_SPEC,
    CohortData,
    Released,
    SiteComputedProtocol,
    State,
    Withheld,
)

logger = logging.getLogger(__name__)

#: A standardised ML coefficient beyond this (log-odds per SD) is taken as separation.
SEP_LIMIT = 20.0
#: Largest Newton step per coordinate in a Firth fit (logistf's ``maxstep``).
FIRTH_MAX_STEP = 5.0
#: Most candidate predictors (the Firth terms grow as p**3).
MAX_CANDIDATES = 20
METHODS = ("ml", "firth", "auto")
EXTRA = ("method", "converged", "iterations", "grad_norm", "note")


# -- pooled Firth reference --------------------------------------------------------------------
def _firth_parts(D: np.ndarray, y: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Penalised log-likelihood, modified score (via explicit hat values) and information."""
    eta = D @ b
    mu = special.expit(eta)
    w = mu * (1 - mu)
    info = D.T @ (D * w[:, None])
    sign, logdet = np.linalg.slogdet(info)
    pll = float(y @ eta - np.logaddexp(0.0, eta).sum() + 0.5 * logdet) if sign > 0 else -np.inf
    h = w * np.einsum("ij,jk,ik->i", D, np.linalg.inv(info), D)
    return pll, D.T @ (y - mu + h * (0.5 - mu)), info


def firth_fit(D: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled Firth estimate by a generic optimiser (the reference for the federated fit).

    Maximises ``l(b) + 1/2 log det I(b)`` with BFGS from zero, then solves the modified score
    equations ``U*(b) = 0`` (hat values computed explicitly, per patient) with MINPACK's hybrid
    method from there: a different algorithm from the federated Newton iteration.

    Returns
    -------
    beta : ndarray of shape (p,)
    info : ndarray of shape (p, p)
        Fisher information at ``beta`` (its inverse is the Wald covariance, logistf ``pl=FALSE``).
    """
    yf = y.astype(np.float64)

    def neg(b: np.ndarray) -> tuple[float, np.ndarray]:
        pll, u, _ = _firth_parts(D, yf, b)
        return -pll, -u

    start = optimize.minimize(neg, np.zeros(D.shape[1]), jac=True, method="BFGS", options={"gtol": 1e-8})
    sol = optimize.root(lambda b: _firth_parts(D, yf, b)[1], start.x, method="hybr", options={"xtol": 1e-14})
    # MINPACK may say "not making good progress" once at machine precision: judge by the residual
    resid = np.abs(_firth_parts(D, yf, sol.x)[1]).max()
    if not np.isfinite(resid) or resid > 1e-9 * max(1.0, float(np.abs(D).sum())):
        raise ValueError(f"Firth reference did not converge: {sol.message} (max |U*| = {resid:.3g})")
    return sol.x, _firth_parts(D, yf, sol.x)[2]


def wald_table(coef: np.ndarray, cov: np.ndarray, terms: Sequence[str], alpha: float = 0.05) -> pd.DataFrame:
    """Coefficient table (``coef, se, z, p, odds_ratio, or_lo, or_hi``) indexed by term."""
    se = np.sqrt(np.diag(cov))
    z = coef / se
    q = stats.norm.ppf(1 - alpha / 2)
    return pd.DataFrame({"coef": coef, "se": se, "z": z, "p": 2 * stats.norm.sf(np.abs(z)),
                         "odds_ratio": np.exp(coef), "or_lo": np.exp(coef - q * se),
                         "or_hi": np.exp(coef + q * se)}, index=pd.Index(list(terms), name="term"))


def firth_logistic_regression(X: pd.DataFrame, y: np.ndarray, alpha: float = 0.05) -> pd.DataFrame:
    """Pooled Firth-penalised logistic regression with Wald inference (reference implementation).

    Parameters
    ----------
    X : DataFrame of shape (n_samples, n_predictors)
        Numeric predictors; an intercept is added.
    y : array-like of shape (n_samples,)
    alpha : float

    Returns
    -------
    DataFrame
        As :func:`shared.stats.logistic_regression`: indexed by term, ``coef, se, z, p,
        odds_ratio, or_lo, or_hi``; finite under separation.
    """
    yy = as_binary(y, "y")
    D, terms = design(X)
    if D.shape[0] != yy.size:
        raise ValueError(f"X has {D.shape[0]} rows but y has {yy.size}")
    b, info = firth_fit(D, yy)
    return wald_table(b, np.linalg.inv(info), terms, alpha)


def _pooled_fit(X: pd.DataFrame, y: np.ndarray, method: str, alpha: float) -> tuple[pd.DataFrame | None, str, str]:
    """One pooled fit under the site rules: (table or None, method used, why ML failed)."""
    yy = as_binary(y, "y").astype(np.float64)
    D, terms = design(X)
    why = ""
    if method in ("ml", "auto"):
        try:
            s = ml_fit(D, yy, terms)
            sd = X.std(ddof=1).to_numpy() if X.shape[1] else np.zeros(0)
            if X.shape[1] and np.abs(s.beta[1:] * sd).max() > SEP_LIMIT:
                raise ValueError("separation")
            return s.table(terms, alpha), "ml", ""
        except (ValueError, np.linalg.LinAlgError) as exc:
            why = str(exc)
            if method == "ml":
                return None, "ml", why
    return firth_logistic_regression(X, yy, alpha), "firth", why


def pooled_selection(X: pd.DataFrame, y: np.ndarray, p_univariate: float = 0.10, p_multivariate: float = 0.05,
                     alpha: float = 0.05, firth: str = "auto") -> dict[str, Any]:
    """Pooled reference of :class:`SelectionSite` (same rules, pooled fits).

    Returns
    -------
    dict
        ``univariate`` (DataFrame of the candidates' rows, with ``method``), ``models`` (list of
        coefficient tables, first the multivariable model, then each refit), ``selected``.
    """
    rows, uni_method = [], {}
    mode = "firth" if firth == "always" else ("ml" if firth == "never" else "auto")
    for c in X.columns:
        t, m, _ = _pooled_fit(X[[c]], y, mode, alpha)
        if t is not None:
            rows.append(t.loc[[c]])
            uni_method[c] = m
    uni = pd.concat(rows) if rows else pd.DataFrame(columns=list(COLUMNS))
    uni["method"] = [uni_method[c] for c in uni.index]
    keep = [c for c in X.columns if c in uni.index and uni.loc[c, "p"] < p_univariate]
    models: list[pd.DataFrame] = []
    selected: tuple[str, ...] = ()
    while keep:
        t, _, _ = _pooled_fit(X[keep], y, mode, alpha)
        if t is None:
            break
        models.append(t)
        p = t["p"].drop(INTERCEPT)
        worst = max(keep, key=lambda c: (p[c], -keep.index(c)))
        if p[worst] < p_multivariate:
            selected = tuple(keep)
            break
        keep = [c for c in keep if c != worst]
    return {"univariate": uni, "models": models, "selected": selected}


# -- site protocols ----------------------------------------------------------------------------
def _table_payload(table: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"term": str(t), **{c: fnum(table.loc[t, c]) for c in COLUMNS}} for t in table.index]


def _table_from_payload(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(columns=list(COLUMNS), index=pd.Index([], name="term"), dtype=np.float64)
    return pd.DataFrame({c: [fnan(r[c]) for r in rows] for c in COLUMNS},
                        index=pd.Index([r["term"] for r in rows], name="term"))


class _StandardisedLogistic(SiteComputedProtocol):
    """Shared rounds: pooled standardisation, then batches of Newton fits on the standardised columns."""

    def _setup(self, columns: list[str], alpha: float, max_iter: int, tol: float) -> None:
        self.columns = tuple(columns)
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol

    def init_state(self) -> State:
        return {"round": 0, "stage": "prep1", "n_fits": 0, "batch": []}

    # -- helpers over the state --------------------------------------------------------------
    def _add_fit(self, state: State, terms: list[int], method: str, **meta: Any) -> str:
        fid = f"f{state['n_fits']}"
        state["n_fits"] = int(state["n_fits"]) + 1
        new_fit(state, fid, 1 + len(terms), method=method, max_iter=self.max_iter, tol=self.tol,
                sep_limit=SEP_LIMIT if method == "ml" else None,
                max_step=FIRTH_MAX_STEP if method == "firth" else None, terms=list(terms), **meta)
        state["batch"] = [*state["batch"], fid]
        return fid

    def _z(self, data: CohortData, state: State) -> np.ndarray:
        X = np.column_stack([column_of(data, c) for c in self.columns]) if data.n else np.zeros((0, len(self.columns)))
        sd = np.asarray(state["sd"], dtype=np.float64)
        return (X - np.asarray(state["mean"], dtype=np.float64)) / np.where(sd > 0, sd, 1.0)

    def _table(self, state: State, fid: str) -> pd.DataFrame:
        """Coefficient table of a finished fit on the original scale."""
        terms = state[fid]["terms"]
        g = fit_beta(state, fid)
        cov_g = covariance(state, fid)
        m = np.asarray(state["mean"], dtype=np.float64)[terms]
        s = np.asarray(state["sd"], dtype=np.float64)[terms]
        A = np.eye(1 + len(terms))
        A[0, 1:] = -m / s
        A[1:, 1:] = np.diag(1.0 / s)
        return wald_table(A @ g, A @ cov_g @ A.T, [INTERCEPT, *[self.columns[j] for j in terms]], self.alpha)

    def _small_binary(self, state: State, k: int) -> list[bool]:
        """Per column: pooled 0/1 with a 2x2 (value x outcome) cell in (0, k)."""
        n0, n1 = (int(v) for v in state["n"])
        out = []
        for j in range(len(self.columns)):
            if not state["binary"][j]:
                out.append(False)
                continue
            a0, a1 = (int(v) for v in state["x1"][j])
            cells = np.array([a0, a1, n0 - a0, n1 - a1])
            out.append(bool(((cells > 0) & (cells < k)).any()))
        return out

    # -- protocol methods ----------------------------------------------------------------------
    def layout(self, state: State) -> dict[str, dict[str, Any]]:
        c = len(self.columns)
        if state["stage"] == "prep1":
            return {"n": {"shape": (2,), **COUNT_SPEC}, "sum": {"shape": (c,), **BIG_SUM_SPEC},
                    "nonbinary": {"shape": (c,), **COUNT_SPEC}, "x1": {"shape": (c, 2), **COUNT_SPEC}}
        if state["stage"] == "prep2":
            return {"ss": {"shape": (c,), **BIG_SUM_SPEC}}
        out: dict[str, dict[str, Any]] = {}
        for fid in state["batch"]:
            if is_active(state, fid):
                out.update(term_layout(fid, state[fid]["p"], is_firth(state, fid)))
        return out

    def local(self, data: CohortData, state: State) -> dict[str, np.ndarray]:
        y = data.y
        if state["stage"] in ("prep1", "prep2"):
            X = np.column_stack([column_of(data, c) for c in self.columns]) if data.n \
                else np.zeros((0, len(self.columns)))
            if state["stage"] == "prep1":
                return {"n": np.array([(y == 0).sum(), (y == 1).sum()], np.float64), "sum": X.sum(axis=0),
                        "nonbinary": (~np.isin(X, (0.0, 1.0))).sum(axis=0).astype(np.float64),
                        "x1": np.stack([((X == 1.0) & (y[:, None] == 0)).sum(axis=0),
                                        ((X == 1.0) & (y[:, None] == 1)).sum(axis=0)], axis=1).astype(np.float64)}
            return {"ss": ((X - np.asarray(state["mean"])) ** 2).sum(axis=0)}
        Z = self._z(data, state)
        out: dict[str, np.ndarray] = {}
        for fid in state["batch"]:
            if is_active(state, fid):
                D = np.column_stack([np.ones(data.n), Z[:, state[fid]["terms"]]])
                out.update(prefixed(fid, local_terms(D, y, fit_beta(state, fid), is_firth(state, fid))))
        return out

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        new = dict(state)
        new["round"] = int(state["round"]) + 1
        if state["stage"] == "prep1":
            n = np.rint(np.asarray(totals["n"])).astype(np.int64)
            nn = max(int(n.sum()), 1)
            new.update(n=[int(n[0]), int(n[1])], mean=np.asarray(totals["sum"], np.float64) / nn,
                       binary=[bool(v == 0) for v in np.rint(np.asarray(totals["nonbinary"]))],
                       x1=np.rint(np.asarray(totals["x1"])).astype(np.int64), stage="prep2")
            return new, False
        if state["stage"] == "prep2":
            n = int(sum(state["n"]))
            sd = np.sqrt(np.maximum(np.asarray(totals["ss"], np.float64), 0.0) / max(n - 1, 1))
            mean = np.asarray(state["mean"], np.float64)
            const = sd <= 1e-8 * np.maximum(1.0, np.abs(mean))
            new.update(sd=np.where(const, 0.0, sd), constant=[bool(v) for v in const], stage="fit")
            return self._next(new)
        for fid in state["batch"]:
            if is_active(state, fid):
                update(new, fid, {k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith(fid + ".")})
        if any(is_active(new, fid) for fid in new["batch"]):
            return new, False
        return self._next(new)

    def _next(self, state: State) -> tuple[State, bool]:
        """Start the next batch of fits (subclasses); ``(state, done)``."""
        raise NotImplementedError

    def _fit_record(self, state: State, fid: str, k: int, small: list[bool]) -> dict[str, Any]:
        """Released record of one finished fit (coefficient rows, convergence, disclosure notes)."""
        terms = state[fid]["terms"]
        rec: dict[str, Any] = {"terms": [self.columns[j] for j in terms], **convergence(state, fid),
                               "ml_failure": state[fid].get("ml_failure", ""), "table": [], "withheld": ""}
        if state[fid]["status"] != CONVERGED:
            return rec
        if len(terms) == 1 and small[terms[0]]:
            rec["withheld"] = (f"0/1 predictor whose 2x2 table with the outcome has a cell below k={k}: its "
                               "univariate coefficients would reveal that count")
            return rec
        rec["table"] = _table_payload(self._table(state, fid))
        return rec

    def _base_release(self, state: State, k: int) -> tuple[Released, bool]:
        n0, n1 = (int(v) for v in state["n"])
        out: Released = {"protocol": self.name, "params": dict(self.params)}
        if n1 < k or n0 < k:
            return {**out, "released": False, "withheld": [withheld(
                self.name, f"the cohort has fewer than k={k} positives or negatives; withheld")]}, False
        return {**out, "released": True, "n_pos": n1, "n_neg": n0}, True


class LogisticSite(_StandardisedLogistic):
    """One logistic model ``y ~ 1 + columns`` by ML, Firth, or ML with Firth fallback ("auto").

    Parameters
    ----------
    columns : list of str
        1 to 20 predictors.
    method : {"ml", "firth", "auto"}
    alpha : float
        In (0, 0.5), for the odds-ratio intervals.
    max_iter : int
        Newton evaluations per fit, 1 to 100.
    tol : float
        Convergence tolerance on the (standardised) Newton step, in [1e-12, 1e-4].
    """

    name: ClassVar[str] = "logistic"

    def __init__(self, columns: Sequence[str], method: str = "auto", alpha: float = 0.05, max_iter: int = 300,
                 tol: float = 1e-8) -> None:
        super().__init__()
        self._keep(columns=check_columns("columns", columns, MAX_CANDIDATES),
                   method=check_choice("method", method, METHODS), alpha=check_alpha(alpha),
                   max_iter=check_int("max_iter", max_iter, 1, MAX_ITER_LIMIT),
                   tol=check_float("tol", tol, 1e-12, 1e-4, open_lo=False, open_hi=False))
        self._setup(list(self.params["columns"]), float(self.params["alpha"]), int(self.params["max_iter"]),
                    float(self.params["tol"]))
        self.method = self.params["method"]
        self.max_rounds = 3 + 2 * (self.max_iter + 1)  # type: ignore[misc]

    def _next(self, state: State) -> tuple[State, bool]:
        if "model" not in state:  # after standardisation
            if any(state["constant"]):
                state["model"] = ""
                state["error"] = "constant column(s): " + ", ".join(
                    c for c, k in zip(self.columns, state["constant"], strict=True) if k)
                return state, True
            state["batch"] = []
            state["model"] = self._add_fit(state, list(range(len(self.columns))),
                                           "firth" if self.method == "firth" else "ml")
            return state, False
        fid = state["model"]
        if self.method == "auto" and state[fid]["method"] == "ml" and state[fid]["status"] != CONVERGED:
            state["batch"] = []
            why = state[fid]["reason"]
            state["model"] = self._add_fit(state, list(range(len(self.columns))), "firth", ml_failure=why)
            return state, False
        return state, True

    def release(self, state: State, min_count: int) -> Released:
        k = check_min_count(min_count)
        out, ok = self._base_release(state, k)
        if not ok:
            return out
        if not state.get("model"):
            return {**out, "model": None, "withheld": [withheld("logistic", state.get("error", "no model"))]}
        rec = self._fit_record(state, state["model"], k, self._small_binary(state, k))
        notes = [withheld("logistic", rec["withheld"])] if rec["withheld"] else []
        if not rec["converged"]:
            notes.append(withheld("logistic", f"the fit did not converge: {rec['reason']}"))
        return {**out, "model": rec, "withheld": notes}

    def result(self, released: Released) -> LogisticRelease:
        wh = tuple(Withheld(w["quantity"], w["reason"]) for w in released.get("withheld", []))
        rec = released.get("model")
        if not released.get("released") or not rec:
            return LogisticRelease(None, {}, wh)
        return LogisticRelease(_table_from_payload(rec["table"]) if rec["table"] else None,
                               {k: rec[k] for k in ("method", "converged", "iterations", "grad_norm", "reason",
                                                    "ml_failure")}, wh)


@dataclass(frozen=True)
class LogisticRelease:
    """Release of :class:`LogisticSite`: coefficient table (None when withheld) and the fit record."""

    table: pd.DataFrame | None
    fit: dict[str, Any]
    withheld: tuple[Withheld, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SiteSelection:
    """Release of :class:`SelectionSite` (Table 2).

    Attributes
    ----------
    univariate : DataFrame
        One row per candidate: ``coef, se, z, p, odds_ratio, or_lo, or_hi`` (NaN where withheld or
        not fitted) and ``method, converged, iterations, grad_norm, note``.
    models : list of DataFrame
        The multivariable model and every refit of the backward elimination (with intercept).
    fits : list of dict
        Per model: terms, method, converged, iterations, grad_norm, reason, ml_failure, dropped.
    selected : tuple of str
    withheld : tuple of Withheld
    """

    univariate: pd.DataFrame
    models: list[pd.DataFrame]
    fits: list[dict[str, Any]]
    selected: tuple[str, ...]
    withheld: tuple[Withheld, ...] = field(default_factory=tuple)

    def to_selection_result(self) -> SelectionResult:
        """The pooled :class:`~shared.stats.results.SelectionResult` shape (first multivariable model)."""
        multi = self.models[0] if self.models else pd.DataFrame(columns=list(COLUMNS))
        return SelectionResult(self.univariate[list(COLUMNS)], multi, self.selected)


class SelectionSite(_StandardisedLogistic):
    """Univariate screening, multivariable model and backward elimination (see module docstring).

    Parameters
    ----------
    candidates : list of str
        1 to 20 candidate predictors.
    p_univariate, p_multivariate : float
        In (0, 1] (1 keeps every candidate / term).
    alpha : float
        In (0, 0.5).
    firth : {"auto", "never", "always"}
        Firth's penalty when ML fails (default), never, or for every fit.
    max_iter : int
        Newton evaluations per fit, 1 to 100.
    tol : float
        In [1e-12, 1e-4].
    """

    name: ClassVar[str] = "select_predictors"

    def __init__(self, candidates: Sequence[str], p_univariate: float = 0.10, p_multivariate: float = 0.05,
                 alpha: float = 0.05, firth: str = "auto", max_iter: int = 300, tol: float = 1e-8) -> None:
        super().__init__()
        self._keep(candidates=check_columns("candidates", candidates, MAX_CANDIDATES),
                   p_univariate=check_float("p_univariate", p_univariate, 0.0, 1.0, open_hi=False),
                   p_multivariate=check_float("p_multivariate", p_multivariate, 0.0, 1.0, open_hi=False),
                   alpha=check_alpha(alpha), firth=check_choice("firth", firth, ("auto", "never", "always")),
                   max_iter=check_int("max_iter", max_iter, 1, MAX_ITER_LIMIT),
                   tol=check_float("tol", tol, 1e-12, 1e-4, open_lo=False, open_hi=False))
        self._setup(list(self.params["candidates"]), float(self.params["alpha"]), int(self.params["max_iter"]),
                    float(self.params["tol"]))
        self.firth = self.params["firth"]
        c = len(self.columns)
        self.max_rounds = 3 + (self.max_iter + 1) * (2 + 2 * c)  # type: ignore[misc]

    def _method(self) -> str:
        return "firth" if self.firth == "always" else "ml"

    def _p_values(self, state: State, fid: str) -> np.ndarray:
        """Wald p of each non-intercept term (scale-free: same on the standardised scale)."""
        g = fit_beta(state, fid)[1:]
        se = np.sqrt(np.diag(covariance(state, fid)))[1:]
        return 2 * stats.norm.sf(np.abs(g / se))

    def _fallback(self, state: State, fid: str) -> bool:
        return self.firth == "auto" and state[fid]["method"] == "ml" and state[fid]["status"] != CONVERGED

    def _next(self, state: State) -> tuple[State, bool]:
        stage = state.get("sel", "start")
        batch = list(state["batch"])
        state["batch"] = []
        if stage == "start":
            state["uni"] = {}
            for j, const in enumerate(state["constant"]):
                if not const:
                    state["uni"][str(j)] = self._add_fit(state, [j], self._method(), role="uni")
            state["sel"] = "uni"
            return (state, False) if state["batch"] else self._after_uni(state)
        if stage == "uni":
            uni = dict(state["uni"])
            for j, fid in uni.items():
                if self._fallback(state, fid):
                    uni[j] = self._add_fit(state, [int(j)], "firth", role="uni", ml_failure=state[fid]["reason"])
            state["uni"] = uni
            state["sel"] = "uni_firth"
            return (state, False) if state["batch"] else self._after_uni(state)
        if stage == "uni_firth":
            return self._after_uni(state)
        # stage "multi": the batch's model just finished
        fid = batch[-1]
        if self._fallback(state, fid):
            self._add_fit(state, state[fid]["terms"], "firth", role="multi", ml_failure=state[fid]["reason"])
            return state, False
        state["models"] = [*state["models"], fid]
        if state[fid]["status"] != CONVERGED:
            state["selected"] = []
            state["sel_error"] = f"model on {[self.columns[j] for j in state[fid]['terms']]} failed: " \
                                 f"{state[fid]['reason']}"
            return state, True
        terms = list(state[fid]["terms"])
        p = self._p_values(state, fid)
        worst = int(np.argmax(p))  # first maximum = first in candidate order among ties
        if p[worst] < self.params["p_multivariate"]:
            state["selected"] = terms
            return state, True
        state["dropped"] = [*state["dropped"], terms[worst]]
        rest = [t for t in terms if t != terms[worst]]
        if not rest:
            state["selected"] = []
            return state, True
        self._add_fit(state, rest, self._method(), role="multi")
        return state, False

    def _after_uni(self, state: State) -> tuple[State, bool]:
        screened = []
        for j in range(len(self.columns)):
            fid = state["uni"].get(str(j))
            if fid and state[fid]["status"] == CONVERGED and self._p_values(state, fid)[0] < self.params["p_univariate"]:
                screened.append(j)
        state.update(screened=screened, models=[], dropped=[], sel="multi")
        if not screened:
            state["selected"] = []
            return state, True
        self._add_fit(state, screened, self._method(), role="multi")
        return state, False

    def release(self, state: State, min_count: int) -> Released:
        k = check_min_count(min_count)
        out, ok = self._base_release(state, k)
        if not ok:
            return out
        small = self._small_binary(state, k)
        notes = []
        uni = []
        for j, c in enumerate(self.columns):
            fid = state.get("uni", {}).get(str(j))
            if fid is None:
                uni.append({"term": c, "converged": False, "method": None, "iterations": 0, "grad_norm": None,
                            "reason": "constant column", "ml_failure": "", "table": [], "withheld": ""})
                continue
            rec = self._fit_record(state, fid, k, small)
            rec["term"] = c
            uni.append(rec)
            if rec["withheld"]:
                notes.append(withheld(f"univariate.{c}", rec["withheld"]))
            if rec["ml_failure"] and rec["method"] == "firth":
                notes.append(withheld(f"univariate.{c}", f"fitted with Firth's penalty: ML failed "
                                                         f"({rec['ml_failure']})"))
        models = []
        dropped = list(state.get("dropped", []))
        for i, fid in enumerate(state.get("models", [])):
            rec = self._fit_record(state, fid, k, small)
            rec["dropped"] = self.columns[dropped[i]] if i < len(dropped) else None
            models.append(rec)
            if rec["withheld"]:
                notes.append(withheld(f"model.{i}", rec["withheld"]))
            if rec["ml_failure"] and rec["method"] == "firth":
                notes.append(withheld(f"model.{i}", f"fitted with Firth's penalty: ML failed ({rec['ml_failure']})"))
        if state.get("sel_error"):
            notes.append(withheld("selection", state["sel_error"]))
        return {**out, "univariate": uni, "screened": [self.columns[j] for j in state.get("screened", [])],
                "models": models, "selected": [self.columns[j] for j in state.get("selected", [])],
                "withheld": notes}

    def result(self, released: Released) -> SiteSelection:
        wh = tuple(Withheld(w["quantity"], w["reason"]) for w in released.get("withheld", []))
        if not released.get("released"):
            empty = pd.DataFrame(columns=[*COLUMNS, *EXTRA])
            return SiteSelection(empty, [], [], (), wh)
        rows = []
        for rec in released["univariate"]:
            row: dict[str, Any] = dict.fromkeys(COLUMNS, np.nan)
            for r in rec["table"]:
                if r["term"] == rec["term"]:
                    row.update({c: fnan(r[c]) for c in COLUMNS})
            row.update(method=rec["method"], converged=rec["converged"], iterations=rec["iterations"],
                       grad_norm=fnan(rec["grad_norm"]), note=rec["withheld"] or rec["reason"])
            rows.append(pd.Series(row, name=rec["term"]))
        uni = pd.DataFrame(rows)
        uni.index.name = "term"
        models = [_table_from_payload(m["table"]) for m in released["models"]]
        fits = [{k: m[k] for k in ("terms", "method", "converged", "iterations", "grad_norm", "reason", "ml_failure",
                                   "dropped", "withheld")} for m in released["models"]]
        return SiteSelection(uni, models, fits, tuple(released["selected"]), wh)
