"""LEGACY server-driven fusion SVM protocol, kept until the pipeline uses :class:`~shared.fusion.FusionSVMSite`.

Do not use it for new code: here the *server* chooses the folds' seed, ``n_folds``, ``omega`` and every
Newton iterate, and its first CV round releases each fold's exact sums (issue 11, items 3 and 4);
:class:`shared.fusion.protocol.FusionSVMSite` derives all of that on the sites. What follows is the
original description.

Federated RBF-kernel SVMs for the fusion models (FDL, CR, CRD), trained without moving a row.

The study fuses the deep-learning signatures (and the clinical-radiological predictors) with an
RBF-kernel SVM whose ``C`` and ``gamma`` are tuned by 5-fold cross-validation, with Platt-scaled
probabilities. Here that model is built from sums only:

* **Kernel.** Random Fourier features (Rahimi & Recht 2007) approximate the RBF kernel:
  ``z(x) = sqrt(2/D) cos(x W + b)`` with ``W = sqrt(2 gamma) Omega``, ``Omega ~ N(0, 1)`` and
  ``b ~ U(0, 2 pi)`` drawn once by the server (as scikit-learn's ``RBFSampler``), applied to inputs
  standardised with the pooled mean and standard deviation.
* **SVM.** A linear SVM with the squared hinge loss (scikit-learn's ``LinearSVC`` default) on
  ``z``: ``min 1/2 |w|^2 + C sum max(0, 1 - y (w.z + b))^2``, solved by the finite Newton method
  (Keerthi & DeCoste 2005) with backtracking: each round a site returns, per problem, the
  gradient terms, the generalised Hessian and the loss summed over its margin-violating rows.
  The server sums them and steps, so the federated fit follows the pooled Newton iterates.
* **Tuning.** Every ``(gamma, C)`` of the grid and every fold is one problem; all are solved in
  the same rounds. Each site assigns its own rows to folds (stratified, seeded by the site name).
  The score is the AUC of the out-of-fold decision values over all sites, from histograms on a
  shared grid (:mod:`shared.stats.histogram`). Ties go to the first candidate in grid order.
* **Probabilities.** Platt scaling (``P(y=1|f) = 1 / (1 + exp(A f + B))``, Platt's smoothed
  targets) fitted by federated Newton on the out-of-fold decision values of the chosen
  candidate, as libsvm does internally for ``SVC(probability=True)``.

Only the rows of the splits a query names ever reach :meth:`FusionSVMProtocol.site_step`; the
pipeline names the training splits of the training sites, so no test or external patient takes
part in fitting, tuning or calibrating (``tests/shared/test_fusion.py``, ``tests/simulations/fusion``).

Disclosure. A site with ``0 < n < min_count`` patients of a class is excluded (as in
:mod:`shared.stats.fed_logistic`). A problem whose margin-violating rows at a site number
``0 < n < min_count`` gets no contribution from that site in that round (its gradient would be
close to one patient's features); the withholding is recorded and makes that fit approximate.

The estimators (:class:`shared.fusion.FederatedSVC`, :class:`shared.fusion.PooledSVC`) now run the
site-computed protocol; this module has no estimator of its own.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.stats.histogram import Cells, Grid, mann_whitney_cells
from shared.stats.protocol import (
    EXCLUDED_CLASS,
    MERGED,
    WITHHELD_TERMS,
    FederatedProtocol,
    Final,
    Params,
    Summary,
    site_min_count,
)

from .model import SVMModel, rff, sigmoid
from .protocol import DEFAULT_C, DEFAULT_GAMMA_FACTORS, LOSSES

logger = logging.getLogger(__name__)

PHASE_MOMENTS, PHASE_CV, PHASE_SCORE, PHASE_FINAL = 0, 1, 2, 3


def site_folds(y: np.ndarray, n_folds: int, seed: int, site: str | None) -> np.ndarray:
    """Stratified fold of each row, from a generator seeded by ``(seed, site)``; shape (n,)."""
    rng = np.random.default_rng([int(seed), zlib.crc32(str(site).encode())])
    folds = np.empty(y.size, dtype=np.int64)
    offset = int(rng.integers(n_folds))
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        folds[idx] = (np.arange(idx.size) + offset) % n_folds
        offset = (offset + idx.size) % n_folds
    return folds


def _triu(d: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(d)


def _unpack_sym(v: np.ndarray, d: int) -> np.ndarray:
    m = np.zeros((d, d))
    iu = _triu(d)
    m[iu] = v
    return m + np.triu(m, 1).T


# --------------------------------------------------------------------------- server-side Newton
@dataclass
class _Newton:
    """Damped Newton with Armijo backtracking, driven one function evaluation per round."""

    w_try: np.ndarray
    tol: float = 1e-9
    max_iter: int = 60
    w: np.ndarray | None = None
    J: float = np.inf
    g: np.ndarray | None = None
    d: np.ndarray | None = None
    t: float = 1.0
    it: int = 0
    done: bool = False

    def update(self, J: float, g: np.ndarray, H: np.ndarray, *, exact: bool = True) -> None:
        """``J``, ``g``, ``H`` were evaluated at ``w_try``."""
        if not np.isfinite(J):
            raise ValueError("the objective became non-finite; check the inputs for extreme values")
        armijo = self.w is None or J <= self.J + 1e-4 * self.t * float(self.g @ self.d)
        if armijo or not exact:
            self.w, self.J, self.g = self.w_try, J, g
            d = -np.linalg.solve(H, g)
            self.it += 1
            if -float(g @ d) / 2 <= self.tol * max(1.0, abs(J)) or self.it >= self.max_iter:
                self.done = True
                return
            self.d, self.t = d, 1.0
            self.w_try = self.w + d
        else:
            self.t *= 0.5
            if self.t < 1e-10:
                self.done = True
                return
            self.w_try = self.w + self.t * self.d


# --------------------------------------------------------------------------- the protocol
def _site_xy(data: Sequence[Any], site: str | None) -> tuple[np.ndarray, np.ndarray]:
    if len(data) < 2:
        raise ValueError(f"site data{'' if site is None else f' at {site}'} must be (y, column, ...)")
    y = np.asarray(data[0], dtype=np.float64)
    X = np.column_stack([np.asarray(c, dtype=np.float64) for c in data[1:]])
    if not np.isfinite(X).all():
        raise ValueError(f"non-finite value in the fusion inputs{'' if site is None else f' at {site}'}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1{'' if site is None else f' at {site}'}")
    return y.astype(np.int64), X


class FusionSVMProtocol(FederatedProtocol):
    """Fit one RFF-SVM with federated cross-validation and Platt scaling (see the module docstring).

    Parameters
    ----------
    n_features : int
        Input columns (site data is ``(y, column_1, ..., column_d)``).
    C_grid, gamma_factors : sequences of float
        Candidates; ``gamma = factor / n_features``.
    n_components : int
        Random Fourier features ``D``.
    n_folds : int
    seed : int
    min_count : int
    """

    name = "fusion_svm"

    def __init__(self, n_features: int, C_grid: Sequence[float] = DEFAULT_C,
                 gamma_factors: Sequence[float] = DEFAULT_GAMMA_FACTORS, n_components: int = 64, n_folds: int = 5,
                 seed: int = 0, *, loss: str = "squared_hinge", huber_h: float = 0.5, tol: float = 1e-9,
                 max_iter: int = 60, min_count: int = 1) -> None:
        super().__init__(min_count=min_count)
        if loss not in LOSSES or not 0 < huber_h <= 1:
            raise ValueError(f"loss must be one of {LOSSES} and 0 < huber_h <= 1, got {loss!r}, {huber_h}")
        self.loss = loss
        self.huber_h = float(huber_h) if loss == "huber_hinge" else 0.0
        if n_features < 1 or n_components < 2 or n_folds < 2:
            raise ValueError("need n_features >= 1, n_components >= 2 and n_folds >= 2")
        self.d, self.D, self.k = int(n_features), int(n_components), int(n_folds)
        self.C_grid = [float(c) for c in C_grid]
        self.gammas = [float(f) / self.d for f in gamma_factors]
        if not self.C_grid or not self.gammas or min(self.C_grid) <= 0 or min(self.gammas) <= 0:
            raise ValueError("C and gamma candidates must be positive and non-empty")
        self.seed, self.tol, self.max_iter = int(seed), tol, max_iter
        rng = np.random.default_rng(self.seed)
        unit = rng.standard_normal((self.d, self.D))
        self.offset = rng.uniform(0.0, 2.0 * np.pi, self.D)
        self.omegas = np.stack([np.sqrt(2.0 * g) * unit for g in self.gammas])  # (G, d, D)
        # candidates in grid order (C outer, gamma inner, as GridSearchCV's ParameterGrid sorts C < gamma)
        self.cands = [(gi, ci) for ci in range(len(self.C_grid)) for gi in range(len(self.gammas))]
        self.phase = PHASE_MOMENTS
        self.included: list[str] = []
        self.problems: list[tuple[int, int, int]] = []  # (gamma index, C index, fold or -1)
        self.solvers: list[_Newton] = []
        self.stage: list[int] = []
        self.withheld = 0
        self.best: int | None = None
        self.cv_aucs: list[float] = []
        self.platt: _Newton | None = None
        self.n_pos = self.n_neg = 0

    # ---------------------------------------------------------------- messages
    def _params(self) -> Params:
        self.round += 1
        p: Params = {"round": self.round, "min_count": self.min_count, "phase": self.phase, "n_folds": self.k,
                     "seed": self.seed}
        if self.phase == PHASE_MOMENTS:
            return p
        p.update({"mean": self.mean, "scale": self.scale, "omega": self.omegas, "offset": self.offset})
        active = [i for i, s in enumerate(self.solvers) if not s.done]
        if self.phase in (PHASE_CV, PHASE_FINAL) and active:
            p["prob.gamma"] = np.array([self.problems[i][0] for i in active], dtype=np.int64)
            p["prob.fold"] = np.array([self.problems[i][2] for i in active], dtype=np.int64)
            p["prob.w"] = np.stack([self.solvers[i].w_try for i in active])
            p["prob.h"] = np.array([self.huber_h if self.stage[i] else 0.0 for i in active])
        if self.phase == PHASE_SCORE:
            p["cv.w"] = np.stack([s.w for s in self.solvers])  # (n_cands * k, D + 1)
            p["cv.gamma"] = np.array([c[0] for c in self.cands], dtype=np.int64)
        if self.phase == PHASE_FINAL and self.platt is not None and not self.platt.done:
            gi, _ = self.cands[self.best]
            p["platt.w"] = np.stack([s.w for s in self.cv_solvers_of(self.best)])
            p["platt.gamma"] = gi
            p["platt.ab"] = self.platt.w_try
            p["platt.targets"] = np.array([(self.n_pos + 1.0) / (self.n_pos + 2.0), 1.0 / (self.n_neg + 2.0)])
        return p

    def cv_solvers_of(self, cand: int) -> list[_Newton]:
        return self.solvers[cand * self.k:(cand + 1) * self.k]

    def start(self) -> Params:
        return self._params()

    @staticmethod
    def site_step(data: Sequence[Any], params: Params, *, site: str | None = None, min_count: int = 1) -> Summary:
        """One round on one site; see the module docstring for what each phase returns."""
        k = site_min_count(params, min_count)
        y, X = _site_xy(data, site)
        n1 = int(y.sum())
        out: Summary = {"round": int(params["round"]), "min_count": k}
        if (0 < n1 < k) or (0 < y.size - n1 < k):
            return {**out, "excluded": 1, "supp.fusion_svm": EXCLUDED_CLASS}
        out["excluded"] = 0
        phase = int(params["phase"])
        if phase == PHASE_MOMENTS:
            out.update({"n": int(y.size), "n_pos": n1, "sum": X.sum(axis=0), "sumsq": (X * X).sum(axis=0)})
            return out
        folds = site_folds(y, int(params["n_folds"]), int(params["seed"]), site)
        Xs = (X - np.asarray(params["mean"])) / np.asarray(params["scale"])
        omega, offset = np.asarray(params["omega"]), np.asarray(params["offset"])
        Z = {g: rff(Xs, omega[g], offset) for g in range(omega.shape[0])}
        ys = 2.0 * y - 1.0
        if "prob.w" in params:
            W = np.atleast_2d(np.asarray(params["prob.w"], dtype=np.float64))
            gam, fold = np.asarray(params["prob.gamma"]), np.asarray(params["prob.fold"])
            D1 = W.shape[1]
            hs = np.asarray(params.get("prob.h", np.zeros(len(W))), dtype=np.float64)
            iu = _triu(D1)
            s_all, S_all = np.zeros((len(W), D1)), np.zeros((len(W), iu[0].size))
            loss, n_act, withheld = np.zeros(len(W)), np.zeros(len(W), np.int64), np.zeros(len(W), np.int64)
            for i, (w, g, f, h) in enumerate(zip(W, gam, fold, hs, strict=True)):
                rows = folds != f
                Zr = np.column_stack([Z[int(g)][rows], np.ones(rows.sum())])
                yr = ys[rows]
                slack = 1.0 - yr * (Zr @ w)
                if h > 0:  # Huber hinge: linear where slack > h, quadratic where |slack| <= h
                    lin, act = slack > h, np.abs(slack) <= h
                    n_act[i] = (lin | act).sum()
                    coef = np.where(lin, 1.0, np.where(act, (slack + h) / (2 * h), 0.0))
                    curv, loss_i = act / (2 * h), np.where(lin, slack, np.where(act, (slack + h) ** 2 / (4 * h), 0.0))
                else:  # squared hinge
                    act = slack > 0
                    n_act[i] = act.sum()
                    coef, curv = 2.0 * np.maximum(slack, 0.0), 2.0 * act
                    loss_i = np.maximum(slack, 0.0) ** 2
                if 0 < n_act[i] < k:
                    withheld[i] = 1
                    continue
                used = coef > 0
                s_all[i] = (yr[used] * coef[used]) @ Zr[used]
                Zc = Zr[curv > 0]
                S_all[i] = ((Zc * curv[curv > 0][:, None]).T @ Zc)[iu]
                loss[i] = float(loss_i.sum())
            out.update({"newton.s": s_all, "newton.S": S_all, "newton.loss": loss, "newton.withheld": withheld})
            if withheld.any():
                out["supp.fusion_svm.active_set"] = WITHHELD_TERMS
        if phase == PHASE_SCORE:
            W = np.asarray(params["cv.w"], dtype=np.float64)
            gam = np.asarray(params["cv.gamma"])
            n_f = int(params["n_folds"])
            grid = Grid.probability()
            for c, g in enumerate(gam):
                f = _oof(Z[int(g)], folds, W[c * n_f:(c + 1) * n_f])
                b = grid.bin(np.round(sigmoid(f), 4), "decision value", site)
                for cls, mask in (("pos", y == 1), ("neg", y == 0)):
                    cells, merged = Cells.from_bins(b[mask], grid.n_bins, k)
                    out.update(cells.to_summary(f"c{c}.{cls}"))
                    if merged:
                        out[f"supp.fusion_svm.cv_scores.c{c}.{cls}"] = MERGED
        if "platt.ab" in params:
            f = _oof(Z[int(params["platt.gamma"])], folds, np.asarray(params["platt.w"], dtype=np.float64))
            tp, tn = np.asarray(params["platt.targets"], dtype=np.float64)
            t = np.where(y == 1, tp, tn)
            a, b0 = np.asarray(params["platt.ab"], dtype=np.float64)
            u = a * f + b0
            p = sigmoid(-u)
            F = np.column_stack([f, np.ones_like(f)])
            # NLL = sum t*log(1+e^u) + (1-t)*(u + log(1+e^-u))   (stable form of -t log p - (1-t) log(1-p))
            nll = float(np.sum(t * np.logaddexp(0, u) + (1 - t) * np.logaddexp(0, -u)))
            out.update({"platt.g": (t - p) @ F, "platt.H": (F * (p * (1 - p))[:, None]).T @ F, "platt.nll": nll})
        return out

    def server_step(self, summaries: Mapping[str, Summary]) -> Params | Final:
        self.log_suppressions(summaries)
        if self.phase == PHASE_MOMENTS:
            return self._moments(summaries)
        missing = [s for s in self.included if int(summaries.get(s, {}).get("excluded", 1))]
        if missing:
            raise ValueError(f"site(s) {missing} stopped answering")
        inc = [summaries[s] for s in self.included]
        if self.phase in (PHASE_CV, PHASE_FINAL, PHASE_SCORE) and any("newton.s" in v for v in inc):
            self._newton(inc)
        if self.phase == PHASE_SCORE:
            self._score(inc)
        if self.phase == PHASE_FINAL and self.platt is not None and not self.platt.done and "platt.g" in inc[0]:
            self.platt.update(sum(float(v["platt.nll"]) for v in inc), sum(np.asarray(v["platt.g"]) for v in inc),
                              sum(np.asarray(v["platt.H"]) for v in inc) + 1e-12 * np.eye(2))
        if self.phase == PHASE_CV and all(s.done for s in self.solvers):
            self.phase = PHASE_SCORE
        elif self.phase == PHASE_FINAL and all(s.done for s in self.solvers) and self.platt.done:
            return Final(self._model(), {"withheld_contributions": float(self.withheld)})
        return self._params()

    def _moments(self, summaries: Mapping[str, Summary]) -> Params:
        self.included = [s for s, v in summaries.items() if not int(v.get("excluded", 0))]
        if not self.included:
            raise ValueError("every site was excluded from the fusion SVM by disclosure control")
        n = sum(int(summaries[s]["n"]) for s in self.included)
        self.n_pos = sum(int(summaries[s]["n_pos"]) for s in self.included)
        self.n_neg = n - self.n_pos
        if self.n_pos < self.k or self.n_neg < self.k:
            raise ValueError(f"{self.n_pos} positive and {self.n_neg} negative training patients: too few for "
                             f"{self.k}-fold cross-validation")
        tot = sum(np.asarray(summaries[s]["sum"], dtype=np.float64) for s in self.included)
        sq = sum(np.asarray(summaries[s]["sumsq"], dtype=np.float64) for s in self.included)
        self.mean = tot / n
        var = np.maximum(sq / n - self.mean ** 2, 0.0)
        self.scale = np.where(var > 1e-24, np.sqrt(var), 1.0)
        self.problems = [(gi, ci, f) for gi, ci in self.cands for f in range(self.k)]
        self.solvers = [_Newton(np.zeros(self.D + 1), self.tol, self.max_iter) for _ in self.problems]
        self.stage = [0] * len(self.problems)
        self.phase = PHASE_CV
        return self._params()

    def _newton(self, inc: list[Summary]) -> None:
        active = [i for i, s in enumerate(self.solvers) if not s.done]
        s = sum(np.asarray(v["newton.s"], dtype=np.float64) for v in inc)
        S = sum(np.asarray(v["newton.S"], dtype=np.float64) for v in inc)
        loss = sum(np.asarray(v["newton.loss"], dtype=np.float64) for v in inc)
        held = sum(np.asarray(v["newton.withheld"], dtype=np.int64) for v in inc)
        self.withheld += int(np.sum(held))
        reg = np.ones(self.D + 1)
        reg[-1] = 1e-10  # the intercept is not penalised
        for j, i in enumerate(active):
            C = self.C_grid[self.problems[i][1]]
            w = self.solvers[i].w_try
            wp = w * (reg == 1)
            J = 0.5 * float(wp @ wp) + C * float(loss[j])
            g = wp - C * s[j]
            H = np.diag(reg) + C * _unpack_sym(S[j], self.D + 1)
            self.solvers[i].update(J, g, H, exact=not held[j])
            if self.solvers[i].done and self.huber_h > 0 and not self.stage[i]:
                # squared hinge solved: continue from there with the Huber hinge (Chapelle 2007)
                self.stage[i] = 1
                self.solvers[i] = _Newton(self.solvers[i].w.copy(), self.tol, self.max_iter)

    def _score(self, inc: list[Summary]) -> None:
        nb = Grid.probability().n_bins
        self.cv_aucs = []
        for c in range(len(self.cands)):
            pos = Cells.concat([Cells.from_summary(v, f"c{c}.pos", nb) for v in inc], nb)
            neg = Cells.concat([Cells.from_summary(v, f"c{c}.neg", nb) for v in inc], nb)
            u, _ = mann_whitney_cells(pos, neg)
            self.cv_aucs.append(u / (pos.n * neg.n))
        self.best = int(np.argmax(np.round(self.cv_aucs, 12)))
        gi, ci = self.cands[self.best]
        self.problems.append((gi, ci, -1))
        self.solvers.append(_Newton(self.cv_solvers_of(self.best)[0].w.copy(), self.tol, self.max_iter))
        self.stage.append(0)
        self.platt = _Newton(np.array([-1.0, 0.0]), self.tol, self.max_iter)
        self.phase = PHASE_FINAL

    def _model(self) -> SVMModel:
        gi, ci = self.cands[self.best]
        w = self.solvers[-1].w
        table = [{"C": self.C_grid[c], "gamma": self.gammas[g], "cv_auc": float(a)}
                 for (g, c), a in zip(self.cands, self.cv_aucs, strict=True)]
        return SVMModel([f"x{i}" for i in range(self.d)], self.mean, self.scale, self.omegas[gi], self.offset,
                        w[:-1].copy(), float(w[-1]), float(self.platt.w[0]), float(self.platt.w[1]),
                        self.C_grid[ci], self.gammas[gi], float(self.cv_aucs[self.best]), table)


def _oof(Z: np.ndarray, folds: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Out-of-fold decision values: row i scored by the model that did not see fold ``folds[i]``."""
    f = np.empty(Z.shape[0])
    for j in range(W.shape[0]):
        rows = folds == j
        f[rows] = Z[rows] @ W[j, :-1] + W[j, -1]
    return f


