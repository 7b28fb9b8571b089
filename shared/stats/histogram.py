"""Shared grids, disclosure-safe histograms (cells) and what the server derives from them.

A :class:`Grid` is agreed before any data moves (it is part of the protocol parameters), so a
site never reveals its range. A site bins its values on the grid and sends *cells*: runs of
fine bins ``[start, stop)`` with their patient count. Without disclosure control every cell is
one fine bin. With ``min_count = k`` a site never sends a cell holding ``0 < count < k``
patients: small bins are merged with their neighbours (left to right, a cell closes once it holds
>= k patients, a short tail joins the last cell); a merged cell spans its first to its last
non-empty fine bin. (Its edges therefore say that some patient lies in the first and in the
last bin of the cell, at grid resolution: this is the usual minimum-cell-count rule, not
differential privacy.)

The server pools the cells of all sites. A quantity is *resolved* for a pair of patients (or a
patient and a threshold) when their cells do not overlap; unresolved pairs count half. Every
estimate computed this way carries a certified bound: its distance to the same quantity
computed from the raw pooled values is at most half the unresolved mass (see each function).
When all cells are single fine bins and the values are *on the grid* (every value in a bin is
the same number, e.g. probabilities rounded to 1e-4 with :meth:`Grid.probability`), the
estimates equal the pooled computation exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ._checks import where

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Grid:
    """A shared binning of the real line.

    Bin ``b`` is ``[edges[b], edges[b+1])``; values outside ``[edges[0], edges[-1])`` are an
    error. ``points[b]`` is the value that represents bin ``b`` (a value equal to its bin's
    point is *on the grid*).

    Parameters
    ----------
    edges : ndarray of shape (n_bins + 1,)
        Strictly increasing, finite.
    points : ndarray of shape (n_bins,)
        ``edges[b] <= points[b] < edges[b+1]``.
    """

    edges: np.ndarray
    points: np.ndarray

    def __post_init__(self) -> None:
        e = np.asarray(self.edges, dtype=np.float64)
        p = np.asarray(self.points, dtype=np.float64)
        if e.ndim != 1 or e.size < 2 or not np.isfinite(e).all() or not (np.diff(e) > 0).all():
            raise ValueError("grid edges must be a finite, strictly increasing 1-d array of length >= 2")
        if p.shape != (e.size - 1,) or not ((p >= e[:-1]) & (p < e[1:])).all():
            raise ValueError("grid points must have one value per bin, inside the bin")
        object.__setattr__(self, "edges", e)
        object.__setattr__(self, "points", p)

    @classmethod
    def from_edges(cls, edges: np.ndarray, points: np.ndarray | None = None) -> Grid:
        """Grid with the given edges; points default to the bin midpoints."""
        e = np.asarray(edges, dtype=np.float64)
        return cls(e, (e[:-1] + e[1:]) / 2 if points is None else np.asarray(points, dtype=np.float64))

    @classmethod
    def from_points(cls, points: np.ndarray) -> Grid:
        """Grid whose bins are centred on ``points`` (sorted, unique); edges at midpoints.

        ``Grid.from_points(np.arange(1, 6))`` makes every integer 1..5 on the grid.
        """
        p = np.unique(np.asarray(points, dtype=np.float64))
        if p.size == 1:
            return cls(np.array([p[0] - 0.5, p[0] + 0.5]), p)
        mid = (p[:-1] + p[1:]) / 2
        edges = np.concatenate([[p[0] - (p[1] - p[0]) / 2], mid, [p[-1] + (p[-1] - p[-2]) / 2]])
        return cls(edges, p)

    @classmethod
    def probability(cls, resolution: float = 1e-4) -> Grid:
        """The default grid for probabilities: bins centred on k * resolution, k = 0..1/resolution.

        With the default 1e-4 that is 10001 bins on [-0.00005, 1.00005); a probability rounded to
        4 decimals is on the grid.
        """
        n = int(round(1.0 / resolution))
        if n < 1 or abs(n * resolution - 1.0) > 1e-9:
            raise ValueError(f"resolution must divide 1, got {resolution!r}")
        return cls.from_points(np.arange(n + 1) / n)

    @property
    def n_bins(self) -> int:
        return int(self.points.size)

    def bin(self, x: np.ndarray, name: str = "score", site: str | None = None) -> np.ndarray:
        """Bin index of each value.

        Parameters
        ----------
        x : ndarray of shape (n,)

        Returns
        -------
        ndarray of shape (n,), dtype int64, values in [0, n_bins)
        """
        x = np.asarray(x, dtype=np.float64)
        if np.isnan(x).any():
            raise ValueError(f"{name}{where(site)} contains NaN")
        idx = np.searchsorted(self.edges, x, side="right") - 1
        bad = (idx < 0) | (idx >= self.n_bins)
        if bad.any():
            raise ValueError(
                f"{name}{where(site)}: {int(bad.sum())} value(s) outside the grid "
                f"[{self.edges[0]:g}, {self.edges[-1]:g})"
            )
        return idx.astype(np.int64)

    def snap(self, x: np.ndarray) -> np.ndarray:
        """Replace each value by its bin's point (what the federated exact results describe)."""
        return self.points[self.bin(x)]


@dataclass(frozen=True, eq=False)
class Cells:
    """A histogram as cells ``[start[i], stop[i])`` of fine bins holding ``count[i]`` patients.

    Parameters
    ----------
    start, stop, count : ndarray of shape (n_cells,), dtype int64
    n_bins : int
        Number of fine bins of the grid.
    """

    start: np.ndarray
    stop: np.ndarray
    count: np.ndarray
    n_bins: int

    @property
    def n(self) -> int:
        return int(self.count.sum())

    @property
    def exact(self) -> bool:
        """True when every cell is a single fine bin."""
        return bool(((self.stop - self.start) == 1).all())

    @classmethod
    def from_bins(cls, bins: np.ndarray, n_bins: int, min_count: int = 1) -> tuple[Cells, bool]:
        """Cells of a site's binned values; returns ``(cells, merged)``.

        Parameters
        ----------
        bins : ndarray of shape (n,), int
            Fine-bin index per patient.
        n_bins : int
        min_count : int
            No cell with ``0 < count < min_count`` is produced. The total must be 0 or
            ``>= min_count`` (checked by the caller, which excludes the site otherwise).
        """
        counts = np.bincount(bins, minlength=n_bins).astype(np.int64)
        return cls.from_counts(counts, min_count)

    @classmethod
    def from_counts(cls, counts: np.ndarray, min_count: int = 1) -> tuple[Cells, bool]:
        """Cells of a fine histogram ``counts`` of shape (n_bins,), see :meth:`from_bins`."""
        counts = np.asarray(counts, dtype=np.int64)
        n_bins = counts.size
        nz = np.flatnonzero(counts)
        if not ((counts[nz] < min_count).any()):
            return cls(nz.astype(np.int64), nz + 1, counts[nz], n_bins), False
        total = int(counts.sum())
        if total < min_count:
            raise ValueError(f"cannot build cells of >= {min_count} from {total} patient(s)")
        # left to right over the non-empty bins: a cell closes as soon as it holds >= min_count;
        # a short tail joins the last cell. Each cell spans its first to its last non-empty bin.
        c = counts[nz]
        starts: list[int] = []
        stops: list[int] = []
        cnts: list[int] = []
        acc, first = 0, -1
        for pos, v in zip(nz.tolist(), c.tolist(), strict=True):
            if acc == 0:
                first = pos
            acc += v
            if acc >= min_count:
                starts.append(first)
                stops.append(pos + 1)
                cnts.append(acc)
                acc = 0
        if acc:
            stops[-1] = int(nz[-1]) + 1
            cnts[-1] += acc
        return (
            cls(np.array(starts, np.int64), np.array(stops, np.int64), np.array(cnts, np.int64), n_bins),
            True,
        )

    @classmethod
    def concat(cls, parts: list[Cells], n_bins: int) -> Cells:
        """Pool cells of several sites (sorted by start, then stop; identical cells summed)."""
        if not parts:
            e = np.zeros(0, np.int64)
            return cls(e, e.copy(), e.copy(), n_bins)
        start = np.concatenate([p.start for p in parts])
        stop = np.concatenate([p.stop for p in parts])
        count = np.concatenate([p.count for p in parts])
        key = start * (n_bins + 1) + stop
        uniq, inv = np.unique(key, return_inverse=True)
        summed = np.bincount(inv, weights=count, minlength=uniq.size).astype(np.int64)
        keep = summed > 0
        s, t = np.divmod(uniq[keep], n_bins + 1)
        return cls(s.astype(np.int64), t.astype(np.int64), summed[keep], n_bins)

    def to_summary(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.start": self.start, f"{prefix}.stop": self.stop, f"{prefix}.count": self.count}

    @classmethod
    def from_summary(cls, summary: dict, prefix: str, n_bins: int) -> Cells:
        start = np.asarray(summary[f"{prefix}.start"], dtype=np.int64)
        stop = np.asarray(summary[f"{prefix}.stop"], dtype=np.int64)
        count = np.asarray(summary[f"{prefix}.count"], dtype=np.int64)
        if not (start.shape == stop.shape == count.shape) or (start.size and (
                start.min() < 0 or stop.max() > n_bins or (stop <= start).any() or count.min() < 0)):
            raise ValueError(f"malformed cells {prefix!r}")
        return cls(start, stop, count, n_bins)

    # -- what the server derives -------------------------------------------------------------
    def _cum_stop(self) -> np.ndarray:
        """``out[j]`` = patients in cells with ``stop <= j``; shape (n_bins + 1,)."""
        return np.cumsum(np.bincount(self.stop, weights=self.count, minlength=self.n_bins + 1))

    def _cum_start_lt(self) -> np.ndarray:
        """``out[j]`` = patients in cells with ``start < j``; shape (n_bins + 1,)."""
        s = np.bincount(self.start, weights=self.count, minlength=self.n_bins + 1)
        return np.concatenate([[0.0], np.cumsum(s)[:-1]])

    def below_cover_above(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each fine bin j: patients surely below it, in a cell containing it, surely above.

        Returns
        -------
        below, cover, above : ndarray of shape (n_bins,), float64
            ``below[j]``: cells with ``stop <= j``; ``above[j]``: cells with ``start > j``;
            ``cover = n - below - above``.
        """
        n = float(self.n)
        below = self._cum_stop()[: self.n_bins]
        above = n - self._cum_start_lt()[1 : self.n_bins + 1]
        return below, n - below - above, above

    def at_or_above(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patients surely / possibly in bins ``>= b``, for each threshold bin in ``b``.

        Returns
        -------
        sure, possible : ndarray of shape b.shape, float64
            ``sure``: cells with ``start >= b``; ``possible``: cells with ``stop > b``.
            Equal when no cell straddles ``b``.
        """
        b = np.asarray(b, dtype=np.int64)
        n = float(self.n)
        return n - self._cum_start_lt()[b], n - self._cum_stop()[b]

    def fine_counts(self) -> np.ndarray:
        """Counts per fine bin, shape (n_bins,); only for :attr:`exact` cells."""
        if not self.exact:
            raise ValueError("cells were merged; fine counts are not known")
        return np.bincount(self.start, weights=self.count, minlength=self.n_bins).astype(np.int64)


def mann_whitney_cells(hi: Cells, lo: Cells) -> tuple[float, float]:
    """Half-credit U statistic of ``hi`` over ``lo``, and the patient pairs it could not resolve.

    ``U = #(hi > lo) + 0.5 #(unresolved)``, where a pair is resolved when the cells do not
    overlap. Against the raw values, ``|U - U_raw| <= 0.5 * unresolved``; exact for on-grid values
    in single-bin cells (same-bin pairs are then true ties).

    Returns
    -------
    u : float
    unresolved : float
        Pairs in overlapping cells (includes same-bin pairs).
    """
    if hi.n == 0 or lo.n == 0:
        return float("nan"), 0.0
    below = lo._cum_stop()[hi.start]  # lo cells entirely below hi cell
    above = lo.n - lo._cum_start_lt()[hi.stop]  # lo cells with start >= hi stop
    overlap = lo.n - below - above
    c = hi.count.astype(np.float64)
    return float(c @ (below + 0.5 * overlap)), float(c @ overlap)


def tie_term(cells: Cells) -> float:
    """sum(t**3 - t) over tie groups, counting only single-bin cells (exact when all are)."""
    single = (cells.stop - cells.start) == 1
    t = np.bincount(cells.start[single], weights=cells.count[single], minlength=cells.n_bins)
    return float((t**3 - t).sum())


def weighted_quantile(values: np.ndarray, counts: np.ndarray, q: np.ndarray) -> np.ndarray:
    """numpy's default ("linear", Hyndman-Fan type 7) quantile of ``values`` repeated ``counts`` times.

    Parameters
    ----------
    values, counts : ndarray of shape (m,)
        Need not be sorted; counts are non-negative integers with a positive sum.
    q : ndarray of shape (k,)

    Returns
    -------
    ndarray of shape (k,)
    """
    order = np.argsort(values, kind="stable")
    v = np.asarray(values, dtype=np.float64)[order]
    cum = np.cumsum(np.asarray(counts, dtype=np.int64)[order])
    n = int(cum[-1])
    h = (n - 1) * np.asarray(q, dtype=np.float64)
    k = np.floor(h).astype(np.int64)
    t = h - k
    a = v[np.searchsorted(cum, k, side="right")]
    b = v[np.searchsorted(cum, np.minimum(k + 1, n - 1), side="right")]
    diff = b - a
    out = a + diff * t
    hi = t >= 0.5
    out[hi] = (b - diff * (1 - t))[hi]
    return out


def cells_quantiles(cells: Cells, grid: Grid, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantiles of pooled cells: estimate and a certified enclosure of the raw-data quantile.

    The estimate puts a single-bin cell's patients on the bin point and a merged cell's at its
    centre. The enclosure puts every patient at its cell's lower edge (lo) / upper edge (hi):
    order statistics are monotone in the values, so ``lo <= raw quantile <= hi``.

    Returns
    -------
    est, lo, hi : ndarray of shape (len(q),)
    """
    e = grid.edges
    single = (cells.stop - cells.start) == 1
    est_v = np.where(single, grid.points[cells.start], (e[cells.start] + e[cells.stop]) / 2)
    return (
        weighted_quantile(est_v, cells.count, q),
        weighted_quantile(e[cells.start], cells.count, q),
        weighted_quantile(e[cells.stop], cells.count, q),
    )
