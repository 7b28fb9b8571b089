"""Building blocks shared by the site-computed protocols (:mod:`shared.stats.sitecomputed`).

* Parameter checks: every protocol validates its parameters in ``__init__`` with these, so a site
  refuses (``ValueError``) a request outside the allowed vocabulary before touching data.
* The display grid: ``D`` equal bins on [0, 1] with edges ``j / D`` (``D`` from
  :data:`DISPLAY_BINS`); a probability ``p`` is in bin ``j`` iff ``edges[j] <= p < edges[j + 1]``
  (1.0 in the last bin), so ``p >= edges[j]`` iff its bin is ``>= j``: thresholds at released
  edges are decided exactly.
* Released cells: :func:`released_cells` merges adjacent grid cells of *pooled* counts until every
  cell holds 0 or >= k patients of every class (grid edges only), and returns None when nothing can
  be released. What a released cell's edges still say: the greedy merge closes a cell at the grid cell
  where its counts first qualify, so an interior upper edge shows that the grid cell just below
  it is not empty (some patient, of some class, lies there at grid resolution); the first cell
  starts at the grid's start and the last ends at its end (empty grid cells are absorbed), so
  the extreme patients' positions are not shown.
* :func:`run_encoded`: :func:`~shared.stats.sitecomputed.run_plain` with what the deployed path
  adds: every site's contribution goes through the fixed-point ring encoding declared by
  :meth:`~shared.stats.sitecomputed.SiteComputedProtocol.layout` (as :mod:`shared.secagg` does),
  and the state is round-tripped through JSON + arrays between rounds (as a site persists it).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .sitecomputed import (
    PlainRun,
    SiteComputedProtocol,
    State,
    check_contribution,
    merge_cells,
    zeros_like,
)

logger = logging.getLogger(__name__)

#: Display grids a server may ask for (equal bins on [0, 1]); 100 is the finest.
DISPLAY_BINS: tuple[int, ...] = (5, 10, 20, 25, 50, 100)
#: Calibration bins a server may ask for.
CALIBRATION_BINS: tuple[int, ...] = (5, 10, 20)
#: Upper limit of Newton iterations per fit.
MAX_ITER_LIMIT = 300
#: Most columns one query may name.
MAX_COLUMNS = 32

#: Encoding of Newton sums (gradients, information matrices, Firth's third-order sums): values up to
#: 2**24 per site at 2**-32 resolution (128 sites fit in the 64-bit ring).
NEWTON_SPEC = {"bound": float(2**24), "frac_bits": 32}
#: Encoding of log-likelihood sums: up to 2**30 per site (per-patient terms are clipped at
#: -1000, so up to ~1e6 patients per site), 2**-26 resolution.
LOGLIK_SPEC = {"bound": float(2**30), "frac_bits": 26}
#: Per-patient log-likelihood terms below this are clipped (only used to detect an overshooting
#: Newton step, which such a term always signals).
LOGLIK_FLOOR = -1000.0


# -- values that travel -------------------------------------------------------------------------
def fnum(x: Any) -> float | None:
    """A JSON-safe float: ``None`` for NaN/inf (JSON has no NaN)."""
    v = float(x)
    return v if math.isfinite(v) else None


def fnan(x: float | None) -> float:
    """Inverse of :func:`fnum`: ``None`` -> NaN."""
    return float("nan") if x is None else float(x)


def withheld(quantity: str, reason: str) -> dict[str, str]:
    """One ``withheld`` entry of a release (see :class:`shared.stats.sitecomputed.Withheld`)."""
    return {"quantity": quantity, "reason": reason}


# -- parameter checks (raise ValueError naming the parameter) -----------------------------------
def check_alpha(alpha: Any) -> float:
    """``alpha`` in (0, 0.5): a confidence level above 50 %."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 < float(alpha) < 0.5:
        raise ValueError(f"alpha must be a number in (0, 0.5), got {alpha!r}")
    return float(alpha)


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """``value`` must be one of ``allowed`` (exact, no type coercion beyond int/float equality)."""
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    """An integer in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= int(value) <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def check_float(name: str, value: Any, lo: float, hi: float, *, open_lo: bool = True,
                open_hi: bool = True) -> float:
    """A finite number in the interval (open or closed at each end)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
    if not ok:
        interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def check_columns(name: str, columns: Any, max_n: int = MAX_COLUMNS, min_n: int = 1) -> list[str]:
    """A list of distinct, non-empty column names."""
    if isinstance(columns, str) or not isinstance(columns, Sequence):
        raise ValueError(f"{name} must be a list of column names, got {columns!r}")
    cols = list(columns)
    if not min_n <= len(cols) <= max_n:
        raise ValueError(f"{name} must name {min_n} to {max_n} columns, got {len(cols)}")
    if not all(isinstance(c, str) and c for c in cols) or len(set(cols)) != len(cols):
        raise ValueError(f"{name} must be distinct non-empty strings, got {cols!r}")
    return cols


def check_column(name: str, column: Any) -> str:
    """One non-empty column name."""
    if not isinstance(column, str) or not column:
        raise ValueError(f"{name} must be a non-empty column name, got {column!r}")
    return column


def check_percent_threshold(threshold: Any) -> float:
    """A decision threshold on the 0.01 grid in (0, 1): returns ``j / 100`` exactly.

    A server may not choose arbitrary thresholds (that would let it probe single patients'
    scores between two thresholds).
    """
    t = check_float("threshold", threshold, 0.0, 1.0)
    j = round(t * 100)
    if abs(t * 100 - j) > 1e-9 or not 1 <= j <= 99:
        raise ValueError(f"threshold must be a multiple of 0.01 in (0, 1), got {threshold!r}")
    return j / 100


def column_of(data: Any, name: str) -> np.ndarray:
    """The named column of a :class:`~shared.stats.sitecomputed.CohortData` (clear error if absent)."""
    if name not in data.columns:
        raise ValueError(f"column {name!r} is not in this site's cohort data (columns: {list(data.columns)})")
    return data.column(name)


def check_probabilities(p: np.ndarray, name: str) -> np.ndarray:
    """Values in [0, 1] (the complete-case set has no NaN)."""
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"column {name!r} must hold probabilities in [0, 1]; "
                         f"{int(((p < 0) | (p > 1)).sum())} value(s) lie outside")
    return p


# -- display grid and released cells ------------------------------------------------------------
def display_edges(n_bins: int) -> np.ndarray:
    """Edges ``j / n_bins``, j = 0..n_bins (each the correctly rounded double of j / n_bins)."""
    return np.arange(n_bins + 1) / n_bins


def display_bin(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Display-grid bin of each probability: ``edges[j] <= p < edges[j+1]``, 1.0 in the last bin."""
    idx = np.searchsorted(display_edges(n_bins), p, side="right") - 1
    return np.clip(idx, 0, n_bins - 1).astype(np.int64)


def class_hist(bins: np.ndarray, y: np.ndarray, n_bins: int) -> np.ndarray:
    """Counts per bin and class, shape (n_bins, 2): column 0 = negatives, 1 = positives."""
    return np.bincount(bins * 2 + y, minlength=2 * n_bins).reshape(n_bins, 2).astype(np.float64)


def cell_ok(c: np.ndarray, k: int) -> bool:
    """True when every class count is 0 or >= k."""
    c = np.asarray(c)
    return bool(((c == 0) | (c >= k)).all())


def released_cells(counts: np.ndarray, k: int) -> list[tuple[int, int]] | None:
    """Merged grid cells of pooled counts, each holding 0 or >= ``k`` patients of every class.

    Starts from :func:`~shared.stats.sitecomputed.merge_cells` (greedy, left to right, the remainder
    merged leftwards) and merges any violating cell into its left neighbour until none is left.

    Parameters
    ----------
    counts : ndarray of shape (n_cells,) or (n_cells, n_classes)
    k : int

    Returns
    -------
    list of (start, stop) or None
        Half-open ranges of grid cells covering the whole grid; ``None`` when even one cell
        spanning everything breaks the rule (a class total in (0, k): release nothing).
    """
    c = np.asarray(counts, dtype=np.int64)
    if c.ndim == 1:
        c = c[:, None]
    if not cell_ok(c.sum(axis=0), k):
        return None
    ranges = merge_cells(c, k)
    i = 0
    while i < len(ranges):
        s, t = ranges[i]
        if cell_ok(c[s:t].sum(axis=0), k):
            i += 1
            continue
        if i > 0:
            ranges[i - 1] = (ranges[i - 1][0], t)
            del ranges[i]
            i -= 1
        else:
            ranges[0] = (s, ranges[1][1])
            del ranges[1]
    return ranges


def coarsened(counts: np.ndarray, ranges: list[tuple[int, int]]) -> bool:
    """True when some released cell joins two or more non-empty grid cells (absorbing empty cells
    coarsens nothing)."""
    c = np.asarray(counts)
    c = c.reshape(c.shape[0], -1).sum(axis=1)
    return any(int((c[s:t] > 0).sum()) > 1 for s, t in ranges)


def cells_payload(counts: np.ndarray, ranges: list[tuple[int, int]], edges: np.ndarray) -> dict[str, list]:
    """The released form of merged cells: ``lo``, ``hi`` (grid edges), ``n_neg``, ``n_pos``."""
    c = np.asarray(counts, dtype=np.int64)
    sums = np.array([c[s:t].sum(axis=0) for s, t in ranges], dtype=np.int64)
    return {
        "lo": [float(edges[s]) for s, _ in ranges],
        "hi": [float(edges[t]) for _, t in ranges],
        "n_neg": [int(v) for v in sums[:, 0]],
        "n_pos": [int(v) for v in sums[:, 1]],
    }


def net_benefit_from_cells(cells: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    """Decision curve at the lower edges of released cells (the only thresholds they decide exactly).

    A patient is treated when ``prob >= t``; at ``t`` = a cell's lower edge that is every patient
    of that cell and of the cells above it, so the net benefit ``TP/n - FP/n * t / (1 - t)`` equals
    :func:`shared.stats.net_benefit` on the raw probabilities at those thresholds.

    Parameters
    ----------
    cells : mapping
        ``lo``, ``n_neg``, ``n_pos`` lists (a release's ``curve``).

    Returns
    -------
    DataFrame
        Columns ``threshold, model, treat_all, treat_none`` (as :func:`shared.stats.net_benefit`).
    """
    lo = np.asarray(cells["lo"], dtype=np.float64)
    neg = np.asarray(cells["n_neg"], dtype=np.float64)
    pos = np.asarray(cells["n_pos"], dtype=np.float64)
    n1, n = pos.sum(), pos.sum() + neg.sum()
    tp = n1 - np.concatenate([[0.0], np.cumsum(pos)[:-1]])
    fp = neg.sum() - np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    keep = lo < 1.0
    t = lo[keep]
    w = t / (1 - t)
    prev = n1 / n
    return pd.DataFrame({"threshold": t, "model": tp[keep] / n - fp[keep] / n * w,
                         "treat_all": prev - (1 - prev) * w, "treat_none": np.zeros_like(t)})


def quantise(x: np.ndarray, bits: int = 40) -> np.ndarray:
    """Round to a multiple of ``2**-bits``, so that every site holds bit-identical iterates even if
    their linear algebra differs in the last bits."""
    return np.ldexp(np.rint(np.ldexp(np.asarray(x, dtype=np.float64), bits)), -bits)


# -- a runner with the deployed path's encoding and persistence ---------------------------------
def state_roundtrip(state: State) -> State:
    """The state as a site restores it: arrays copied, everything else through JSON.

    Raises
    ------
    ValueError
        If a value is neither an ndarray nor JSON-serialisable (a protocol bug).
    """
    out: State = {}
    for key, v in state.items():
        if not isinstance(key, str):
            raise ValueError(f"state key {key!r} is not a string")
        if isinstance(v, np.ndarray):
            out[key] = v.copy()
            continue
        try:
            out[key] = json.loads(json.dumps(v, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"state value {key!r} cannot be persisted as JSON: {exc}") from None
    return out


def encoded_sum(protocol: SiteComputedProtocol, state: State, parts: Sequence[Mapping[str, np.ndarray]]
                ) -> dict[str, np.ndarray]:
    """What secure aggregation yields: each contribution encoded to the 64-bit ring with the layout's
    ``bound``/``frac_bits`` (values over the bound are refused, as a site does), summed modulo
    ``2**64`` and decoded."""
    from shared.secagg import ArraySpec, decode, encode

    out = {}
    for key, spec in protocol.layout(state).items():
        s = ArraySpec(bound=float(spec["bound"]), frac_bits=int(spec["frac_bits"]))
        shape = tuple(spec["shape"])
        ring = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=np.uint64)
        for p in parts:
            ring += encode(key, np.asarray(p[key], dtype=np.float64), s, len(parts))
        out[key] = decode(key, ring, s, shape).astype(np.float64)
    return out


def run_encoded(protocol: SiteComputedProtocol, sites_data: Mapping[str, Any], min_count: int = 5,
                excluded: Mapping[str, bool] | None = None) -> PlainRun:
    """:func:`~shared.stats.sitecomputed.run_plain` plus the fixed-point encoding and state persistence.

    Each site's contribution is checked against the layout, encoded to the 64-bit ring with the
    layout's ``bound``/``frac_bits`` (refusing values over the bound, as a site does) and decoded;
    the state is round-tripped through JSON + arrays after every round. Use it to check that a
    protocol's results survive the encoding and that its state can be persisted.
    """
    if not sites_data:
        raise ValueError("no sites")
    excluded = excluded or {}
    state = state_roundtrip(protocol.init_state())
    for r in range(1, protocol.max_rounds + 1):
        parts = []
        for site, data in sites_data.items():
            c = protocol.local(data, state)
            check_contribution(protocol, state, c)
            parts.append(zeros_like(c) if excluded.get(site) else c)
        state, done = protocol.advance(state, encoded_sum(protocol, state, parts))
        state = state_roundtrip(state)
        if done:
            released = protocol.release(state, min_count)
            json.dumps(released, allow_nan=False)
            return PlainRun(released, protocol.result(released), r, state)
    raise RuntimeError(f"protocol {protocol.name!r} did not finish in {protocol.max_rounds} rounds")
