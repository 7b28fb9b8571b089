"""The federated protocol interface: what travels, who computes what, and a plain-Python runner.

Messages
--------
Everything that travels, in either direction, is a ``Summary``: a flat
``dict[str, np.ndarray | int | float]``. Arrays go into a Flower ``ArrayRecord`` and scalars
into a ``MetricRecord`` (:func:`split_summary` / :func:`join_summary`); no other type is used, so
no Flower import is needed here. Keys are dotted names (``"s0.pos.count"``).

A protocol
----------
A protocol is a subclass of :class:`FederatedProtocol`:

* ``start() -> params``: the first server message (always has ``"round"`` and ``"min_count"``).
* ``site_step(data, params, *, site, min_count) -> summary`` (a ``staticmethod``): runs on a site
  with its local arrays and the server's params; pure, keeps no state between rounds. It applies
  disclosure control itself with ``max(min_count, params["min_count"])``, so a server cannot
  lower a site's threshold, and reports what it withheld under ``"supp.<quantity>"`` keys
  (integer reason codes, :data:`REASONS`).
* ``server_step(summaries) -> params | Final``: runs on the server with ``{site: summary}``;
  returns the next round's params, or :class:`Final` with the result.

A Flower ServerApp creates the protocol object, sends ``start()``, and loops: send params to all
sites, collect their summaries, call ``server_step``. A ClientApp calls ``site_step`` of the
protocol class named in the message (see :data:`shared.stats.PROTOCOLS`). :func:`run_protocol`
is that loop in plain Python, used by the ``federated_*`` helpers and the tests.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from ._checks import DEFAULT_MIN_COUNT, check_min_count
from .results import Federated, Suppression

logger = logging.getLogger(__name__)

T = TypeVar("T")
Summary = dict[str, np.ndarray | int | float]
Params = Summary

#: Reason codes a site puts under ``"supp.<quantity>"``.
EXCLUDED_CLASS = 1
MERGED = 2
EXCLUDED_CELL = 3
WITHHELD_BIN = 4
EXCLUDED_GROUP = 5
WITHHELD_TERMS = 6
REASONS: dict[int, str] = {
    EXCLUDED_CLASS: "site excluded from this quantity: an outcome class has 0 < n < min_count={k} patients",
    MERGED: "histogram coarsened: cells with 0 < count < min_count={k} merged with neighbouring cells",
    EXCLUDED_CELL: "site excluded from this quantity: a table cell has 0 < count < min_count={k}",
    WITHHELD_BIN: "bin withheld: 0 < patients, cases or non-cases < min_count={k} in it",
    EXCLUDED_GROUP: "site excluded from this quantity: a group has 0 < n < min_count={k} patients",
    WITHHELD_TERMS: "site's terms withheld in a round: 0 < patients on or over the margin < min_count={k}",
}
SUPP = "supp."
MAX_ROUNDS = 1000


@dataclass(frozen=True)
class Final(Generic[T]):
    """What ``server_step`` returns when the computation is finished."""

    result: T
    bound: dict[str, Any] = field(default_factory=dict)


def site_min_count(params: Params, min_count: int) -> int:
    """The threshold a site applies: its own, or the server's if that is stricter."""
    return max(check_min_count(min_count), int(params.get("min_count", 1)))


class FederatedProtocol(ABC):
    """Base class; see the module docstring for the contract.

    Parameters
    ----------
    min_count : int
        Disclosure threshold the server asks for (sites may apply a larger one).
    """

    name: ClassVar[str] = "protocol"

    def __init__(self, *, min_count: int = DEFAULT_MIN_COUNT) -> None:
        self.min_count = check_min_count(min_count)
        self.suppressed: list[Suppression] = []
        self.round = 0

    @abstractmethod
    def start(self) -> Params:
        """First message to the sites."""

    @staticmethod
    @abstractmethod
    def site_step(data: Any, params: Params, *, site: str | None = None,
                  min_count: int = DEFAULT_MIN_COUNT) -> Summary:
        """One round on one site."""

    @abstractmethod
    def server_step(self, summaries: Mapping[str, Summary]) -> Params | Final:
        """One round on the server."""

    def log_suppressions(self, summaries: Mapping[str, Summary], prefix: str = "") -> None:
        """Turn the sites' ``supp.*`` codes into :class:`Suppression` records (once per key)."""
        seen = {(s.site, s.quantity) for s in self.suppressed}
        for site, summ in summaries.items():
            k = int(summ.get("min_count", self.min_count))
            for key, code in summ.items():
                if key.startswith(SUPP):
                    q = prefix + key[len(SUPP):]
                    if (site, q) not in seen:
                        self.suppressed.append(Suppression(site, q, REASONS[int(code)].format(k=k)))
                        seen.add((site, q))
                        logger.debug("disclosure control at %s: %s", site, q)


def split_summary(summary: Summary) -> tuple[dict[str, np.ndarray], dict[str, int | float]]:
    """``(arrays, scalars)``: the contents of a Flower ``ArrayRecord`` and ``MetricRecord``."""
    arrays = {k: v for k, v in summary.items() if isinstance(v, np.ndarray)}
    return arrays, {k: v for k, v in summary.items() if not isinstance(v, np.ndarray)}


def join_summary(arrays: Mapping[str, np.ndarray], scalars: Mapping[str, int | float]) -> Summary:
    """Inverse of :func:`split_summary`."""
    out: Summary = {k: np.asarray(v) for k, v in arrays.items()}
    out.update(scalars)
    return out


def check_summary(summary: Summary, who: str) -> None:
    """Raise TypeError unless ``summary`` is a flat dict of numeric arrays / ints / floats."""
    if not isinstance(summary, dict):
        raise TypeError(f"{who} returned {type(summary).__name__}, expected dict")
    for k, v in summary.items():
        if not isinstance(k, str):
            raise TypeError(f"{who}: key {k!r} is not a str")
        if isinstance(v, np.ndarray):
            if v.dtype.kind not in "iuf":
                raise TypeError(f"{who}: array {k!r} has dtype {v.dtype}")
        elif isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"{who}: value {k!r} is {type(v).__name__}, expected ndarray, int or float")


def payload_bytes(summary: Summary) -> int:
    """Bytes of a summary: array ``nbytes`` plus 8 per scalar."""
    return sum(v.nbytes if isinstance(v, np.ndarray) else 8 for v in summary.values())


def site_names(sites: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """``{"site0": data0, ...}`` for a sequence; a mapping is kept as is."""
    if isinstance(sites, Mapping):
        return dict(sites)
    return {f"site{i}": d for i, d in enumerate(sites)}


def run_protocol(
    protocol: FederatedProtocol,
    sites: Sequence[Any] | Mapping[str, Any],
    site_min_count: int | Mapping[str, int] | None = None,
) -> Federated:
    """Run a protocol with all sites in this process, exactly as the messages would flow.

    Parameters
    ----------
    protocol : FederatedProtocol
        A fresh server-side protocol object.
    sites : sequence or mapping of site data
        Whatever the protocol's ``site_step`` takes (e.g. ``(y, score)`` tuples).
    site_min_count : int or mapping, optional
        Each site's own disclosure threshold (default: the protocol's).

    Returns
    -------
    Federated
    """
    named = site_names(sites)
    if not named:
        raise ValueError("no sites")
    own: dict[str, int] = {
        s: (protocol.min_count if site_min_count is None else
            site_min_count if isinstance(site_min_count, int) else site_min_count.get(s, protocol.min_count))
        for s in named
    }
    step = type(protocol).site_step
    params = protocol.start()
    sent = dict.fromkeys(named, 0)
    for n_rounds in range(1, MAX_ROUNDS + 1):
        check_summary(params, "server")
        summaries: dict[str, Summary] = {}
        for s, data in named.items():
            out = step(data, params, site=s, min_count=own[s])
            check_summary(out, f"site {s!r}")
            sent[s] += payload_bytes(out)
            summaries[s] = out
        res = protocol.server_step(summaries)
        if isinstance(res, Final):
            return Federated(res.result, tuple(protocol.suppressed), res.bound, n_rounds, sent)
        params = res
    raise RuntimeError(f"protocol {protocol.name!r} did not finish in {MAX_ROUNDS} rounds")
