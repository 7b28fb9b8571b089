"""Input validation shared by the pooled functions and the site steps.

Every error names the argument and, on a site, the site, so that a failing federated run says
where to look without any patient value appearing in the message.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_MIN_COUNT = 5


def where(site: str | None) -> str:
    """`` at site 'x'`` or the empty string (for messages)."""
    return f" at site {site!r}" if site is not None else ""


def as_binary(y: Any, name: str = "y_true", site: str | None = None) -> np.ndarray:
    """Validate a 0/1 outcome vector.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        Outcome, 1 = positive class. Booleans are accepted.
    name, site : str
        Used in error messages.

    Returns
    -------
    ndarray of shape (n_samples,), dtype int8
    """
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name}{where(site)} must be 1-dimensional, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.int8)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name}{where(site)} must be numeric 0/1, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise ValueError(f"{name}{where(site)} contains NaN")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name}{where(site)} must contain only 0 and 1")
    return arr.astype(np.int8)


def as_scores(x: Any, n: int, name: str = "score", site: str | None = None) -> np.ndarray:
    """Validate a finite float score vector of length ``n``.

    Returns
    -------
    ndarray of shape (n,), dtype float64
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}{where(site)} must be 1-dimensional, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name}{where(site)} has length {arr.shape[0]} but y_true has length {n}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}{where(site)} contains NaN or infinite values")
    return arr


def as_probabilities(p: Any, n: int, name: str = "prob", site: str | None = None) -> np.ndarray:
    """Like :func:`as_scores`, and every value must lie in [0, 1]."""
    arr = as_scores(p, n, name, site)
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"{name}{where(site)} must lie in [0, 1]")
    return arr


def check_alpha(alpha: float) -> float:
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def check_min_count(min_count: int) -> int:
    if isinstance(min_count, bool) or int(min_count) != min_count or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    return int(min_count)


def small(count: int | np.ndarray, min_count: int) -> bool:
    """True when any count is disclosive: ``0 < count < min_count`` (zero describes nobody)."""
    c = np.asarray(count)
    return bool(((c > 0) & (c < min_count)).any())
