"""Newton's method for the primal SVM, split into what a site sums and what every site updates.

Objective of one problem (rows ``R``, features ``z``, labels ``y`` in {-1, +1})::

    J(w, b) = 1/N * ( 1/2 |w|^2 + 1/2 eps b^2 + C * sum_{i in R} loss(1 - y_i (z_i . w + b)) )

with ``N`` the pooled number of training patients (scaling by ``1/N`` keeps every site's
contribution bounded; the optimum is that of ``1/2 |w|^2 + C sum loss``, the SVM of
scikit-learn's ``LinearSVC`` / libsvm's ``C``), ``eps`` a tiny ridge on the intercept and

* ``squared_hinge``: ``loss(s) = max(0, s)^2`` (finite Newton, Keerthi & DeCoste 2005);
* ``huber_hinge``: ``loss(s) = s`` for ``s > h``, ``(s + h)^2 / (4 h)`` for ``|s| <= h``, else 0:
  the hinge loss of libsvm smoothed over ``2 h`` (Chapelle 2007), solved after the squared hinge
  as a warm start.

:func:`site_terms` is what one site computes at a trial point (sums over its rows);
:func:`newton_advance` is the update every site runs on the consortium totals, vectorised over
problems, with Armijo backtracking. Per-row slack is capped (``loss <= 2**20``): a capped row
makes a trial point fail the Armijo test anyway for consortia under 2**20 patients, so the cap
only bounds what travels.
"""

from __future__ import annotations

import numpy as np

SQUARED, HUBER = 0, 1
INTERCEPT_RIDGE = 1e-8
TOL = 1e-10
MAX_HALVINGS = 30
#: Shorter steps evaluated with every trial point (their losses only).
LADDER = 6
_LOSS_CAP = float(2**20)


def _slack_cap(stage: int) -> float:
    return float(2**10) if stage == SQUARED else _LOSS_CAP


def row_terms(slack: np.ndarray, stage: int, h: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row loss, its derivative in the slack and its curvature: three arrays of shape (n,)."""
    s = np.minimum(slack, _slack_cap(stage))
    if stage == SQUARED:
        pos = s > 0
        return np.where(pos, s * s, 0.0), 2.0 * np.maximum(s, 0.0), 2.0 * pos
    lin, band = s > h, np.abs(s) <= h
    loss = np.where(lin, s, np.where(band, (s + h) ** 2 / (4 * h), 0.0))
    coef = np.where(lin, 1.0, np.where(band, (s + h) / (2 * h), 0.0))
    return loss, coef, band / (2 * h)


def ladder_steps(t: float) -> np.ndarray:
    """The shorter steps ``t / 2, t / 4, ...`` whose losses travel with each trial point."""
    return t * 0.5 ** np.arange(1, LADDER + 1)


def ladder_losses(Z: np.ndarray, ys: np.ndarray, w: np.ndarray, d: np.ndarray, t: float, stage: int, h: float,
                  n_total: int) -> np.ndarray:
    """``sum loss / N`` at ``w + s d`` for each ladder step ``s`` (shape (LADDER,)): the line search
    needs no extra round when the trial step ``t`` is rejected."""
    Z1 = np.column_stack([Z, np.ones(Z.shape[0])])
    m0, md = ys * (Z1 @ w), ys * (Z1 @ d)
    out = np.empty(LADDER)
    for j, s in enumerate(ladder_steps(t)):
        out[j] = row_terms(1.0 - m0 - s * md, stage, h)[0].sum() / n_total
    return out


def site_terms(Z: np.ndarray, ys: np.ndarray, w: np.ndarray, stage: int, h: float, n_total: int
               ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """One site's sums for one problem at the trial point ``w`` (features then intercept).

    Parameters
    ----------
    Z : ndarray of shape (n, D)
        Features of the problem's rows at this site.
    ys : ndarray of shape (n,)
        Labels in {-1, +1}.
    w : ndarray of shape (D + 1,)
    stage : {SQUARED, HUBER}
    h : float
    n_total : int
        Pooled number of training patients (the 1/N scaling).

    Returns
    -------
    loss : float
        ``sum loss / N``.
    grad : ndarray of shape (D + 1,)
        ``sum y_i loss'(s_i) [z_i, 1] / N`` (the data part of ``-dJ/dw / C``).
    hess : ndarray of shape ((D + 1) (D + 2) / 2,)
        Upper triangle of ``sum loss''(s_i) [z_i, 1] [z_i, 1]^T / N``.
    active : ndarray of shape (2,)
        Rows with ``loss' > 0`` (those the weights depend on), per class (y = -1, +1).
    """
    D1 = Z.shape[1] + 1
    Z1 = np.column_stack([Z, np.ones(Z.shape[0])])
    slack = 1.0 - ys * (Z1 @ w)
    loss, coef, curv = row_terms(slack, stage, h)
    used = coef > 0
    grad = ((ys * coef)[used] @ Z1[used]) / n_total
    c = curv > 0
    Zc = Z1[c]
    hess = ((Zc * curv[c][:, None]).T @ Zc)[np.triu_indices(D1)] / n_total
    active = np.array([np.sum(used & (ys < 0)), np.sum(used & (ys > 0))], dtype=np.float64)
    return float(loss.sum()) / n_total, grad, hess, active


def unpack_sym(v: np.ndarray, d: int) -> np.ndarray:
    """Symmetric (d, d) matrix from its upper triangle (row-major ``np.triu_indices`` order)."""
    m = np.zeros((d, d))
    m[np.triu_indices(d)] = v
    return m + np.triu(m, 1).T


def objective(w: np.ndarray, C: float, loss_sum: float, n_total: int) -> tuple[float, np.ndarray]:
    """``J`` and the regulariser's gradient at ``w`` given the data part ``loss_sum`` (already / N)."""
    reg = np.ones(w.size)
    reg[-1] = INTERCEPT_RIDGE
    return 0.5 * float((reg * w) @ w) / n_total + C * loss_sum, reg * w / n_total


def newton_advance(state: dict, idx: np.ndarray, Cs: np.ndarray, loss: np.ndarray, grad: np.ndarray,
                   hess: np.ndarray, active: np.ndarray, n_total: int, max_iter: int, huber_h: float,
                   ladder: np.ndarray | None = None) -> None:
    """Advance the Newton state of problems ``idx`` (in place) with the totals at their trial points.

    ``state`` holds, per problem ``p``: ``w`` (accepted point), ``w_try`` (trial point), ``J``
    (objective at ``w``; inf before the first evaluation), ``g`` (gradient at ``w``), ``dir``,
    ``t`` (step), ``iter`` (Newton iterations, both stages), ``stage_iter`` (this stage's, at most
    ``max_iter``), ``halvings``, ``done``, ``converged``, ``gnorm``,
    ``active`` (margin-active rows per class at ``w``) and ``stage`` (SQUARED / HUBER).
    """
    D1 = state["w"].shape[1]
    reg = np.ones(D1)
    reg[-1] = INTERCEPT_RIDGE
    for j, p in enumerate(idx):
        C = float(Cs[p])
        wt = state["w_try"][p]
        J, g_reg = objective(wt, C, float(loss[j]), n_total)
        if not np.isfinite(J):
            raise ValueError("fusion SVM: the objective became non-finite; check the inputs for extreme values")
        g = g_reg - C * grad[j]
        first = not np.isfinite(state["J"][p])
        if first or J <= state["J"][p] + 1e-4 * state["t"][p] * float(state["g"][p] @ state["dir"][p]):
            H = np.diag(reg / n_total) + C * unpack_sym(hess[j], D1)
            state["w"][p], state["J"][p], state["g"][p] = wt, J, g
            state["active"][p] = active[j]
            state["gnorm"][p] = float(np.linalg.norm(g))
            d = -np.linalg.solve(H, g)
            dec = -float(g @ d) / 2
            state["iter"][p] += 1
            state["stage_iter"][p] += 1
            if dec <= TOL * max(1.0, abs(J)):
                _finish(state, p, True, huber_h)
            elif state["stage_iter"][p] >= max_iter:
                _finish(state, p, False, huber_h)
            else:
                state["dir"][p], state["t"][p] = d, 1.0
                state["w_try"][p] = wt + d
        else:
            # the trial step failed the Armijo test: take the longest ladder step that passes (its
            # point is evaluated next round and passes again), else keep halving below the ladder
            slope = float(state["g"][p] @ state["dir"][p])
            steps = ladder_steps(float(state["t"][p]))
            t_new = steps[-1] * 0.5
            for s, lj in zip(steps, np.zeros(LADDER) if ladder is None else ladder[j], strict=True):
                if ladder is not None and objective(state["w"][p] + s * state["dir"][p], C, float(lj), n_total)[0] \
                        <= state["J"][p] + 1e-4 * s * slope:
                    t_new = s
                    break
            state["halvings"][p] += int(round(np.log2(state["t"][p] / t_new)))
            state["t"][p] = t_new
            if state["halvings"][p] > MAX_HALVINGS * max_iter or t_new < 2.0 ** -MAX_HALVINGS:
                _finish(state, p, False, huber_h)
            else:
                state["w_try"][p] = state["w"][p] + t_new * state["dir"][p]


def _finish(state: dict, p: int, converged: bool, huber_h: float) -> None:
    if huber_h > 0 and state["stage"][p] == SQUARED:
        # squared hinge solved: continue from there with the Huber hinge (Chapelle 2007)
        state["stage"][p] = HUBER
        state["J"][p] = np.inf
        state["w_try"][p] = state["w"][p].copy()
        state["t"][p] = 1.0
        state["stage_iter"][p] = 0
        return
    state["done"][p] = True
    state["converged"][p] = converged
