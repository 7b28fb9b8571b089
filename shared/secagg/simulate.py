"""In-process driver: all sites and the server in one Python process, messages passed as they would flow.

For tests, benchmarks and simulations. Identity keys are made in memory unless given.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from .encoding import ArraySpec
from .server import aggregate, collect, message_bytes, route_envelopes
from .site import SiteSecAgg

logger = logging.getLogger(__name__)

ROUNDS = ("advertise", "share", "mask", "unmask")


def make_identities(names: list[str] | tuple[str, ...]) -> tuple[dict[str, ec.EllipticCurvePrivateKey],
                                                                  dict[str, ec.EllipticCurvePublicKey]]:
    """Fresh in-memory EC P-384 identity keys and the matching roster ``{name: public key}``."""
    keys = {n: ec.generate_private_key(ec.SECP384R1()) for n in names}
    return keys, {n: k.public_key() for n, k in keys.items()}


@dataclass
class SecureSumResult:
    """What :func:`run_secure_sum` returns.

    Attributes
    ----------
    totals : dict
        ``{site: {array key: summed array}}``: what each site unmasked (identical when honest).
    server_sum : dict
        The sum the server saw and relayed (``{array key: uint64}``, incl. ``"__tag__"``).
    masked : dict
        ``{site: masked reply}``: what the server received from each site.
    seconds : dict
        ``{round: {site: seconds}}`` plus ``{"aggregate": {"server": seconds}}``.
    bytes_up, bytes_down : dict
        ``{round: {site: payload bytes}}`` sent by / to each site.
    """

    totals: dict[str, dict[str, np.ndarray]]
    server_sum: dict[str, np.ndarray]
    masked: dict[str, dict[str, np.ndarray]]
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes_up: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes_down: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def total(self) -> dict[str, np.ndarray]:
        """The consortium total (the first site's view; every honest site gets the same)."""
        return next(iter(self.totals.values()))


def run_secure_sum(sites_data: Mapping[str, Mapping[str, Any]],
                   spec: Mapping[str, ArraySpec | Mapping[str, float | int]], *,
                   session_id: str | None = None, query_id: str | None = None,
                   state_root: str | Path | None = None,
                   identities: Mapping[str, ec.EllipticCurvePrivateKey] | None = None,
                   sites: Mapping[str, SiteSecAgg] | None = None,
                   min_sites: int = 3, reveal_total: bool = False) -> SecureSumResult:
    """Run the four rounds for ``{site: {array key: array}}`` with an honest in-process server.

    Parameters
    ----------
    sites_data : mapping
        Each participant's contribution (same keys and shapes everywhere).
    spec : mapping
        ``{array key: ArraySpec}`` shared by all sites.
    session_id, query_id : str, optional
        Default: a fresh random session id; query id = session id.
    state_root : path, optional
        Parent of the sites' state folders (``<state_root>/<site>``); default a temporary folder.
    identities : mapping, optional
        ``{site: P-384 private key}`` (default: made in memory); the roster is their public keys.
    sites : mapping, optional
        Ready :class:`SiteSecAgg` endpoints (reused across sessions); overrides the two above.
    min_sites : int
    reveal_total : bool

    Returns
    -------
    SecureSumResult

    Raises
    ------
    SecAggDropout, SecAggRefused, SecAggIntegrityError
        As the rounds do.
    """
    participants = sorted(sites_data)
    session_id = session_id or f"sim-{uuid.uuid4().hex}"
    with tempfile.TemporaryDirectory(prefix="secagg-") as tmp:
        if sites is None:
            root = Path(state_root) if state_root is not None else Path(tmp)
            if identities is None:
                identities, roster = make_identities(participants)
            else:
                roster = {n: k.public_key() for n, k in identities.items()}
            sites = {p: SiteSecAgg(p, identities[p], roster, root / p, min_sites=min_sites) for p in participants}
        seconds: dict[str, dict[str, float]] = {r: {} for r in ROUNDS}
        up: dict[str, dict[str, int]] = {r: {} for r in ROUNDS}
        down: dict[str, dict[str, int]] = {r: {} for r in ROUNDS}

        def call(round_name: str, site: str, fn: Any, *args: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            out = fn(*args, **kw)
            seconds[round_name][site] = time.perf_counter() - t
            up[round_name][site] = 0 if round_name == "unmask" else message_bytes(out)  # totals stay on site
            return out

        request = {"session_id": session_id, "participants": ",".join(participants),
                   "query_id": query_id or session_id}
        adverts = {}
        for p in participants:
            down["advertise"][p] = message_bytes(request)
            adverts[p] = call("advertise", p, sites[p].advertise, session_id, participants, query_id=query_id)
        adverts = collect(adverts, participants, "advert", session_id=session_id)
        shares = {}
        for p in participants:
            down["share"][p] = message_bytes(adverts)
            shares[p] = call("share", p, sites[p].share, session_id, adverts)
        inbox = route_envelopes(shares, participants, session_id=session_id)
        masked = {}
        for p in participants:
            down["mask"][p] = message_bytes(inbox[p])
            masked[p] = call("mask", p, sites[p].mask, session_id, inbox[p], sites_data[p], spec,
                             reveal_total=reveal_total)
        t = time.perf_counter()
        total = aggregate(masked, participants, session_id=session_id)
        seconds["aggregate"] = {"server": time.perf_counter() - t}
        totals = {}
        for p in participants:
            down["unmask"][p] = message_bytes(total)
            totals[p] = call("unmask", p, sites[p].unmask, session_id, total)
    return SecureSumResult(totals=totals, server_sum=total, masked=masked, seconds=seconds, bytes_up=up,
                           bytes_down=down)
