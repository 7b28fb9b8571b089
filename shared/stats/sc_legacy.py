"""[Interim: the survival, ICC, correlation and k-means protocols still use this first version of the interface; they move to shared.stats.sitecomputed with the pipeline integration] Site-computed protocols: every parameter is derived on site from consortium totals.

Shape of a run
--------------
Each round, every site computes an *additive contribution* (counts, sums, sums of squares,
gradients, information matrices) at its current ``state``; secure aggregation gives every site the
consortium **total** of those contributions (the server relays masked vectors and sees neither a
site's numbers nor the totals); every site then runs the same deterministic :meth:`advance` on
the totals, so all sites hold the same next state. The server cannot choose parameters such as
Cox coefficients or k-means centroids: it has no message in which to send them. Only
:meth:`release` output leaves to the server, after disclosure control on *pooled* counts (every
released count covers 0 or >= ``min_count`` patients; what is withheld is listed with a reason).

What a protocol implements (:class:`SiteComputedProtocol`)::

    init_state() -> dict                                   # JSON-able; depends only on the params
    local(data, state) -> dict[str, ndarray]               # this site's additive contribution
    advance(state, totals) -> (new_state, done)            # same on every site
    release(state, totals, min_count) -> dict              # what the server may see

:func:`run_site_computed` is the plain-Python loop (sums the contributions, as secure aggregation
would); :class:`SiteParticipant` is the site side of one run, what a ClientApp holds between
rounds. Nothing here imports Flower.

Fixed params (time grid, score grid, the ks to try, feature names) come from the consortium's
config on every site, never from a server message; :meth:`SiteComputedProtocol.fingerprint` lets
a site check that the protocol it is asked to run is the one its own config describes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ._checks import check_min_count

logger = logging.getLogger(__name__)

Contribution = dict[str, np.ndarray]
State = dict[str, Any]

#: Safety stop for :func:`run_site_computed` (protocols have their own, smaller, iteration caps).
MAX_ROUNDS = 10_000


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays (also nested in dicts/lists) to plain Python for JSON.

    Non-finite floats become ``None`` so that the result is strict JSON.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.bool_ | bool):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating | float):
        f = float(obj)
        return f if np.isfinite(f) else None
    return obj


def withheld(quantity: str, reason: str) -> dict[str, str]:
    """One disclosure-control record: what was withheld and why (never the small count itself)."""
    return {"quantity": quantity, "reason": reason}


def small_count(count: float | np.ndarray, min_count: int) -> bool:
    """True when any count is disclosive: ``0 < count < min_count`` (zero describes nobody)."""
    c = np.asarray(count, dtype=float)
    return bool(((c > 0) & (c < min_count)).any())


def as_count(x: float | np.ndarray, name: str) -> np.ndarray:
    """Round float totals that must be counts; raise if they are not (near-)integral and >= 0.

    A tampered or corrupted total is caught here instead of silently steering the next state.
    """
    arr = np.asarray(x, dtype=float)
    r = np.rint(arr)
    if not np.all(np.isfinite(arr)) or np.any(np.abs(arr - r) > 1e-6) or np.any(r < 0):
        raise ValueError(f"total {name!r} is not a non-negative integer count; the aggregate is corrupt")
    return r.astype(np.int64)


def check_consistent(ok: bool, what: str) -> None:
    """Plausibility check on totals: raise when an invariant of honest totals fails.

    Secure aggregation hides the totals from the server but does not by itself stop it from
    adding an offset to the aggregate; these checks (counts add up to the patients of round 1,
    information matrices are positive semi-definite, ...) catch offsets that break an invariant.
    Integrity against every offset needs verifiable aggregation (a secure-aggregation matter).
    """
    if not ok:
        raise ValueError(f"totals are inconsistent ({what}); the aggregate was corrupted or tampered with")


class SiteComputedProtocol(ABC):
    """Base class of a site-computed federated protocol; see the module docstring.

    Subclasses set ``name`` and store their fixed params as attributes in ``__init__``, and
    return them from :meth:`params` (JSON-able).
    """

    name: ClassVar[str] = "site_computed"

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The fixed params (from config), JSON-able; everything else is derived from totals."""

    @abstractmethod
    def init_state(self) -> State:
        """First state: JSON-able and a function of :meth:`params` only."""

    @abstractmethod
    def local(self, data: Any, state: State) -> Contribution:
        """This site's additive contribution at ``state`` (float64 arrays, fixed keys and shapes)."""

    @abstractmethod
    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        """Next state from the consortium totals of this round; run identically on every site."""

    @abstractmethod
    def release(self, state: State, totals: Mapping[str, np.ndarray], min_count: int) -> dict[str, Any]:
        """The numbers the server may see, disclosure control applied to pooled counts."""

    def fingerprint(self) -> str:
        """SHA-256 of the protocol name and its params: equal on every site that runs the same thing."""
        blob = json.dumps({"name": self.name, "params": to_jsonable(self.params())}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def check_contribution(contrib: Any, who: str) -> Contribution:
    """Validate a contribution: a dict of finite numeric arrays, returned as float64 copies."""
    if not isinstance(contrib, dict):
        raise TypeError(f"{who} returned {type(contrib).__name__}, expected dict[str, ndarray]")
    out: Contribution = {}
    for k, v in contrib.items():
        if not isinstance(k, str):
            raise TypeError(f"{who}: key {k!r} is not a str")
        arr = np.asarray(v)
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"{who}: contribution {k!r} has dtype {arr.dtype}, expected numbers")
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{who}: contribution {k!r} contains NaN or infinite values")
        out[k] = arr
    return out


def _state_copy(state: State) -> State:
    """A JSON round-trip copy: proves the state is JSON-able and shares nothing with the caller."""
    try:
        return json.loads(json.dumps(state, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"protocol state is not JSON-able: {exc}") from exc


class SiteParticipant:
    """The site side of one protocol run: holds this site's data and the state between rounds.

    The only thing it accepts from outside after construction is :meth:`receive_totals` (the
    output of secure aggregation). It refuses totals whose keys or shapes differ from its own
    contribution's, so a server cannot slip parameters (``beta``, ``centroids``...) into a round.

    Parameters
    ----------
    protocol : SiteComputedProtocol
        Built on the site from its own config.
    data : Any
        This site's data in the form ``protocol.local`` takes.
    min_count : int
        The site's own disclosure threshold.
    site : str, optional
        Used in error messages.
    expected_fingerprint : str, optional
        When given, the protocol's :meth:`~SiteComputedProtocol.fingerprint` must equal it (the
        site's config says which protocol, with which params, it agreed to run).
    """

    def __init__(self, protocol: SiteComputedProtocol, data: Any, min_count: int, *, site: str | None = None,
                 expected_fingerprint: str | None = None) -> None:
        self.site = site or "site"
        if expected_fingerprint is not None and protocol.fingerprint() != expected_fingerprint:
            raise ValueError(f"site {self.site!r}: protocol {protocol.name!r} has params that differ from the "
                             "site's config (fingerprint mismatch); refusing to take part")
        self.protocol = protocol
        self._data = data
        self.min_count = check_min_count(min_count)
        self.state: State = _state_copy(protocol.init_state())
        self.done = False
        self.rounds = 0
        self._last: Contribution | None = None
        self._totals: dict[str, np.ndarray] | None = None

    def contribution(self) -> Contribution:
        """This round's additive contribution, computed at the site's own state."""
        if self.done:
            raise RuntimeError(f"site {self.site!r}: protocol {self.protocol.name!r} is finished")
        try:
            out = self.protocol.local(self._data, _state_copy(self.state))
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"site {self.site!r}: {exc}") from exc
        self._last = check_contribution(out, f"site {self.site!r}")
        return {k: v.copy() for k, v in self._last.items()}

    def receive_totals(self, totals: Mapping[str, Any]) -> bool:
        """Take the consortium totals of this round, advance the state; return ``done``."""
        if self._last is None:
            raise RuntimeError(f"site {self.site!r}: totals received before this site contributed")
        extra = sorted(set(totals) - set(self._last))
        missing = sorted(set(self._last) - set(totals))
        if extra or missing:
            raise ValueError(f"site {self.site!r}: totals do not match this round's contribution "
                             f"(unexpected keys {extra}, missing keys {missing}); refusing them")
        clean: dict[str, np.ndarray] = {}
        for k, mine in self._last.items():
            arr = np.asarray(totals[k], dtype=np.float64)
            if arr.shape != mine.shape:
                raise ValueError(f"site {self.site!r}: total {k!r} has shape {arr.shape}, "
                                 f"this site's contribution has {mine.shape}; refusing it")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"site {self.site!r}: total {k!r} is not finite; refusing it")
            clean[k] = arr
        state, done = self.protocol.advance(_state_copy(self.state), clean)
        self.state = _state_copy(state)
        self.done = bool(done)
        self._totals = clean
        self._last = None
        self.rounds += 1
        return self.done

    def release(self, min_count: int | None = None) -> dict[str, Any]:
        """What this site agrees to send to the server (after the last round)."""
        if not self.done or self._totals is None:
            raise RuntimeError(f"site {self.site!r}: release requested before the protocol finished")
        k = self.min_count if min_count is None else max(self.min_count, check_min_count(min_count))
        return to_jsonable(self.protocol.release(_state_copy(self.state), self._totals, k))


@dataclass(frozen=True)
class SiteComputedResult:
    """Outcome of :func:`run_site_computed`.

    Attributes
    ----------
    released : dict
        What the server receives (JSON-able), including ``"withheld"`` records.
    state : dict
        The final state every site holds (never sent to the server; e.g. the centroids a site
        uses to label its own patients).
    n_rounds : int
        Rounds of secure aggregation.
    bytes_sent : dict[str, int]
        Bytes of contributions each site sent (before masking), all rounds together.
    min_count : int
        The threshold applied to the release (the strictest site's).
    """

    released: dict[str, Any]
    state: dict[str, Any]
    n_rounds: int
    bytes_sent: dict[str, int] = field(default_factory=dict)
    min_count: int = 1


def run_site_computed(protocol: SiteComputedProtocol, sites_data: Mapping[str, Any],
                      min_count: int | Mapping[str, int], *, check_consensus: bool = True,
                      max_rounds: int = MAX_ROUNDS) -> SiteComputedResult:
    """Run a site-computed protocol with all sites in this process.

    Each round every site's :class:`SiteParticipant` contributes, the contributions are summed (what
    secure aggregation delivers), and every site advances on the totals itself.

    Parameters
    ----------
    protocol : SiteComputedProtocol
    sites_data : mapping of str to Any
        ``{site_name: data}``.
    min_count : int or mapping of str to int
        Disclosure threshold, one for all or each site's own. A release must satisfy every site,
        so the strictest (largest) threshold is applied.
    check_consensus : bool
        Assert that all sites derived the identical state each round (determinism check).
    max_rounds : int

    Returns
    -------
    SiteComputedResult
    """
    if not sites_data:
        raise ValueError("no sites")
    own = ({s: check_min_count(min_count) for s in sites_data} if isinstance(min_count, int | np.integer)
           else {s: check_min_count(min_count[s]) for s in sites_data})
    k = max(own.values())
    parts = {s: SiteParticipant(protocol, d, own[s], site=s) for s, d in sites_data.items()}
    sent = dict.fromkeys(parts, 0)
    for n_round in range(1, max_rounds + 1):
        contribs = {s: p.contribution() for s, p in parts.items()}
        first = next(iter(contribs.values()))
        totals: dict[str, np.ndarray] = {key: np.zeros_like(v) for key, v in first.items()}
        for s, c in contribs.items():
            if set(c) != set(first) or any(c[key].shape != first[key].shape for key in first):
                raise ValueError(f"site {s!r} contributed keys/shapes that differ from the other sites'")
            for key, v in c.items():
                totals[key] = totals[key] + v
            sent[s] += int(sum(v.nbytes for v in c.values()))
        dones = {s: p.receive_totals(totals) for s, p in parts.items()}
        if check_consensus:
            states = {s: json.dumps(p.state, sort_keys=True) for s, p in parts.items()}
            if len(set(states.values())) != 1 or len(set(dones.values())) != 1:
                raise RuntimeError(f"protocol {protocol.name!r}: sites derived different states in round "
                                   f"{n_round}; advance() is not deterministic")
        if all(dones.values()):
            any_part = next(iter(parts.values()))
            released = any_part.release(k)
            logger.debug("protocol %s finished after %d rounds", protocol.name, n_round)
            return SiteComputedResult(released, copy.deepcopy(any_part.state), n_round, sent, k)
    raise RuntimeError(f"protocol {protocol.name!r} did not finish in {max_rounds} rounds")
