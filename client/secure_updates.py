"""The site's side of securely aggregated model updates (``federation.secure_aggregation: true``).

The server sets up one kept secure-aggregation session per training stage (``train.secagg``
messages: ``advertise``, then ``share``); every training round the site masks its weighted update
(:mod:`shared.secure_updates`) in that session with ``reveal_total=True``: the server can read the
weighted sum over the participants, never one site's weights.

The rule that makes a claimed dropout useless: **one participant set per global model.** If a
server could have the sites train from the same global weights once with site ``d`` and once
without, the difference of the two revealed sums would be ``d``'s update (training from the same
weights with the same seed is deterministic). So the site records, for every global model it
masked an update of (the SHA-256 of the weights it was sent), the participant list, and refuses
(rule ``secure_updates``) to mask an update of the same weights with another list, across runs
(a re-run from the same seed starts from the same weights). A round re-sent to the same
participants (a resumed run) is allowed: the difference of two sums over the same sites is a sum
over at least ``min_sites`` sites. Records are kept 30 days, like the secure-aggregation ledger.

A site whose policy says ``secure_updates: true`` refuses to send a plain (unmasked) update.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client.stats_service import PolicyRefusal
from shared.secure_updates import update_spec, weighted_update

LEDGER_TTL_S = 30 * 86400.0


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def check_participants(cache_dir: Path, digest: str, participants: list[str], *, site: str,
                       clock: Any = time.time) -> None:
    """Record ``participants`` for the global weights ``digest``; refuse another list for the same weights."""
    path = Path(cache_dir) / "secagg" / "updates.json"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = float(clock())
    book = {k: v for k, v in _read(path).items() if now - float(v.get("at", 0)) <= LEDGER_TTL_S}
    parts = sorted(participants)
    had = book.get(digest)
    if had is not None and had["participants"] != parts:
        raise PolicyRefusal(
            "secure_updates",
            f"site {site} already sent a masked update of these global weights (sha256 {digest[:12]}...) to the "
            f"participants {','.join(had['participants'])}; sending one to {','.join(parts)} would let the server "
            "difference the two sums. Resume with the same sites, or start a new run with another train.seed")
    if had is None:
        book[digest] = {"participants": parts, "at": now}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(book, fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def setup(sa: Any, request: Mapping[str, Any]) -> dict[str, Any]:
    """``train.secagg``: ``{"op": "advertise", "session", "participants"}`` or ``{"op": "share", "session", "adverts"}``."""
    op, sid = request.get("op"), str(request.get("session", ""))
    if not sid.startswith(str(request.get("run", ""))) or ".train." not in sid:
        raise ValueError(f"session id {sid!r} is not a training session of this run")
    if op == "advertise":
        return {"advert": sa.advertise(sid, [str(p) for p in request["participants"]], query_id=sid)}
    if op == "share":
        return {"envelopes": sa.share(sid, request["adverts"])}
    raise PolicyRefusal("vocabulary", f"unknown secure-aggregation operation {op!r}")


def mask_update(sa: Any, cache_dir: Path, *, site: str, session: str, envelopes: Mapping[str, Any] | None,
                arrays: Mapping[str, np.ndarray], n: int, weights_digest: str) -> dict[str, np.ndarray]:
    """Mask this round's weighted update in the stage's kept session (the first round opens the seeds)."""
    state = sa.store.load(session)
    if state is None:
        raise ValueError(f"site {site}: no secure-aggregation session {session!r} here (expired or never set "
                         "up); the server must set up a new one")
    check_participants(cache_dir, weights_digest, list(state["participants"]), site=site)
    contribution = weighted_update(arrays, n, site=site)
    spec = update_spec(list(arrays))
    if envelopes is not None:
        return sa.mask(session, envelopes, contribution, spec, reveal_total=True, keep=True)
    return sa.mask_next(session, contribution, spec, reveal_total=True)
