"""The fitted fusion SVM and the kernel feature maps it is built on (no patient data in here).

Two ways to turn the RBF kernel ``k(x, x') = exp(-gamma |x - x'|^2)`` (on pooled-standardised
inputs) into a finite feature map that sites can sum over:

* ``"landmarks"``: a Nystrom map on ``m`` landmarks that are *not patients*: points of a
  shifted Halton sequence (a fixed low-discrepancy grid, shifted by the seed) pushed through the
  pooled marginal quantiles (:func:`quantile_landmarks`, from k-merged histograms) or through the
  normal quantile function (:func:`landmarks`, no data at all), in standardised units.
  ``phi(x) = K_LL^{-1/2} k_L(x)`` (eigen-decomposition, tiny eigenvalues dropped), so
  ``phi(x) . phi(x')`` is the kernel projected on the span of the landmarks, and the fitted
  decision function is a kernel expansion on the landmarks:
  ``f(x) = sum_j beta_j k(x, l_j) + b``. For the smooth kernels of the grid (length scale >= 0.8
  standard deviations) a few hundred landmarks reproduce the kernel closely where patients are.
* ``"rff"``: random Fourier features (Rahimi & Recht 2007),
  ``z(x) = sqrt(2/D) cos(x W + b)``, ``W = sqrt(2 gamma) Omega``, ``Omega ~ N(0, 1)``,
  ``b ~ U(0, 2 pi)``: an unbiased but noisy approximation (kept for comparison).

Every site derives the same map (from the seed and the pooled totals), and ``|phi(x)| <= 1``
(Nystrom: a projection of ``k(x, .)``; RFF: ``<= sqrt(2)``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import factorial
from typing import Any

import numpy as np
from scipy.special import ndtri

logger = logging.getLogger(__name__)

KERNELS = ("landmarks", "rff")
_KERNEL_CODE = {"rff": 0.0, "landmarks": 1.0}
#: Eigenvalues of the landmark Gram matrix below this fraction of the largest are dropped.
EIG_CUTOFF = 1e-10
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97,
           101, 103, 107, 109, 113, 127, 131)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` without overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def _seed_rng(seed: int, purpose: str) -> np.random.Generator:
    digest = hashlib.sha256(f"rectalfl.fusion/{purpose}/{int(seed)}".encode()).digest()
    return np.random.default_rng(np.frombuffer(digest[:16], dtype=np.uint32).astype(np.uint64))


def _radical_inverse(i: np.ndarray, base: int) -> np.ndarray:
    out = np.zeros(i.shape, dtype=np.float64)
    f = 1.0 / base
    i = i.copy()
    while (i > 0).any():
        out += f * (i % base)
        i //= base
        f /= base
    return out


def landmarks(n_features: int, m: int, seed: int) -> np.ndarray:
    """``m`` landmarks in standardised units, shape (m, n_features): a shifted Halton grid mapped to N(0, I).

    Depends on ``(n_features, m, seed)`` only (never on data): the Halton points ``1..m`` in
    bases 2, 3, 5, ... are shifted modulo 1 by a seed-derived vector (Cranley-Patterson
    rotation) and mapped through the normal quantile function.
    """
    return ndtri(np.clip(halton(n_features, m, seed), 1e-6, 1 - 1e-6))


def halton(n_features: int, m: int, seed: int) -> np.ndarray:
    """Points ``1..m`` of the Halton sequence in bases 2, 3, 5, ..., shifted modulo 1 by a vector
    drawn from the seed (Cranley-Patterson rotation): shape (m, n_features), values in [0, 1)."""
    if not 1 <= n_features <= len(_PRIMES):
        raise ValueError(f"landmarks: 1 <= n_features <= {len(_PRIMES)}, got {n_features}")
    idx = np.arange(1, m + 1, dtype=np.int64)
    u = np.column_stack([_radical_inverse(idx, p) for p in _PRIMES[:n_features]])
    return np.mod(u + _seed_rng(seed, "landmarks").uniform(size=n_features), 1.0)


def quantile_landmarks(u: np.ndarray, cells: Sequence[Sequence[tuple[int, int]]], counts: np.ndarray,
                       points: np.ndarray) -> np.ndarray:
    """Landmarks at the pooled marginal quantiles ``u`` of each column, from merged grid cells only.

    Column ``j``'s released cells ``cells[j]`` (half-open ranges of grid bins, each holding 0 or
    >= k patients) are treated as point masses at their mean (the count-weighted mean of the grid
    points in the cell: a mean over >= k patients at grid resolution); landmark ``i`` has
    coordinate ``F_j^-1(u[i, j])`` of that discrete distribution. So the landmarks follow the pooled
    marginals (binary and discrete columns get landmarks at their values, at grid resolution), the
    dependence between columns comes from the quasi-random points, never from a patient, and a
    patient moving inside its cell moves a landmark by at most its share of the cell mean.
    Duplicate rows are dropped.

    Parameters
    ----------
    u : ndarray of shape (m, d)
        Quasi-random points in [0, 1) (:func:`halton`).
    cells : list (d) of lists of (start, stop)
    counts : ndarray of shape (d, n_bins)
        Pooled counts per grid bin.
    points : ndarray of shape (n_bins,)
        Grid points (bin centres).

    Returns
    -------
    ndarray of shape (m', d), m' <= m
    """
    m, d = u.shape
    out = np.empty((m, d))
    for j in range(d):
        cj = [(a, b) for a, b in cells[j] if counts[j, a:b].sum() > 0]
        mass = np.array([counts[j, a:b].sum() for a, b in cj], dtype=np.float64)
        means = np.array([points[a:b] @ counts[j, a:b] for a, b in cj]) / mass
        cdf = np.cumsum(mass) / mass.sum()
        out[:, j] = means[np.clip(np.searchsorted(cdf, u[:, j], side="right"), 0, len(cj) - 1)]
    return np.unique(out, axis=0)


def rff_basis(n_features: int, n_components: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit random Fourier frequencies (n_features, D) and offsets (D,) from the seed."""
    rng = _seed_rng(seed, "rff")
    return rng.standard_normal((n_features, n_components)), rng.uniform(0.0, 2.0 * np.pi, n_components)


def rff(x: np.ndarray, omega: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Random Fourier features of standardised rows ``x`` (n, d): shape (n, D)."""
    return np.sqrt(2.0 / offset.size) * np.cos(x @ omega + offset)


def rbf(x: np.ndarray, centres: np.ndarray, gamma: float) -> np.ndarray:
    """``exp(-gamma |x_i - c_j|^2)``, shape (n, m)."""
    x = np.asarray(x, dtype=np.float64)
    sq = (x * x).sum(axis=1)[:, None] + (centres * centres).sum(axis=1)[None, :] - 2.0 * x @ centres.T
    return np.exp(-gamma * np.maximum(sq, 0.0))


def nystrom_transform(centres: np.ndarray, gamma: float) -> np.ndarray:
    """``T`` (m, r) with ``phi(x) = rbf(x, centres) @ T`` the Nystrom map (``T = V diag(ev^-1/2)``)."""
    K = rbf(centres, centres, gamma)
    ev, V = np.linalg.eigh(K)
    keep = ev > EIG_CUTOFF * ev.max()
    return V[:, keep] / np.sqrt(ev[keep])


class FeatureMap:
    """A kernel feature map: ``features(xs, g)`` of standardised rows for gamma index ``g``.

    Parameters
    ----------
    kernel : {"landmarks", "rff"}
    gammas : sequence of float
    basis : ndarray
        Landmarks (m, d) for ``"landmarks"``; unit frequencies (d, D) for ``"rff"``.
    offset : ndarray of shape (D,), optional
        Random Fourier offsets (``"rff"`` only).
    """

    def __init__(self, kernel: str, gammas: Sequence[float], basis: np.ndarray,
                 offset: np.ndarray | None = None) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel, self.gammas = kernel, [float(g) for g in gammas]
        self.basis = np.asarray(basis, dtype=np.float64)
        self.offset = np.zeros(0) if offset is None else np.asarray(offset, dtype=np.float64)
        if kernel == "rff" and self.offset.size != self.basis.shape[1]:
            raise ValueError("random Fourier features need one offset per frequency")
        self._T: dict[int, np.ndarray] = {}

    @classmethod
    def from_seed(cls, kernel: str, n_features: int, n_components: int, seed: int,
                  gammas: Sequence[float]) -> FeatureMap:
        """Grid landmarks (:func:`landmarks`) or random Fourier features drawn from the seed alone."""
        if kernel == "landmarks":
            return cls(kernel, gammas, landmarks(n_features, n_components, seed))
        unit, offset = rff_basis(n_features, n_components, seed)
        return cls(kernel, gammas, unit, offset)

    def dim(self, g: int) -> int:
        """Feature dimension for gamma index ``g`` (landmarks: the retained eigen-directions)."""
        return self.transform(g).shape[1] if self.kernel == "landmarks" else self.offset.size

    def transform(self, g: int) -> np.ndarray:
        if g not in self._T:
            self._T[g] = nystrom_transform(self.basis, self.gammas[g])
        return self._T[g]

    def omega(self, g: int) -> np.ndarray:
        return np.sqrt(2.0 * self.gammas[g]) * self.basis

    def features(self, xs: np.ndarray, g: int) -> np.ndarray:
        """Features of standardised rows, shape (n, dim(g))."""
        if self.kernel == "landmarks":
            return rbf(xs, self.basis, self.gammas[g]) @ self.transform(g)
        return rff(xs, self.omega(g), self.offset)

    def expansion(self, w: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(basis, offset, coef)`` of :class:`SVMModel` for feature weights ``w`` (without intercept)."""
        if self.kernel == "landmarks":
            return self.basis.copy(), np.zeros(0), self.transform(g) @ w
        return self.omega(g), self.offset.copy(), np.asarray(w, dtype=np.float64).copy()


# --------------------------------------------------------------------------- the fitted model
@dataclass
class SVMModel:
    """A fitted fusion SVM: everything a site needs to score a patient.

    ``decision_function(X)``: ``rff(xs, omega, offset) . coef + intercept`` (``kernel="rff"``) or
    ``rbf(xs, omega, gamma) . coef + intercept`` (``kernel="landmarks"``: ``omega`` holds the
    (m, d) landmarks, which are grid points, not patients), with ``xs = (X - mean) / scale``;
    ``predict_proba(X) = 1 / (1 + exp(platt_a * f + platt_b))`` (probability of class 1).

    ``convergence`` (final fit and Platt scaling: converged / iterations / gradient norm) and
    ``counts`` (pooled patients per class, folds) are filled by the site-computed protocol.
    """

    columns: list[str]
    mean: np.ndarray
    scale: np.ndarray
    omega: np.ndarray
    offset: np.ndarray
    coef: np.ndarray
    intercept: float
    platt_a: float
    platt_b: float
    C: float
    gamma: float
    cv_auc: float = float("nan")
    cv_table: list[dict[str, float]] = field(default_factory=list)
    kernel: str = "rff"
    convergence: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Decision values, shape (n,)."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.columns):
            raise ValueError(f"expected {len(self.columns)} columns {self.columns}, got shape {X.shape}")
        xs = (X - self.mean) / self.scale
        if self.kernel == "landmarks":
            return rbf(xs, self.omega, self.gamma) @ self.coef + self.intercept
        return rff(xs, self.omega, self.offset) @ self.coef + self.intercept

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probability of class 1, shape (n,)."""
        return sigmoid(-(self.platt_a * self.decision_function(X) + self.platt_b))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat numeric arrays (what a Flower ArrayRecord carries; columns travel separately)."""
        return {"mean": self.mean, "scale": self.scale, "omega": self.omega, "offset": self.offset,
                "coef": self.coef, "scalars": np.array([self.intercept, self.platt_a, self.platt_b, self.C,
                                                        self.gamma, self.cv_auc, _KERNEL_CODE[self.kernel]])}

    @classmethod
    def from_arrays(cls, columns: Sequence[str], arrays: Mapping[str, np.ndarray]) -> SVMModel:
        """Inverse of :meth:`to_arrays` (six scalars: a random-Fourier-feature model of an older run)."""
        s = np.asarray(arrays["scalars"], dtype=np.float64)
        kernel = "rff" if s.size < 7 else {v: k for k, v in _KERNEL_CODE.items()}[float(s[6])]
        return cls(list(columns), *(np.asarray(arrays[k], dtype=np.float64)
                                    for k in ("mean", "scale", "omega", "offset", "coef")),
                   float(s[0]), float(s[1]), float(s[2]), float(s[3]), float(s[4]), float(s[5]), kernel=kernel)

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (the protocol's release)."""
        return {"columns": list(self.columns), "kernel": self.kernel,
                **{k: np.asarray(v, dtype=np.float64).tolist() for k, v in self.to_arrays().items()
                   if k != "scalars"},
                "intercept": self.intercept, "platt_a": self.platt_a, "platt_b": self.platt_b, "C": self.C,
                "gamma": self.gamma, "cv_auc": self.cv_auc, "cv_table": list(self.cv_table),
                "convergence": dict(self.convergence), "counts": dict(self.counts)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SVMModel:
        """Inverse of :meth:`to_json`."""
        arr = {k: np.asarray(d[k], dtype=np.float64) for k in ("mean", "scale", "omega", "offset", "coef")}
        return cls(list(d["columns"]), arr["mean"], arr["scale"], arr["omega"], arr["offset"], arr["coef"],
                   float(d["intercept"]), float(d["platt_a"]), float(d["platt_b"]), float(d["C"]),
                   float(d["gamma"]), float(d["cv_auc"]), list(d.get("cv_table", [])), str(d["kernel"]),
                   dict(d.get("convergence", {})), dict(d.get("counts", {})))

    def digest(self) -> str:
        """SHA-256 of everything that defines the decision function and probabilities (hex)."""
        h = hashlib.sha256("\x1f".join(self.columns).encode() + self.kernel.encode())
        for k, v in self.to_arrays().items():
            h.update(k.encode())
            h.update(np.ascontiguousarray(np.asarray(v, dtype="<f8")).tobytes())
        return h.hexdigest()


def shapley_values(model: SVMModel, X: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Exact Shapley values of ``predict_proba`` against one baseline row (interventional SHAP).

    For d <= 12 inputs every coalition is evaluated (2^d model calls per row). The values of each
    row sum to ``p(x) - p(baseline)``. Runs on a site, on its own patients; the pooled mean
    (``model.mean``) is the usual baseline.

    Parameters
    ----------
    model : SVMModel
    X : ndarray of shape (n, d)
    baseline : ndarray of shape (d,)

    Returns
    -------
    ndarray of shape (n, d)
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    if d > 12:
        raise ValueError(f"exact Shapley values need <= 12 inputs, got {d}")
    masks = np.array([[(m >> j) & 1 for j in range(d)] for m in range(1 << d)], dtype=bool)  # (2^d, d)
    sizes = masks.sum(axis=1)
    # every (row, coalition) evaluated once: inputs from x where the mask is set, else the baseline
    comb = np.where(masks[None, :, :], X[:, None, :], np.asarray(baseline)[None, None, :]).reshape(-1, d)
    v = model.predict_proba(comb).reshape(n, 1 << d)
    phi = np.zeros((n, d))
    weight = np.array([factorial(s) * factorial(d - s - 1) / factorial(d) for s in range(d)])
    for j in range(d):
        without = np.flatnonzero(~masks[:, j])
        with_j = without | (1 << j)
        phi[:, j] = (v[:, with_j] - v[:, without]) @ weight[sizes[without]]
    return phi


def models_to_payload(models: Mapping[str, SVMModel]) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """``({"<model>|<array>": ndarray}, {model: columns})``: what the server sends to score patients."""
    arrays = {f"{name}|{k}": v for name, m in models.items() for k, v in m.to_arrays().items()}
    return arrays, {name: list(m.columns) for name, m in models.items()}


def models_from_payload(arrays: Mapping[str, np.ndarray], columns: Mapping[str, Sequence[str]]) -> dict[str, SVMModel]:
    """Inverse of :func:`models_to_payload`."""
    out = {}
    for name, cols in columns.items():
        part = {k.split("|", 1)[1]: v for k, v in arrays.items() if k.split("|", 1)[0] == name}
        out[name] = SVMModel.from_arrays(cols, part)
    return out
