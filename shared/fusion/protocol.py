"""The fusion SVM as a site-computed protocol: the sites derive every parameter, the server sees the model.

What the server chooses: only the validated parameters (:class:`FusionSVMSite`): the columns,
a ``(C, gamma)`` grid from allowed ranges, the kernel approximation and its size, the number of
CV folds (2-10), the loss, an iteration cap, a seed and the consortium floor ``k`` the folds are
built for. Everything else is derived on the sites from their own rows and the securely
aggregated consortium totals (:mod:`shared.stats.sitecomputed`), identically on every site:

1. **Counts and moments** (round 1). Each site assigns its patients to folds: stratified by
   class, in the order of a keyed hash of the patient id (HMAC-SHA256, key from the seed), round
   robin from a hash-derived offset. Every fold of every class therefore holds the floor or the
   ceiling of ``n_class / K`` of the site's patients *whatever the seed*, and the assignment is
   stable across processes. A site adds, for every ``K' = 2..cv_folds``, its patients per fold
   and class; its ``n`` per class; the sum and sum of squares of each column. From the totals
   every site picks the largest ``K' <= cv_folds`` whose every fold holds ``>= k`` patients of
   each class in the consortium (fewer folds than asked is recorded; none: the fit is refused,
   with the reason), and the pooled means / standard deviations.
2. **Marginal histograms** (round 2, ``kernel="landmarks"``). Each site adds, per column, the
   counts of its standardised values on a fixed grid (``[-5, 5]`` in steps of 0.05). Every site
   merges the pooled counts into cells of 0 or ``>= k`` patients
   (:func:`shared.stats.sitecomputed.merge_cells`) and places the Nystrom landmarks at the pooled
   marginal quantiles of shifted Halton points, each coordinate the mean of a cell
   (:func:`shared.fusion.model.quantile_landmarks`): the landmarks follow where patients are
   (binary and discrete columns included) but depend on the data only through the k-merged
   marginal histograms (each coordinate a mean over >= k patients), never on a patient's row. ``grid_landmarks`` (a quasi-random
   ``N(0, I)`` sample from the seed) and ``rff`` skip this round.
3. **Newton rounds.** One problem per ``(C, gamma)`` candidate and fold (rows outside the fold),
   plus one per candidate on all rows (the final fit, solved in the same rounds so that no
   round waits for the selection). At each trial point each site adds, per unfinished problem,
   its loss, gradient and Hessian sums (:func:`shared.fusion.newton.site_terms`) and its count
   of margin-active patients per class; every site then takes the same Newton / backtracking
   step (:func:`shared.fusion.newton.newton_advance`). Iterates are rounded to multiples of
   2**-40 so that sites whose linear algebra differs in the last bits hold identical states.
4. **Score round.** Each site adds, per candidate and class, a histogram of its patients'
   out-of-fold decision values on a fixed grid (``[-10, 10]`` in steps of 0.002; outside values
   go to the end bins). From the totals every site computes each candidate's pooled
   out-of-fold AUC (Mann-Whitney on the grid: ties within a bin count half), selects the
   first best in grid order (``C`` outer, ``gamma`` inner, as scikit-learn's ``ParameterGrid``
   and :class:`~shared.fusion.estimators.PooledSVC`), and fits Platt scaling (Platt's smoothed
   targets) on the chosen candidate's pooled out-of-fold histogram: on the fold models' values,
   as libsvm's ``probability=True`` does with its internal CV. No further round is needed.

Release (after disclosure control with the site's own ``k``): the model
(:class:`~shared.fusion.model.SVMModel`: standardisation, landmarks or frequencies, weights,
intercept, Platt ``A``/``B``, chosen ``C``/``gamma``, CV AUC of every candidate), the
convergence of the final fit and of Platt scaling (converged / iterations / gradient norm) and
of the CV fits, the pooled counts per class, per fold and of margin-active patients of the final
fit. It is refused (nothing but the reason) when the cohort, a fold, or the final fit's
margin-active patients hold fewer than ``k`` of a class, or a landmark's histogram cell fewer
than ``k`` patients.

What the sites learn (they are trusted in this threat model, see ``docs/secure_aggregation.md``):
the totals of every round, i.e. pooled moments, fold counts, per-problem Newton sums (over every
patient outside one fold) and pooled histograms of out-of-fold decision values. A site can
subtract its own rows from such totals.

:class:`ShapSumsSite` is the mean-|SHAP| query over a cohort's patients, on a model the site
itself derived.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from shared.stats.sitecomputed import (
    BIG_SUM_SPEC,
    COUNT_SPEC,
    SUM_SPEC,
    CohortData,
    Released,
    SiteComputedProtocol,
    State,
    merge_cells,
)

from .model import FeatureMap, SVMModel, halton, quantile_landmarks, shapley_values, sigmoid
from .newton import LADDER, SQUARED, ladder_losses, newton_advance, site_terms

logger = logging.getLogger(__name__)

LOSSES = ("squared_hinge", "huber_hinge")
#: ``landmarks``: Nystrom on landmarks at the pooled marginal quantiles (default); ``grid_landmarks``:
#: on a quasi-random N(0, I) grid (no data at all); ``rff``: random Fourier features.
KERNELS = ("landmarks", "grid_landmarks", "rff")
DEFAULT_C = (0.1, 1.0, 10.0)
#: ``gamma = factor / n_features`` (scikit-learn's ``gamma="scale"`` on standardised inputs is 1 / n_features).
DEFAULT_GAMMA_FACTORS = (0.25, 1.0, 4.0)
C_RANGE = (1e-3, 1e3)
GAMMA_FACTOR_RANGE = (1e-2, 1e2)
MAX_CANDIDATES = 8
MAX_COLUMNS = 12  # exact Shapley values need <= 12 inputs
MAX_COMPONENTS = 1024
FOLDS_RANGE = (2, 10)
MAX_ITER_LIMIT = 100
HUBER_H_RANGE = (0.01, 1.0)
MIN_COUNT_RANGE = (1, 1000)
#: Largest contribution (values) a site sends in one round; parameters asking for more are refused.
MAX_VALUES_PER_ROUND = 2**23
#: Fixed grid of out-of-fold decision values (bin centres DECISION_STEP * j, |f| <= DECISION_MAX).
DECISION_MAX, DECISION_STEP = 10.0, 0.002
N_DECISION_BINS = int(round(2 * DECISION_MAX / DECISION_STEP)) + 1
#: Fixed grid of standardised values for the marginal histograms (bin centres MARGIN_STEP * j).
MARGIN_MAX, MARGIN_STEP = 5.0, 0.05
N_MARGIN_BINS = int(round(2 * MARGIN_MAX / MARGIN_STEP)) + 1
PHASE_COUNTS, PHASE_MARGINS, PHASE_NEWTON, PHASE_SCORE, PHASE_DONE = "counts", "margins", "newton", "score", "done"
NEWTON_KEYS = ("w", "w_try", "J", "g", "dir", "t", "iter", "stage_iter", "halvings", "done", "converged",
               "gnorm", "active", "stage")


def quantise(x: np.ndarray, bits: int = 40) -> np.ndarray:
    """Round to a multiple of ``2**-bits`` (identical iterates on sites whose BLAS differ in the last bits)."""
    return np.ldexp(np.rint(np.ldexp(np.asarray(x, dtype=np.float64), bits)), -bits)


# --------------------------------------------------------------------------- parameter checks
def _check_int(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or not lo <= int(v) <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def _check_floats(name: str, v: Any, lo: float, hi: float) -> list[float]:
    if isinstance(v, str | bytes) or not isinstance(v, Sequence) or not 1 <= len(v) <= MAX_CANDIDATES:
        raise ValueError(f"{name} must be a list of 1 to {MAX_CANDIDATES} numbers, got {v!r}")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int | float | np.integer | np.floating) \
                or not math.isfinite(float(x)) or not lo <= float(x) <= hi:
            raise ValueError(f"{name} values must be numbers in [{lo:g}, {hi:g}], got {v!r}")
        out.append(float(x))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} values must be distinct, got {v!r}")
    return out


def _check_choice(name: str, v: Any, allowed: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {v!r}")
    return v


def _check_columns(columns: Any) -> list[str]:
    if isinstance(columns, str) or not isinstance(columns, Sequence) or not 1 <= len(columns) <= MAX_COLUMNS:
        raise ValueError(f"columns must be a list of 1 to {MAX_COLUMNS} column names, got {columns!r}")
    cols = list(columns)
    if not all(isinstance(c, str) and c for c in cols) or len(set(cols)) != len(cols):
        raise ValueError(f"columns must be distinct non-empty strings, got {cols!r}")
    return cols


def _where(data: Any) -> str:
    site = getattr(data, "extra", {}).get("site") if hasattr(data, "extra") else None
    return f" at site {site!r}" if site is not None else ""


# --------------------------------------------------------------------------- folds
def fold_key(seed: int) -> bytes:
    """HMAC key of the fold assignment for a seed."""
    return hashlib.sha256(f"rectalfl.fusion/folds/{int(seed)}".encode()).digest()


def patient_hashes(patient_ids: Sequence[Any], seed: int) -> np.ndarray:
    """Keyed 64-bit hash of each patient id (stable across processes and machines), shape (n,)."""
    key = fold_key(seed)
    return np.array([int.from_bytes(hmac.new(key, str(p).encode(), "sha256").digest()[:8], "big")
                     for p in patient_ids], dtype=np.uint64)


def assign_folds(patient_ids: Sequence[Any], y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Stratified fold of each of a site's patients, from the seed and the keyed hash of its id.

    Within each class the patients are ordered by hash and dealt round robin from an offset (the
    smallest hash modulo ``n_folds``): each fold gets the floor or ceiling of ``n_class / n_folds``
    whatever the seed, so no seed can make a fold of one patient.

    Parameters
    ----------
    patient_ids : sequence of str
    y : ndarray of shape (n,)
    n_folds : int
    seed : int

    Returns
    -------
    ndarray of int64, shape (n,), values in [0, n_folds)
    """
    y = np.asarray(y)
    h = patient_hashes(patient_ids, seed)
    folds = np.empty(y.size, dtype=np.int64)
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        if not idx.size:
            continue
        idx = idx[np.argsort(h[idx], kind="stable")]
        offset = int(h[idx[0]] % np.uint64(n_folds))
        folds[idx] = (np.arange(idx.size) + offset) % n_folds
    return folds


# --------------------------------------------------------------------------- result
@dataclass
class FusionFit:
    """What the server gets from :class:`FusionSVMSite`: the model, or the reason it was refused."""

    model: SVMModel | None
    reason: str = ""
    convergence: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cost: dict[str, int] = field(default_factory=dict)

    @property
    def fitted(self) -> bool:
        return self.model is not None


def _auc_from_hist(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC of two histograms on the same ordered grid (ties count half)."""
    n1, n0 = pos.sum(), neg.sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    below = np.cumsum(neg) - neg
    return float((pos @ below + 0.5 * pos @ neg) / (n1 * n0))


def platt_from_hist(f: np.ndarray, pos: np.ndarray, neg: np.ndarray, max_iter: int = 100
                    ) -> tuple[float, float, dict[str, Any]]:
    """Platt scaling ``P(y=1|f) = 1 / (1 + exp(A f + B))`` from class histograms of decision values.

    Newton with step halving on Platt's smoothed targets (``(N+ + 1) / (N+ + 2)``,
    ``1 / (N- + 2)``), from ``A = 0``, ``B = log((N- + 1) / (N+ + 1))`` (libsvm's start).

    Returns
    -------
    A, B : float
    convergence : dict
        ``converged``, ``iterations``, ``grad_norm`` (of the negative log-likelihood).
    """
    n1, n0 = float(pos.sum()), float(neg.sum())
    tp, tn = (n1 + 1.0) / (n1 + 2.0), 1.0 / (n0 + 2.0)
    keep = (pos + neg) > 0
    f, pos, neg = f[keep], pos[keep], neg[keep]
    F = np.column_stack([f, np.ones_like(f)])

    def nll(ab: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        u = F @ ab
        p = sigmoid(-u)  # P(y = 1)
        # -[t log p + (1 - t) log(1 - p)], for both classes' counts
        lp, lq = np.logaddexp(0, u), np.logaddexp(0, -u)  # -log p, -log(1 - p)
        val = float(pos @ (tp * lp + (1 - tp) * lq) + neg @ (tn * lp + (1 - tn) * lq))
        r = pos * (tp - p) + neg * (tn - p)
        wts = (pos + neg) * p * (1 - p)
        return val, F.T @ r, (F * wts[:, None]).T @ F

    ab = np.array([0.0, math.log((n0 + 1.0) / (n1 + 1.0))])
    val, g, H = nll(ab)
    conv, it = False, 0
    for it in range(1, max_iter + 1):  # noqa: B007 (reported)
        d = -np.linalg.solve(H + 1e-12 * np.eye(2), g)
        if -float(g @ d) / 2 <= 1e-12 * max(1.0, abs(val)):
            conv = True
            break
        t = 1.0
        while True:
            nv, ng, nH = nll(ab + t * d)
            if nv <= val + 1e-4 * t * float(g @ d) or t < 1e-10:
                break
            t *= 0.5
        if t < 1e-10:
            break
        ab, val, g, H = ab + t * d, nv, ng, nH
    return float(ab[0]), float(ab[1]), {"converged": conv, "iterations": it, "grad_norm": float(np.linalg.norm(g))}


# --------------------------------------------------------------------------- the protocol
class FusionSVMSite(SiteComputedProtocol):
    """Fit one RBF-kernel SVM with cross-validated ``(C, gamma)`` and Platt scaling, every step on site.

    Parameters
    ----------
    columns : list of str
        Inputs (1 to 12), in the order of the site's cohort data.
    C_grid : list of float
        Candidates for ``C`` (1 to 8, each in [1e-3, 1e3]).
    gamma_factors : list of float
        Candidates ``gamma = factor / n_features`` (1 to 8, each in [1e-2, 1e2]).
    kernel : {"landmarks", "grid_landmarks", "rff"}
        Nystrom map on landmarks at the pooled marginal quantiles (default), on a quasi-random
        ``N(0, I)`` grid, or random Fourier features.
    n_components : int
        Landmarks / random features, 8 to 1024 (landmarks: duplicates are dropped).
    cv_folds : int
        2 to 10; fewer are used (and recorded) when a fold would hold fewer than ``min_count``
        patients of a class in the consortium.
    loss : {"squared_hinge", "huber_hinge"}
    huber_h : float
        Half-width of the Huber hinge's quadratic band, in [0.01, 1] (ignored for the squared hinge).
    max_iter : int
        Newton iterations per problem (and per loss stage), 1 to 100.
    seed : int
        Fold assignment and the kernel approximation, 0 to 2**32 - 1.
    min_count : int
        The consortium floor ``k`` the folds are built for; each site re-checks its own floor at
        release, so a lower value only risks a refusal.
    """

    name: ClassVar[str] = "fusion_svm_fit"

    def __init__(self, columns: Sequence[str], C_grid: Sequence[float] = DEFAULT_C,
                 gamma_factors: Sequence[float] = DEFAULT_GAMMA_FACTORS, kernel: str = "landmarks",
                 n_components: int = 256, cv_folds: int = 5, loss: str = "huber_hinge", huber_h: float = 0.1,
                 max_iter: int = 100, seed: int = 0, min_count: int = 5) -> None:
        super().__init__()
        self.columns = _check_columns(columns)
        self.C_grid = _check_floats("C_grid", C_grid, *C_RANGE)
        self.gamma_factors = _check_floats("gamma_factors", gamma_factors, *GAMMA_FACTOR_RANGE)
        self.kernel = _check_choice("kernel", kernel, KERNELS)
        self.n_components = _check_int("n_components", n_components, 8, MAX_COMPONENTS)
        self.cv_folds = _check_int("cv_folds", cv_folds, *FOLDS_RANGE)
        self.loss = _check_choice("loss", loss, LOSSES)
        if isinstance(huber_h, bool) or not isinstance(huber_h, int | float) \
                or not HUBER_H_RANGE[0] <= float(huber_h) <= HUBER_H_RANGE[1]:
            raise ValueError(f"huber_h must be a number in {list(HUBER_H_RANGE)}, got {huber_h!r}")
        self.huber_h = float(huber_h) if self.loss == "huber_hinge" else 0.0
        self.max_iter = _check_int("max_iter", max_iter, 1, MAX_ITER_LIMIT)
        self.seed = _check_int("seed", seed, 0, 2**32 - 1)
        self.min_count = _check_int("min_count", min_count, *MIN_COUNT_RANGE)
        self.d = len(self.columns)
        self.gammas = [f / self.d for f in self.gamma_factors]
        # candidates in grid order: C outer, gamma inner
        self.cands = [(gi, ci) for ci in range(len(self.C_grid)) for gi in range(len(self.gammas))]
        D1 = self.n_components + 1
        per_problem = D1 * (D1 + 1) // 2 + D1 + 3 + LADDER
        worst = len(self.cands) * (self.cv_folds + 1) * per_problem
        if worst > MAX_VALUES_PER_ROUND:
            raise ValueError(f"fusion SVM: {len(self.cands)} candidates x {self.cv_folds + 1} problems with "
                             f"n_components={self.n_components} need {worst} values per round, more than "
                             f"{MAX_VALUES_PER_ROUND}: use fewer candidates, folds or components")
        iters = self.max_iter * (2 if self.huber_h else 1)
        self.max_rounds = 3 + iters * 4 + 8  # counts, margins, Newton (a few halvings per iteration), score
        self._keep(columns=self.columns, C_grid=self.C_grid, gamma_factors=self.gamma_factors, kernel=self.kernel,
                   n_components=self.n_components, cv_folds=self.cv_folds, loss=self.loss,
                   huber_h=float(huber_h), max_iter=self.max_iter, seed=self.seed, min_count=self.min_count)
        self._fmap: tuple[Any, FeatureMap] | None = None

    # ---------------------------------------------------------------- helpers
    def fmap(self, state: State) -> FeatureMap:
        """The feature map every site derives: from the seed, or from the landmarks in the state."""
        key = "seed" if self.kernel != "landmarks" else np.asarray(state["landmarks"]).tobytes()
        if self._fmap is None or self._fmap[0] != key:
            if self.kernel == "landmarks":
                fm = FeatureMap("landmarks", self.gammas, np.asarray(state["landmarks"]))
            else:
                kind = "rff" if self.kernel == "rff" else "landmarks"
                fm = FeatureMap.from_seed(kind, self.d, self.n_components, self.seed, self.gammas)
            self._fmap = (key, fm)
        return self._fmap[1]

    def problems(self, n_folds: int) -> list[tuple[int, int, int]]:
        """``(gamma index, C index, fold)`` per problem; fold ``-1`` is the final fit on all rows."""
        return [(gi, ci, f) for gi, ci in self.cands for f in [*range(n_folds), -1]]

    def _features(self, state: State, xs: np.ndarray, g: int, width: int) -> np.ndarray:
        """Features for gamma index ``g``, zero-padded to ``width`` columns (landmark maps keep a
        different number of eigen-directions per gamma; all problems share one width)."""
        Z = self.fmap(state).features(xs, g)
        return Z if Z.shape[1] == width else np.column_stack([Z, np.zeros((Z.shape[0], width - Z.shape[1]))])

    def _check_data(self, data: CohortData) -> tuple[np.ndarray, np.ndarray, list[str]]:
        where = _where(data)
        if not isinstance(data, CohortData):
            raise ValueError(f"{self.name}{where}: expected CohortData, got {type(data).__name__}")
        if list(data.columns) != self.columns:
            raise ValueError(f"{self.name}{where}: the cohort data has columns {list(data.columns)}, the query "
                             f"names {self.columns}")
        ids = data.extra.get("patient_id")
        if ids is None or len(ids) != data.n:
            raise ValueError(f"{self.name}{where}: CohortData.extra['patient_id'] must give the id of each of the "
                             f"{data.n} patients (the folds are derived from them)")
        ids = [str(i) for i in ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}{where}: duplicate patient ids in the cohort data")
        return data.y, data.X, ids

    # ---------------------------------------------------------------- contract
    def init_state(self) -> State:
        return {"round": 0, "phase": PHASE_COUNTS, "status": "running", "reason": "", "values_sent": 0}

    def layout(self, state: State) -> dict[str, dict[str, Any]]:
        phase = state["phase"]
        if phase == PHASE_COUNTS:
            n_fold_rows = sum(range(FOLDS_RANGE[0], self.cv_folds + 1))
            return {"n": {"shape": (2,), **COUNT_SPEC}, "folds": {"shape": (n_fold_rows, 2), **COUNT_SPEC},
                    "sum": {"shape": (self.d,), **BIG_SUM_SPEC}, "sumsq": {"shape": (self.d,), **BIG_SUM_SPEC}}
        if phase == PHASE_MARGINS:
            return {"margins": {"shape": (self.d, N_MARGIN_BINS), **COUNT_SPEC}}
        if phase == PHASE_NEWTON:
            act = int((np.asarray(state["done"]) == 0).sum())
            D1 = int(np.asarray(state["w"]).shape[1])
            return {"loss": {"shape": (act,), **SUM_SPEC}, "ladder": {"shape": (act, LADDER), **SUM_SPEC},
                    "grad": {"shape": (act, D1), **SUM_SPEC},
                    "hess": {"shape": (act, D1 * (D1 + 1) // 2), **SUM_SPEC},
                    "active": {"shape": (act, 2), **COUNT_SPEC}}
        if phase == PHASE_SCORE:
            return {"hist": {"shape": (len(self.cands), 2, N_DECISION_BINS), **COUNT_SPEC}}
        raise ValueError(f"{self.name}: nothing to contribute in phase {phase!r}")

    def local(self, data: CohortData, state: State) -> dict[str, np.ndarray]:
        y, X, ids = self._check_data(data)
        phase = state["phase"]
        if phase == PHASE_COUNTS:
            folds = np.concatenate([np.stack([np.bincount(assign_folds(ids, y, K, self.seed)[y == c], minlength=K)
                                              for c in (0, 1)], axis=1)
                                    for K in range(FOLDS_RANGE[0], self.cv_folds + 1)]).astype(np.float64)
            return {"n": np.array([(y == 0).sum(), (y == 1).sum()], dtype=np.float64), "folds": folds,
                    "sum": X.sum(axis=0), "sumsq": (X * X).sum(axis=0)}
        K = int(state["n_folds"])
        folds = assign_folds(ids, y, K, self.seed)
        xs = (X - np.asarray(state["mean"])) / np.asarray(state["scale"])
        ys = 2.0 * y - 1.0
        probs = self.problems(K)
        if phase == PHASE_MARGINS:
            b = np.clip(np.rint(xs / MARGIN_STEP), -(N_MARGIN_BINS // 2), N_MARGIN_BINS // 2).astype(np.int64)
            b += N_MARGIN_BINS // 2
            return {"margins": np.stack([np.bincount(b[:, j], minlength=N_MARGIN_BINS) for j in range(self.d)]
                                        ).astype(np.float64)}
        if phase == PHASE_NEWTON:
            idx = np.flatnonzero(np.asarray(state["done"]) == 0)
            w_try, stage = np.asarray(state["w_try"]), np.asarray(state["stage"])
            D1 = w_try.shape[1]
            J, w_acc, direc, t = (np.asarray(state[k]) for k in ("J", "w", "dir", "t"))
            out = {"loss": np.zeros(idx.size), "ladder": np.zeros((idx.size, LADDER)), "grad": np.zeros((idx.size, D1)),
                   "hess": np.zeros((idx.size, D1 * (D1 + 1) // 2)), "active": np.zeros((idx.size, 2))}
            Z = {g: self._features(state, xs, g, D1 - 1) for g in sorted({probs[p][0] for p in idx})}
            for j, p in enumerate(idx):
                gi, _, f = probs[p]
                rows = folds != f if f >= 0 else np.ones(y.size, dtype=bool)
                if not rows.any():
                    continue
                loss, grad, hess, active = site_terms(Z[gi][rows], ys[rows], w_try[p], int(stage[p]),
                                                      self.huber_h, int(state["n_total"]))
                out["loss"][j], out["grad"][j], out["hess"][j], out["active"][j] = loss, grad, hess, active
                if np.isfinite(J[p]):  # a trial step from an accepted point: losses of shorter steps too
                    out["ladder"][j] = ladder_losses(Z[gi][rows], ys[rows], w_acc[p], direc[p], float(t[p]),
                                                     int(stage[p]), self.huber_h, int(state["n_total"]))
            return out
        if phase == PHASE_SCORE:
            hist = np.zeros((len(self.cands), 2, N_DECISION_BINS))
            w = np.asarray(state["w"])
            for c, (gi, _) in enumerate(self.cands):
                Z = self._features(state, xs, gi, w.shape[1] - 1)
                f = np.empty(y.size)
                for k in range(K):
                    rows = folds == k
                    wk = w[c * (K + 1) + k]
                    f[rows] = Z[rows] @ wk[:-1] + wk[-1]
                b = decision_bin(f)
                for cls in (0, 1):
                    hist[c, cls] = np.bincount(b[y == cls], minlength=N_DECISION_BINS)
            return {"hist": hist}
        raise ValueError(f"{self.name}: nothing to contribute in phase {phase!r}")

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        st = dict(state)
        st["round"] = int(st["round"]) + 1
        st["values_sent"] = int(st["values_sent"]) + sum(int(np.prod(v["shape"])) for v in self.layout(state).values())
        phase = st["phase"]
        if phase == PHASE_COUNTS:
            return self._after_counts(st, totals)
        if phase == PHASE_MARGINS:
            return self._after_margins(st, totals)
        if phase == PHASE_NEWTON:
            return self._after_newton(st, totals)
        if phase == PHASE_SCORE:
            return self._after_score(st, totals)
        raise ValueError(f"{self.name}: the protocol is finished")

    def _refuse(self, st: State, reason: str) -> tuple[State, bool]:
        st.update(phase=PHASE_DONE, status="refused", reason=reason)
        logger.info("%s refused: %s", self.name, reason)
        return st, True

    def _after_counts(self, st: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        n = np.rint(np.asarray(totals["n"])).astype(np.int64)
        n_neg, n_pos = int(n[0]), int(n[1])
        st.update(n_neg=n_neg, n_pos=n_pos, n_total=n_neg + n_pos)
        k = self.min_count
        if min(n_neg, n_pos) < k:
            return self._refuse(st, f"the training cohort has {min(n_neg, n_pos)} patient(s) in its smaller "
                                    f"class, fewer than k={k}")
        counts = np.rint(np.asarray(totals["folds"])).astype(np.int64)
        chosen, start = None, 0
        by_k = {}
        for K in range(FOLDS_RANGE[0], self.cv_folds + 1):
            by_k[K] = counts[start:start + K]
            start += K
        for K in range(self.cv_folds, FOLDS_RANGE[0] - 1, -1):
            if by_k[K].min() >= k:
                chosen = K
                break
        if chosen is None:
            return self._refuse(st, f"even with 2 folds a fold holds fewer than k={k} patients of a class "
                                    f"({n_pos} positive, {n_neg} negative patients in all)")
        st["n_folds"] = chosen
        st["fold_counts"] = by_k[chosen].tolist()
        st["notes"] = [] if chosen == self.cv_folds else [
            f"{chosen}-fold instead of {self.cv_folds}-fold cross-validation: with {self.cv_folds} folds a fold "
            f"would hold fewer than k={k} patients of a class"]
        N = n_neg + n_pos
        mean = np.asarray(totals["sum"]) / N
        var = np.maximum(np.asarray(totals["sumsq"]) / N - mean**2, 0.0)
        scale = np.where(var > 1e-24 * np.maximum(1.0, mean**2), np.sqrt(var), 1.0)
        st["mean"], st["scale"] = quantise(mean), quantise(scale)
        if self.kernel == "landmarks":
            st["phase"] = PHASE_MARGINS
            return st, False
        return self._init_newton(st)

    def _after_margins(self, st: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        counts = np.rint(np.asarray(totals["margins"])).astype(np.int64)
        cells = [merge_cells(counts[j], self.min_count) for j in range(self.d)]
        sizes = [int(counts[j, a:b].sum()) for j in range(self.d) for a, b in cells[j]]
        st["margin_min_cell"] = min(c for c in sizes if c > 0)
        points = (np.arange(N_MARGIN_BINS) - N_MARGIN_BINS // 2) * MARGIN_STEP
        u = halton(self.d, self.n_components, self.seed)
        st["landmarks"] = quantise(quantile_landmarks(u, cells, counts, points))
        return self._init_newton(st)

    def _init_newton(self, st: State) -> tuple[State, bool]:
        chosen = int(st["n_folds"])
        P = len(self.problems(chosen))
        fmap = self.fmap(st)
        D1 = max(fmap.dim(g) for g in range(len(self.gammas))) + 1
        # problems whose gamma keeps fewer eigen-directions pad the unused coordinates with zeros
        st.update({"w": np.zeros((P, D1)), "w_try": np.zeros((P, D1)), "J": np.full(P, np.inf),
                   "g": np.zeros((P, D1)), "dir": np.zeros((P, D1)), "t": np.ones(P),
                   "iter": np.zeros(P, dtype=np.int64), "stage_iter": np.zeros(P, dtype=np.int64),
                   "halvings": np.zeros(P, dtype=np.int64), "done": np.zeros(P, dtype=np.int64),
                   "converged": np.zeros(P, dtype=np.int64), "gnorm": np.full(P, np.nan),
                   "active": np.zeros((P, 2)), "stage": np.full(P, SQUARED, dtype=np.int64)})
        st["phase"] = PHASE_NEWTON
        return st, False

    def _after_newton(self, st: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        for key in NEWTON_KEYS:
            st[key] = np.array(st[key], copy=True)
        idx = np.flatnonzero(st["done"] == 0)
        K = int(st["n_folds"])
        Cs = np.array([self.C_grid[ci] for _, ci, _ in self.problems(K)])
        newton_advance(st, idx, Cs, np.asarray(totals["loss"]), np.asarray(totals["grad"]),
                       np.asarray(totals["hess"]), np.rint(np.asarray(totals["active"])), int(st["n_total"]),
                       self.max_iter, self.huber_h, np.asarray(totals["ladder"]))
        st["w_try"] = quantise(st["w_try"])
        st["w"] = quantise(st["w"])
        if (st["done"] == 1).all():
            st["phase"] = PHASE_SCORE
        return st, False

    def _after_score(self, st: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        hist = np.rint(np.asarray(totals["hist"]))
        aucs = [_auc_from_hist(hist[c, 1], hist[c, 0]) for c in range(len(self.cands))]
        best = int(np.nanargmax(np.round(aucs, 12)))  # first best in grid order
        a, b, conv = platt_from_hist(decision_points(), hist[best, 1], hist[best, 0])
        st.update(cv_auc=[float(x) for x in aucs], best=best, platt=[float(quantise(a)), float(quantise(b))],
                  platt_convergence=conv, phase=PHASE_DONE, status="fitted")
        return st, True

    # ---------------------------------------------------------------- release
    def release(self, state: State, min_count: int) -> Released:
        k = _check_int("min_count", min_count, *MIN_COUNT_RANGE)
        base: Released = {"protocol": self.name, "released": False, "withheld": [], "rounds": int(state["round"]),
                          "values_sent_per_site": int(state["values_sent"])}
        if state.get("status") != "fitted":
            reason = state.get("reason") or "the fit did not finish"
            return {**base, "reason": reason, "withheld": [{"quantity": "fusion_svm", "reason": reason}]}
        K = int(state["n_folds"])
        fold_counts = np.asarray(state["fold_counts"])
        best = int(state["best"])
        p_final = best * (K + 1) + K
        active = np.rint(np.asarray(state["active"])[p_final]).astype(np.int64)
        problems = []
        if min(int(state["n_pos"]), int(state["n_neg"])) < k:
            problems.append(f"the training cohort has fewer than k={k} patients in a class")
        if fold_counts.min() < k:
            problems.append(f"a cross-validation fold holds fewer than k={k} patients of a class (the folds "
                            f"were built for k={self.min_count})")
        if self.kernel == "landmarks" and int(state["margin_min_cell"]) < k:
            problems.append(f"a landmark comes from a marginal histogram cell of fewer than k={k} patients (the "
                            f"cells were built for k={self.min_count})")
        if active.min() < k:
            problems.append(f"the fitted function depends on fewer than k={k} patients of a class (margin-active)")
        if problems:
            reason = "; ".join(problems)
            return {**base, "reason": reason, "withheld": [{"quantity": "fusion_svm", "reason": reason}]}
        model = self._model(state)
        return {**base, "released": True, "model": model.to_json(), "notes": list(state.get("notes", []))}

    def _model(self, state: State) -> SVMModel:
        K = int(state["n_folds"])
        best = int(state["best"])
        gi, ci = self.cands[best]
        p_final = best * (K + 1) + K
        w = np.asarray(state["w"])[p_final]
        fmap = self.fmap(state)
        D = fmap.dim(gi)
        basis, offset, coef = fmap.expansion(w[:D], gi)
        probs = self.problems(K)
        cv_idx = [p for p, (_, _, f) in enumerate(probs) if f >= 0]
        conv, it, gn = (np.asarray(state[x]) for x in ("converged", "iter", "gnorm"))
        platt = state["platt_convergence"]
        convergence = {
            "final_converged": bool(conv[p_final]), "final_iterations": int(it[p_final]),
            "final_grad_norm": float(gn[p_final]),
            "platt_converged": bool(platt["converged"]), "platt_iterations": int(platt["iterations"]),
            "platt_grad_norm": float(platt["grad_norm"]),
            "cv_fits": len(cv_idx), "cv_fits_converged": int(conv[cv_idx].sum()),
            "cv_max_iterations": int(it[cv_idx].max()),
        }
        fc = np.asarray(state["fold_counts"])
        active = np.rint(np.asarray(state["active"])[p_final]).astype(np.int64)
        counts = {"n_pos": int(state["n_pos"]), "n_neg": int(state["n_neg"]), "n_folds": K,
                  "min_fold_pos": int(fc[:, 1].min()), "min_fold_neg": int(fc[:, 0].min()),
                  "active_pos": int(active[1]), "active_neg": int(active[0])}
        table = [{"C": self.C_grid[c], "gamma": self.gammas[g], "cv_auc": float(a)}
                 for (g, c), a in zip(self.cands, state["cv_auc"], strict=True)]
        return SVMModel(list(self.columns), np.asarray(state["mean"]), np.asarray(state["scale"]),
                        quantise(basis), quantise(offset), quantise(coef), float(quantise(w[-1])),
                        float(state["platt"][0]), float(state["platt"][1]), self.C_grid[ci], self.gammas[gi],
                        float(state["cv_auc"][best]), table, fmap.kernel, convergence, counts)

    def result(self, released: Released) -> FusionFit:
        cost = {"rounds": int(released.get("rounds", 0)),
                "values_sent_per_site": int(released.get("values_sent_per_site", 0))}
        if not released.get("released"):
            return FusionFit(None, str(released.get("reason", "withheld")), cost=cost)
        model = SVMModel.from_json(released["model"])
        return FusionFit(model, "", dict(model.convergence), dict(model.counts), list(released.get("notes", [])),
                         cost)


def decision_points() -> np.ndarray:
    """Centres of the fixed decision-value grid, shape (N_DECISION_BINS,)."""
    return (np.arange(N_DECISION_BINS) - (N_DECISION_BINS - 1) // 2) * DECISION_STEP


def decision_bin(f: np.ndarray) -> np.ndarray:
    """Bin of each decision value on the fixed grid (values beyond +-DECISION_MAX go to the end bins)."""
    j = np.rint(np.asarray(f, dtype=np.float64) / DECISION_STEP) + (N_DECISION_BINS - 1) // 2
    return np.clip(j, 0, N_DECISION_BINS - 1).astype(np.int64)


# --------------------------------------------------------------------------- SHAP sums
class ShapSumsSite(SiteComputedProtocol):
    """Mean |SHAP| per input of a fitted fusion model over a cohort's patients (one round).

    Each site computes its patients' exact Shapley values against the pooled mean
    (:func:`~shared.fusion.model.shapley_values`) and adds ``n`` and the sums of |SHAP|. The model
    is not a parameter: the site service passes the model *it derived itself* in
    ``CohortData.extra["fusion_model"]``, and the site refuses unless its digest equals
    ``model_digest`` (a server cannot make a site evaluate a crafted function on its patients).
    Release: ``n`` and the mean |SHAP| per input when the pooled ``n >= k``.

    Parameters
    ----------
    columns : list of str
    model_digest : str
        :meth:`~shared.fusion.model.SVMModel.digest` of the model (64 hex digits).
    """

    name: ClassVar[str] = "fusion_shap_sums"
    max_rounds: ClassVar[int] = 1

    def __init__(self, columns: Sequence[str], model_digest: str) -> None:
        super().__init__()
        self.columns = _check_columns(columns)
        if not isinstance(model_digest, str) or len(model_digest) != 64 \
                or any(c not in "0123456789abcdef" for c in model_digest):
            raise ValueError(f"model_digest must be 64 lower-case hex digits, got {model_digest!r}")
        self.model_digest = model_digest
        self._keep(columns=self.columns, model_digest=model_digest)

    def layout(self, state: State) -> dict[str, dict[str, Any]]:
        return {"n": {"shape": (1,), **COUNT_SPEC}, "abs_shap": {"shape": (len(self.columns),), **SUM_SPEC}}

    def local(self, data: CohortData, state: State) -> dict[str, np.ndarray]:
        where = _where(data)
        model = data.extra.get("fusion_model")
        if not isinstance(model, SVMModel) or model.digest() != self.model_digest:
            raise ValueError(f"{self.name}{where}: the model named by the query is not one this site derived "
                             f"(digest mismatch or no model); refit the fusion model")
        if list(data.columns) != self.columns or list(model.columns) != self.columns:
            raise ValueError(f"{self.name}{where}: columns {list(data.columns)} / model {model.columns} differ "
                             f"from the query's {self.columns}")
        if data.n == 0:
            return {"n": np.zeros(1), "abs_shap": np.zeros(len(self.columns))}
        phi = shapley_values(model, data.X, model.mean)
        return {"n": np.array([float(data.n)]), "abs_shap": np.abs(phi).sum(axis=0)}

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        return {"round": 1, "n": int(np.rint(totals["n"][0])),
                "abs_shap": [float(v) for v in np.asarray(totals["abs_shap"])]}, True

    def release(self, state: State, min_count: int) -> Released:
        k = _check_int("min_count", min_count, *MIN_COUNT_RANGE)
        n = int(state["n"])
        if n < k:
            return {"protocol": self.name, "released": False, "withheld": [
                {"quantity": "mean_abs_shap", "reason": f"fewer than k={k} patients in the cohort"}]}
        return {"protocol": self.name, "released": True, "n": n, "columns": list(self.columns),
                "mean_abs_shap": [v / n for v in state["abs_shap"]], "withheld": []}
