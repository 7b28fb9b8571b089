"""The server side: relay and sum. It holds no secret and checks only what it needs to go on.

The server is not trusted by the sites; these functions are what an honest server does, and what
the tests' malicious server starts from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import SecAggDropout

logger = logging.getLogger(__name__)


def collect(messages_by_site: Mapping[str, Any], participants: Sequence[str], round_name: str, *,
            session_id: str | None = None) -> dict[str, Any]:
    """The participants' messages of one round, in participant order.

    Raises
    ------
    SecAggDropout
        Listing the participants whose message is missing.
    ValueError
        If a message comes from a site that is not a participant.
    """
    extra = sorted(set(messages_by_site) - set(participants))
    if extra:
        raise ValueError(f"{round_name} message(s) from {', '.join(extra)}, not participants of this session")
    missing = [p for p in participants if p not in messages_by_site]
    if missing:
        raise SecAggDropout(missing, round_name, session_id)
    return {p: messages_by_site[p] for p in participants}


def route_envelopes(shares_by_sender: Mapping[str, Mapping[str, np.ndarray]], participants: Sequence[str], *,
                    session_id: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Turn ``{sender: {receiver: envelope}}`` (round-2 replies) into ``{receiver: {sender: envelope}}``.

    Raises
    ------
    SecAggDropout
        If a participant's share reply is missing.
    """
    shares = collect(shares_by_sender, participants, "share", session_id=session_id)
    out: dict[str, dict[str, np.ndarray]] = {p: {} for p in participants}
    for sender, envs in shares.items():
        for receiver, box in envs.items():
            if receiver not in out:
                raise ValueError(f"site {sender} sealed an envelope to {receiver!r}, not a participant")
            out[receiver][sender] = box
    return out


def aggregate(masked_by_site: Mapping[str, Mapping[str, np.ndarray]], participants: Sequence[str], *,
              session_id: str | None = None) -> dict[str, np.ndarray]:
    """Round 3 on the server: the element-wise sum modulo ``2**64`` of every participant's masked reply.

    Parameters
    ----------
    masked_by_site : mapping
        ``{site: {array key: uint64[n]}}``: the sites' :meth:`SiteSecAgg.mask` replies.
    participants : sequence of str
        Every participant of the session.

    Returns
    -------
    dict
        ``{array key: uint64[n]}``, sent unchanged to every participant for :meth:`SiteSecAgg.unmask`.

    Raises
    ------
    SecAggDropout
        Listing the participants whose masked input is missing: without it the pairwise masks do not
        cancel and nothing can be unmasked, so the caller re-runs the query in a fresh session
        without them.
    ValueError
        If the replies disagree on array keys, shapes or dtype (naming the site).
    """
    masked = collect(masked_by_site, participants, "masked input", session_id=session_id)
    first = participants[0]
    ref = {k: np.asarray(v).shape for k, v in masked[first].items()}
    total: dict[str, np.ndarray] = {}
    for site, reply in masked.items():
        shapes = {k: np.asarray(v).shape for k, v in reply.items()}
        if shapes != ref:
            raise ValueError(f"masked input of site {site} has arrays {shapes}, site {first} has {ref}")
        for k, v in reply.items():
            arr = np.asarray(v)
            if arr.dtype != np.uint64:
                raise ValueError(f"masked input of site {site}: array {k!r} is {arr.dtype}, need uint64")
            if k in total:
                np.add(total[k], arr, out=total[k])  # wraps modulo 2**64
            else:
                total[k] = arr.copy()
    logger.info("secagg: summed %d masked inputs%s", len(masked), f" of session {session_id!r}" if session_id else "")
    return total


def flatten(nested: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{site: {field: value}}`` -> ``{"site/field": value}`` (one Flower record per bundle)."""
    return {f"{site}/{field}": value for site, msg in nested.items() for field, value in msg.items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Inverse of :func:`flatten` (site names contain no '/')."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        site, sep, field = key.partition("/")
        if not sep:
            raise ValueError(f"key {key!r} is not of the form 'site/field'")
        out.setdefault(site, {})[field] = value
    return out


def message_bytes(msg: Mapping[str, Any]) -> int:
    """Payload size of a flat message: array bytes, UTF-8 text, 8 bytes per number (keys not counted)."""
    n = 0
    for v in msg.values():
        if isinstance(v, np.ndarray):
            n += v.nbytes
        elif isinstance(v, str):
            n += len(v.encode())
        elif isinstance(v, bytes | bytearray):
            n += len(v)
        elif isinstance(v, Mapping):
            n += message_bytes(v)
        else:
            n += 8
    return n
