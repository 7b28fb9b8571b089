"""Newton-Raphson fits of logistic models that every site drives itself from securely summed totals.

A *fit* lives in the protocol state (flat keys ``"<fid>"`` for its JSON bookkeeping and
``"<fid>.beta"`` etc. for arrays). Each round every site evaluates, at the fit's current
coefficients (from the state, never from a message), the additive terms of its patients
(:func:`local_terms`): the score ``X'(y - mu)``, the information ``X'WX``, the log-likelihood and,
for Firth's penalty, the third-order sums ``T[j,k,l] = sum_i w_i (1/2 - mu_i) x_ij x_ik x_il``. With
the totals every site runs the same :func:`update`: a Newton step with step halving (the same rule
as :class:`shared.stats.logistic.NewtonSolver`), so all sites hold the same next iterate.

Firth (1993) / Heinze & Schemper (2002): the penalised log-likelihood is
``l*(b) = l(b) + 1/2 log det I(b)`` (Jeffreys prior); its modified score is
``U*_j = sum_i (y_i - mu_i + h_i (1/2 - mu_i)) x_ij`` with hat values ``h_i = w_i x_i' I^-1 x_i``.
Since ``sum_i h_i (1/2 - mu_i) x_ij = sum_kl (I^-1)_kl T[j,k,l]``, the modified score is exact from
the same round's totals (no second round for the hat values). The Newton-type step is
``I^-1 U*`` (as logistf), at most ``max_step`` in any coordinate, halved while ``l*`` decreases.

A fit ends ``converged`` after a step below ``tol`` and one more evaluation at the final
coefficients (the information there gives the standard errors, and the released gradient norm is
the score's there), or ``failed`` with a reason (no convergence in ``max_iter`` evaluations,
singular information, stalled step halving, or - when ``sep_limit`` is set - a coefficient
beyond it: separation). Iterates are rounded to multiples of 2**-40 so that sites whose linear
algebra differs in the last bits still hold identical states.

Encoding (secure aggregation): score, information and third-order sums use 2**-32 resolution
up to 2**24 per site (:data:`~shared.stats.sc_common.NEWTON_SPEC`); on standardised columns
(``sum z**2 = n - 1``) a site's score is at most ``n``, its information entries at most
``n / 4`` and its third-order sums at most ``0.1 * n**1.5`` (n = pooled patients), which fits for
n up to about 1.3e5 in the worst case of one extreme outlier and far more in practice; a site
whose sums exceed the bound refuses to contribute (``check_contribution`` names the array). The
log-likelihood uses :data:`~shared.stats.sc_common.LOGLIK_SPEC` (per-patient terms clipped at
-1000, which only ever signals an overshooting step).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import special

from .sc_common import LOGLIK_FLOOR, LOGLIK_SPEC, NEWTON_SPEC, quantise
from .sitecomputed import State

logger = logging.getLogger(__name__)

RUNNING, FINAL, CONVERGED, FAILED = "running", "final", "converged", "failed"
#: Absolute slack when comparing log-likelihoods: the secure sum's fixed-point resolution.
LL_SLACK = 1e-7


def local_terms(D: np.ndarray, y: np.ndarray, beta: np.ndarray, firth: bool,
                offset: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One site's additive Newton terms at ``beta``.

    Parameters
    ----------
    D : ndarray of shape (n, p)
        Design matrix (intercept column included).
    y : ndarray of shape (n,), 0/1
    beta : ndarray of shape (p,)
    firth : bool
        Also return ``T`` (p, p, p).
    offset : ndarray of shape (n,), optional

    Returns
    -------
    dict
        ``grad`` (p,), ``info`` (p, p), ``ll`` (1,) (per-patient terms clipped at
        :data:`~shared.stats.sc_common.LOGLIK_FLOOR`), and ``T`` when ``firth``.
    """
    eta = D @ beta
    if offset is not None:
        eta = eta + offset
    mu = special.expit(eta)
    w = mu * (1.0 - mu)
    yf = y.astype(np.float64)
    out = {
        "grad": D.T @ (yf - mu),
        "info": D.T @ (D * w[:, None]),
        "ll": np.array([np.maximum(yf * eta - np.logaddexp(0.0, eta), LOGLIK_FLOOR).sum()]),
    }
    if firth:
        out["T"] = np.einsum("i,ij,ik,il->jkl", w * (0.5 - mu), D, D, D, optimize=True)
    return out


def term_layout(prefix: str, p: int, firth: bool) -> dict[str, dict[str, Any]]:
    """Layout entries of :func:`local_terms` under ``"<prefix>.<key>"``."""
    out = {
        f"{prefix}.grad": {"shape": (p,), **NEWTON_SPEC},
        f"{prefix}.info": {"shape": (p, p), **NEWTON_SPEC},
        f"{prefix}.ll": {"shape": (1,), **LOGLIK_SPEC},
    }
    if firth:
        out[f"{prefix}.T"] = {"shape": (p, p, p), **NEWTON_SPEC}
    return out


def prefixed(prefix: str, terms: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}.{k}": v for k, v in terms.items()}


def new_fit(state: State, fid: str, n_params: int, *, method: str = "ml", max_iter: int = 100,
            tol: float = 1e-8, sep_limit: float | None = None, max_step: float | None = None,
            **meta: Any) -> None:
    """Add a fit starting at zero coefficients to ``state`` (in place)."""
    if method not in ("ml", "firth"):
        raise ValueError(f"method must be 'ml' or 'firth', got {method!r}")
    state[fid] = {"method": method, "status": RUNNING, "n_eval": 0, "reason": "", "prev_ll": None, "ll": None,
                  "grad_norm": None, "max_iter": int(max_iter), "tol": float(tol), "sep_limit": sep_limit,
                  "max_step": max_step, "p": int(n_params), **meta}
    z = np.zeros(n_params)
    state[f"{fid}.beta"] = z.copy()
    state[f"{fid}.prev_beta"] = z.copy()
    state[f"{fid}.prev_step"] = z.copy()
    state[f"{fid}.info"] = np.zeros((n_params, n_params))


def is_active(state: State, fid: str) -> bool:
    """True while the fit needs another evaluation."""
    return state[fid]["status"] in (RUNNING, FINAL)


def is_firth(state: State, fid: str) -> bool:
    return state[fid]["method"] == "firth"


def beta(state: State, fid: str) -> np.ndarray:
    return np.asarray(state[f"{fid}.beta"], dtype=np.float64)


def _fail(st: dict[str, Any], why: str) -> None:
    st["status"] = FAILED
    st["reason"] = why


def update(state: State, fid: str, totals: Mapping[str, np.ndarray]) -> None:
    """Advance fit ``fid`` (in place) with the summed :func:`local_terms` (keys without prefix)."""
    st = dict(state[fid])
    if st["status"] not in (RUNNING, FINAL):
        return
    info = np.asarray(totals["info"], dtype=np.float64)
    grad = np.asarray(totals["grad"], dtype=np.float64)
    ll = float(np.asarray(totals["ll"]).ravel()[0])
    firth = st["method"] == "firth"
    if firth:
        sign, logdet = np.linalg.slogdet(info)
        if sign <= 0 or not np.isfinite(logdet):
            _fail(st, "singular information matrix")
            state[fid] = st
            return
        ll = ll + 0.5 * logdet
        try:
            minv = np.linalg.inv(info)
        except np.linalg.LinAlgError:
            _fail(st, "singular information matrix")
            state[fid] = st
            return
        grad = grad + np.einsum("jkl,kl->j", np.asarray(totals["T"], dtype=np.float64), minv)
    if st["status"] == FINAL:  # evaluation at the final coefficients
        st.update(status=CONVERGED, ll=float(ll), grad_norm=float(np.linalg.norm(grad)))
        state[f"{fid}.info"] = info
        state[fid] = st
        return
    st["n_eval"] += 1
    b = beta(state, fid)
    prev_ll = st["prev_ll"]
    if prev_ll is not None and ll < prev_ll - 1e-9 * (1 + abs(prev_ll)) - LL_SLACK:
        step = np.asarray(state[f"{fid}.prev_step"], dtype=np.float64)
        if np.abs(step).max() < st["tol"]:
            _fail(st, "step halving stalled")
        else:
            step = step / 2
            state[f"{fid}.prev_step"] = step
            state[f"{fid}.beta"] = quantise(np.asarray(state[f"{fid}.prev_beta"]) + step)
            if st["n_eval"] >= st["max_iter"]:
                _fail(st, f"no convergence in {st['max_iter']} iterations")
        state[fid] = st
        return
    try:
        step = np.linalg.solve(info, grad)
    except np.linalg.LinAlgError:
        step = np.full_like(grad, np.nan)
    if not np.isfinite(step).all():
        _fail(st, "singular information matrix (collinear predictors, or fitted risks at 0/1: separation)")
        state[fid] = st
        return
    if st["max_step"] is not None and np.abs(step).max() > st["max_step"]:
        step = step * (st["max_step"] / np.abs(step).max())
    st.update(prev_ll=float(ll), ll=float(ll), grad_norm=float(np.linalg.norm(grad)))
    state[f"{fid}.info"] = info
    state[f"{fid}.prev_beta"] = b
    state[f"{fid}.prev_step"] = step
    new_b = quantise(b + step)
    state[f"{fid}.beta"] = new_b
    if st["sep_limit"] is not None and new_b.size > 1 and np.abs(new_b[1:]).max() > st["sep_limit"]:
        _fail(st, f"separation: a standardised coefficient exceeds {st['sep_limit']:g} (the outcome is "
                  "(quasi-)completely separated by the predictors)")
    elif np.abs(step).max() < st["tol"]:
        st["status"] = FINAL
    elif st["n_eval"] >= st["max_iter"]:
        _fail(st, f"no convergence in {st['max_iter']} iterations")
    state[fid] = st


def convergence(state: State, fid: str) -> dict[str, Any]:
    """The released convergence record of a fit."""
    st = state[fid]
    return {"method": st["method"], "converged": st["status"] == CONVERGED, "iterations": int(st["n_eval"]),
            "grad_norm": st["grad_norm"], "reason": st["reason"]}


def covariance(state: State, fid: str) -> np.ndarray:
    """Inverse information at the final coefficients (the Wald covariance)."""
    return np.linalg.inv(np.asarray(state[f"{fid}.info"], dtype=np.float64))
