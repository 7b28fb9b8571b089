"""Site-computed protocols: the sites derive every parameter; the server relays and sees only releases.

Why
---
A protocol where the server chooses the next round's parameters (a Newton iterate, a lookup table,
fold ids) lets a malicious server choose parameters that isolate one patient. Here the server
chooses nothing. Each round every participating site computes an *additive* contribution
(:meth:`SiteComputedProtocol.local`) from its own data and the protocol's state; the contributions
are securely aggregated (:mod:`shared.secagg`: pairwise masks that cancel in the sum plus a group
mask only the sites can remove), so every site receives the consortium *totals* and the server sees
neither a site's numbers nor the totals. Every site then runs the same deterministic update on the
totals (:meth:`SiteComputedProtocol.advance`), so all sites hold the same state. When the protocol
is done, each site computes the release (:meth:`SiteComputedProtocol.release`): the numbers the
server may see, after disclosure control applied to *pooled* counts with the agreed floor ``k``.
All participants send the same release; the server checks that they agree.

Contract of a protocol (all methods pure and deterministic; the state is a flat dict of JSON
values and NumPy arrays, persisted by the site between rounds)::

    proto = Proto(**params)                       # params: JSON-able, validated in __init__
    state = proto.init_state()                    # the same on every site
    local = proto.local(data, state)              # {key: ndarray}; keys and shapes depend only on
                                                  #   params and state, never on the data
    spec  = proto.layout(state)                   # {key: {shape, bound, frac_bits}}: encoding for secagg
    state, done = proto.advance(state, totals)    # totals = sum over sites of `local`
    rel   = proto.release(state, k)               # JSON-able; withheld quantities say why
    res   = proto.result(rel)                     # server side: a result object from the release

``data`` is what the site service hands the protocol for the cohort's fixed patient set: by default
:class:`CohortData` (``y`` 0/1 labels and a float matrix ``X`` of the requested columns, complete
cases only).

:func:`run_plain` runs a protocol with all sites in one process by plain summation (what secure
aggregation computes), for tests and references; the Flower path is in :mod:`shared.queries`
(server) and :mod:`client.stats_service` (site).
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

logger = logging.getLogger(__name__)

State = dict[str, Any]
Released = dict[str, Any]

#: Default fixed-point encodings (see :class:`shared.secagg.ArraySpec`): counts are exact integers;
#: float sums keep 2**-32 resolution up to +-2**24 per site, or 2**-24 up to +-2**32 (64 sites fit in the ring).
COUNT_SPEC = {"bound": float(2**40), "frac_bits": 0}
SUM_SPEC = {"bound": float(2**24), "frac_bits": 32}
BIG_SUM_SPEC = {"bound": float(2**32), "frac_bits": 24}


@dataclass(frozen=True)
class CohortData:
    """One site's fixed patient set for a query (complete cases): never leaves the site.

    Attributes
    ----------
    y : ndarray of int of shape (n,)
        0/1 outcome.
    X : ndarray of float of shape (n, n_columns)
        The requested columns, in the order of ``columns``.
    columns : tuple of str
    extra : dict
        Protocol-specific on-site inputs (e.g. fold ids derived on site).
    """

    y: np.ndarray
    X: np.ndarray
    columns: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        y = np.asarray(self.y)
        X = np.asarray(self.X, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] != y.shape[0] or X.shape[1] != len(self.columns):
            raise ValueError(f"cohort data: X has shape {X.shape}, expected ({y.shape[0]}, {len(self.columns)})")
        if y.size and not np.isin(y, (0, 1)).all():
            raise ValueError("cohort data: labels must be 0/1")
        if not np.isfinite(X).all():
            raise ValueError("cohort data: non-finite values (the site's complete-case set must exclude them)")
        object.__setattr__(self, "y", y.astype(np.int64))
        object.__setattr__(self, "X", X)

    @property
    def n(self) -> int:
        return int(self.y.size)

    def column(self, name: str) -> np.ndarray:
        return self.X[:, self.columns.index(name)]


@dataclass(frozen=True)
class Withheld:
    """A released quantity withheld (or coarsened) by disclosure control, and why."""

    quantity: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"quantity": self.quantity, "reason": self.reason}


class SiteComputedProtocol(ABC):
    """Base class of site-computed protocols (see the module docstring for the contract).

    Subclasses set :attr:`name`, validate their parameters in ``__init__`` (store them with
    :meth:`_keep`) and implement the abstract methods.
    """

    name: ClassVar[str] = "protocol"
    max_rounds: ClassVar[int] = 1
    """Upper bound on the number of rounds (the runner stops with an error beyond it)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def _keep(self, **params: Any) -> None:
        """Record the (JSON-able) parameters that define this protocol instance."""
        json.dumps(params)  # fail fast on anything that cannot travel
        self.params.update(params)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> SiteComputedProtocol:
        """Rebuild on a site from the spec's params (validated by ``__init__``)."""
        return cls(**dict(params))

    def init_state(self) -> State:
        """The state before round 1 (the same on every site)."""
        return {"round": 0}

    @abstractmethod
    def local(self, data: Any, state: State) -> dict[str, np.ndarray]:
        """This site's additive contribution for the next round."""

    @abstractmethod
    def layout(self, state: State) -> dict[str, dict[str, Any]]:
        """``{key: {"shape": tuple, "bound": float, "frac_bits": int}}`` for every key :meth:`local`
        returns: identical on every site (it depends on params and state only)."""

    @abstractmethod
    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        """Update the state with the consortium totals of this round; ``done`` when finished."""

    @abstractmethod
    def release(self, state: State, min_count: int) -> Released:
        """What the server may see, with disclosure control on pooled counts (``withheld`` lists why)."""

    def result(self, released: Released) -> Any:
        """Server side: turn the release into a result object (default: the release itself)."""
        return released

    def empty(self, state: State) -> dict[str, np.ndarray]:
        """A zero contribution with the layout's keys and shapes (a site excluded from a quantity)."""
        return {k: np.zeros(tuple(v["shape"])) for k, v in self.layout(state).items()}


_REGISTRY: dict[str, type[SiteComputedProtocol]] = {}
#: Modules that register protocols when imported (looked up lazily, so importing this module is cheap).
PROTOCOL_MODULES = ("shared.stats.sc_basic", "shared.stats.sc_registry", "shared.fusion")


def register(cls: type[SiteComputedProtocol]) -> type[SiteComputedProtocol]:
    """Class decorator: make a protocol available to sites by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two protocols are named {cls.name!r}: {_REGISTRY[cls.name]} and {cls}")
    _REGISTRY[cls.name] = cls
    return cls


def protocol_class(name: str) -> type[SiteComputedProtocol]:
    """The registered protocol called ``name`` (a site answers no other)."""
    if name not in _REGISTRY:
        import importlib

        for mod in PROTOCOL_MODULES:
            try:
                m = importlib.import_module(mod)
            except ModuleNotFoundError as exc:
                if exc.name != mod:
                    raise
                continue
            for cls in getattr(m, "SITE_PROTOCOLS", {}).values():
                _REGISTRY.setdefault(cls.name, cls)
            for obj in vars(m).values():  # protocols a module defines or re-exports
                if isinstance(obj, type) and issubclass(obj, SiteComputedProtocol) and obj.name != "protocol" \
                        and not getattr(obj, "__abstractmethods__", None):
                    _REGISTRY.setdefault(obj.name, obj)
    if name not in _REGISTRY:
        raise KeyError(f"unknown statistics protocol {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def zeros_like(contrib: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zeros with the keys and shapes of a contribution."""
    return {k: np.zeros_like(np.asarray(v, dtype=np.float64)) for k, v in contrib.items()}


def check_contribution(proto: SiteComputedProtocol, state: State, contrib: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError unless ``contrib`` matches the layout (keys, shapes, bounds) with finite values."""
    layout = proto.layout(state)
    if set(layout) != set(contrib):
        raise ValueError(f"{proto.name}: contribution keys {sorted(contrib)} differ from the layout {sorted(layout)}")
    for k, v in contrib.items():
        a = np.asarray(v, dtype=np.float64)
        if a.shape != tuple(layout[k]["shape"]):
            raise ValueError(f"{proto.name}: contribution {k!r} has shape {a.shape}, layout says "
                             f"{tuple(layout[k]['shape'])}")
        if not np.isfinite(a).all():
            raise ValueError(f"{proto.name}: contribution {k!r} has non-finite values")
        if a.size and float(np.abs(a).max()) > float(layout[k]["bound"]):
            raise ValueError(f"{proto.name}: contribution {k!r} exceeds its declared bound {layout[k]['bound']:g}")


def sum_contributions(parts: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Element-wise sum of contributions with equal keys (what secure aggregation yields)."""
    if not parts:
        raise ValueError("no contributions to sum")
    keys = set(parts[0])
    for p in parts[1:]:
        if set(p) != keys:
            raise ValueError("contributions with different keys cannot be summed")
    return {k: np.sum([np.asarray(p[k], dtype=np.float64) for p in parts], axis=0) for k in parts[0]}


@dataclass
class PlainRun:
    """Outcome of :func:`run_plain`."""

    released: Released
    result: Any
    rounds: int
    state: State


def run_plain(protocol: SiteComputedProtocol, sites_data: Mapping[str, Any], min_count: int = 5,
              excluded: Mapping[str, bool] | None = None) -> PlainRun:
    """Run a protocol with all sites in this process, summing contributions in the clear.

    This is exactly what every site computes after secure aggregation (which only hides the
    contributions); the tests of each protocol's mathematics use it.

    Parameters
    ----------
    protocol : SiteComputedProtocol
    sites_data : mapping site -> data
        What :meth:`SiteComputedProtocol.local` takes for each site.
    min_count : int
        The disclosure floor ``k`` applied by :meth:`SiteComputedProtocol.release`.
    excluded : mapping site -> bool, optional
        Sites that contribute zeros (e.g. excluded by their own per-site floor).
    """
    if not sites_data:
        raise ValueError("no sites")
    excluded = excluded or {}
    state = protocol.init_state()
    for r in range(1, protocol.max_rounds + 1):
        parts = []
        for site, data in sites_data.items():
            c = protocol.local(data, state)
            check_contribution(protocol, state, c)
            parts.append(zeros_like(c) if excluded.get(site) else c)
        state, done = protocol.advance(state, sum_contributions(parts))
        if done:
            released = protocol.release(state, min_count)
            return PlainRun(released, protocol.result(released), r, state)
    raise RuntimeError(f"protocol {protocol.name!r} did not finish in {protocol.max_rounds} rounds")


def merge_cells(counts: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Merge adjacent grid cells until every merged cell's count, in every class, is 0 or >= ``k``.

    Parameters
    ----------
    counts : ndarray of shape (n_cells, n_classes)
        Pooled counts per fixed grid cell and class (sites only: never released as such).
    k : int

    Returns
    -------
    list of (start, stop)
        Half-open cell ranges on the fixed grid; edges are grid edges, never data values. Greedy
        left to right; a remainder at the end joins the last cell, merging leftwards until that
        cell holds the rule. Only when the whole grid's total breaks it (a class total in (0, k))
        does the single remaining cell break it too: callers withhold then.
    """
    c = np.asarray(counts, dtype=np.int64)
    if c.ndim == 1:
        c = c[:, None]
    out: list[tuple[int, int]] = []
    start, acc = 0, np.zeros(c.shape[1], dtype=np.int64)
    for i in range(c.shape[0]):
        acc = acc + c[i]
        if ((acc == 0) | (acc >= k)).all() and acc.sum() > 0:
            out.append((start, i + 1))
            start, acc = i + 1, np.zeros(c.shape[1], dtype=np.int64)
    if start < c.shape[0]:
        if out:
            out[-1] = (out[-1][0], c.shape[0])  # the remainder joins the last cell
        else:
            out.append((start, c.shape[0]))

    def ok(a: int, b: int) -> bool:
        tot = c[a:b].sum(axis=0)
        return bool(((tot == 0) | (tot >= k)).all())

    # a remainder joined to a cell that held 0 of a class can break the rule: merge leftwards until it holds
    while len(out) > 1 and not ok(*out[-1]):
        out[-2:] = [(out[-2][0], out[-1][1])]
    return out
