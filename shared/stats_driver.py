"""The server's side of site-computed statistics: relay, sum masked vectors, collect releases.

The server chooses which questions to ask (a registered protocol, its parameters, a cohort, columns
and the sites that answer together) and nothing else: the sites check every question against their
own policy (:mod:`client.stats_service`), derive every intermediate quantity themselves, and the
server only ever sees securely aggregated (masked) vectors and the final, disclosure-checked
releases. This module drives many queries at once over any transport (Flower messages on either
engine, or in-process sites). Queries that share a participant set share one *kept*
secure-aggregation session (:meth:`shared.secagg.SiteSecAgg.mask_next`): its keys are set up once,
then each protocol round costs one message per site:

``open``    the questions; single-site queries are answered at once; the group's session advertised
``step 1``  the sites share their group seeds (sealed to each peer)
``step 2``  the sites open the seeds and mask round 1's contributions
``step t``  the sites unmask round t-2's totals and advance (or release), then mask round t-1's
            contributions in the same session (fresh masks per round); a site closes the session
            once every query in it is done

A site that does not answer during a query's protocol ends that attempt (nothing is unmaskable
without it); the query is run again once without that site, and the result says so. A query
refused by a site's policy carries the rule and reason (the pipeline records ``policy_refused``).
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.secagg import SecAggDropout, aggregate, route_envelopes
from shared.stats.sitecomputed import SiteComputedProtocol

logger = logging.getLogger(__name__)

Transport = Callable[[dict[str, dict[str, Any]]], dict[str, dict[str, Any]]]
"""``{site: request}`` -> ``{site: reply}``; a site missing from the result did not answer."""


@dataclass
class SiteQuery:
    """One question to a set of sites, and what came back."""

    qid: str
    protocol: SiteComputedProtocol
    cohort: str
    columns: list[str]
    participants: list[str]
    released: dict[str, Any] | None = None
    result: Any = None
    error: str | None = None
    refused: dict[str, dict[str, str]] = field(default_factory=dict)
    """``{site: {"rule": ..., "reason": ...}}`` for sites whose policy refused the query."""
    dropped: list[str] = field(default_factory=list)
    """Sites that refused, could not answer, or stopped answering (the query was re-run without them)."""
    failures: dict[str, str] = field(default_factory=dict)
    """Why each dropped site is missing."""
    rounds: int = 0

    def spec(self) -> dict[str, Any]:
        return {"qid": self.qid, "protocol": self.protocol.name, "params": self.protocol.params,
                "cohort": self.cohort, "columns": list(self.columns), "participants": sorted(self.participants)}

    @property
    def ok(self) -> bool:
        return self.released is not None and self.error is None


def _close(a: Any, b: Any, rtol: float = 1e-9) -> bool:
    """Releases from different sites agree (floats to ``rtol``)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_close(a[k], b[k], rtol) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        fa, fb = float(a), float(b)
        if math.isnan(fa) and math.isnan(fb):
            return True
        return math.isclose(fa, fb, rel_tol=rtol, abs_tol=1e-12)
    return a == b


class _Group:
    """Queries that share one participant set, and their kept secure-aggregation session."""

    def __init__(self, gid: str, participants: tuple[str, ...]) -> None:
        self.gid = gid
        self.participants = participants
        self.queries: list[SiteQuery] = []
        self.adverts: dict[str, Any] = {}  # site -> advert
        self.shared = False  # share request sent
        self.inbox: dict[str, dict[str, np.ndarray]] | None = None  # receiver -> {sender: envelope}
        self.masked_rounds = 0
        self.total: dict[str, np.ndarray] | None = None  # the sum to send back next
        self.dead = False

    def sid(self, run: str) -> str:
        return f"{run}.{self.gid}.s1"

    def active(self) -> list[SiteQuery]:
        return [q for q in self.queries if q.released is None and q.error is None]


def run_site_queries(queries: list[SiteQuery], transport: Transport, *, run: str, k: int,
                     roles: Mapping[str, str] | None = None, max_steps: int = 400, retry: bool = True,
                     batch: str | None = None) -> list[SiteQuery]:
    """Drive ``queries`` to completion over ``transport`` (see the module docstring).

    Parameters
    ----------
    queries : list of SiteQuery
    transport : callable
    run : str
        The run id the sites check their data stamps against.
    k : int
        The disclosure floor asked for (at least every participant's own floor, or they refuse).
    roles : mapping site -> "train" | "external", optional
        What the server believes each site is (a site's own policy may overrule it).
    """
    roles = dict(roles or {})
    batch = batch or f"b{uuid.uuid4().hex[:10]}"  # session ids are never reused
    seen = set()
    for q in queries:
        if q.qid in seen:
            raise ValueError(f"duplicate query id {q.qid!r}")
        seen.add(q.qid)
    groups: dict[tuple[str, ...], _Group] = {}
    for q in queries:
        parts = tuple(sorted(q.participants))
        if len(parts) > 1:
            g = groups.setdefault(parts, _Group(f"{batch}g{len(groups)}", parts))
            g.queries.append(q)
    sites = sorted({s for q in queries for s in q.participants})
    by_qid = {q.qid: q for q in queries}
    releases: dict[str, dict[str, Any]] = {q.qid: {} for q in queries}

    def take_releases(site: str, reply: Mapping[str, Any]) -> None:
        for qid, rel in (reply.get("released") or {}).items():
            if qid in by_qid:
                releases[qid][site] = rel
        for qid, why in (reply.get("failed") or {}).items():
            q = by_qid.get(qid)
            if q is not None and q.error is None and q.released is None:
                q.error = f"site {site}: {why}"

    def settle() -> None:
        for qid, got in releases.items():
            q = by_qid[qid]
            if q.released is not None or q.error is not None or set(got) != set(q.participants):
                continue
            first = got[q.participants[0]]
            odd = [s for s, r in got.items() if not _close(r, first)]
            if odd:
                q.error = f"sites disagree on the release (e.g. {odd[0]} vs {q.participants[0]}); not used"
                continue
            q.released = first
            try:
                q.result = q.protocol.result(first)
            except (ValueError, KeyError) as exc:
                q.error = f"release could not be read: {exc}"

    # ---- open
    requests = {}
    for s in sites:
        qs = [q.spec() for q in queries if s in q.participants]
        adv = {g.sid(run): list(g.participants) for g in groups.values() if s in g.participants}
        requests[s] = {"op": "open", "k": int(k), "role": roles.get(s), "queries": qs, "advertise": adv}
    replies = transport(requests)
    for s in sites:
        rep = replies.get(s)
        if rep is None:
            for q in queries:
                if s in q.participants:
                    q.error = q.error or f"site {s} did not answer"
                    q.dropped.append(s)  # asked again without it
            for g in groups.values():
                if s in g.participants:
                    g.dead = True
            continue
        for qid, why in (rep.get("refused") or {}).items():
            q = by_qid.get(qid)
            if q is not None:
                q.refused[s] = dict(why)
                q.error = q.error or f"refused by {s}: {why.get('reason', why)}"
                q.dropped.append(s)  # asked again without it (its own policy applies to the others too)
        for qid, why in (rep.get("failed") or {}).items():
            q = by_qid.get(qid)
            if q is not None and q.released is None:
                q.error = q.error or f"site {s}: {why}"
                q.dropped.append(s)
        take_releases(s, {"released": rep.get("released") or {}})
        for sid, advert in (rep.get("adverts") or {}).items():
            for g in groups.values():
                if sid == g.sid(run):
                    g.adverts[s] = advert
    settle()

    # ---- steps: share once, then one mask (and, from the second, one unmask) per protocol round
    for _t in range(1, max_steps + 1):
        live = [g for g in groups.values() if not g.dead and (g.active() or g.total is not None)]
        if not live:
            break
        requests = {s: {"op": "step", "totals": {}, "envelopes": {}, "plan": {}, "share": {}} for s in sites}
        masking: list[_Group] = []
        sharing: list[_Group] = []
        for g in live:
            sid, active = g.sid(run), g.active()
            if g.total is not None:
                for s in g.participants:
                    requests[s]["totals"][sid] = g.total
                g.total = None
            if not active:
                continue
            if g.inbox is not None:
                masking.append(g)
                for s in g.participants:
                    requests[s]["plan"][sid] = [q.qid for q in active]
                    if g.masked_rounds == 0:
                        requests[s]["envelopes"][sid] = g.inbox.get(s, {})
            elif not g.shared and set(g.adverts) == set(g.participants):
                sharing.append(g)
                g.shared = True
                for s in g.participants:
                    requests[s]["share"][sid] = g.adverts
            elif not g.shared:
                g.dead = True  # an advert never came: nothing can be masked in this session
                for q in active:
                    q.error = "not every site advertised the secure-aggregation session"
                    q.dropped = [s for s in g.participants if s not in g.adverts]
        needed = {s for s, r in requests.items() if any(r[f] for f in ("totals", "plan", "share"))}
        if not needed:
            continue
        replies = transport({s: requests[s] for s in needed})
        for s in needed:
            if s in replies:
                take_releases(s, replies[s])
        missing = sorted(needed - set(replies))
        for g in live:
            lost = [s for s in g.participants if s in missing]
            if lost:
                g.dead = True
                for q in g.active():
                    q.error = f"site(s) {', '.join(lost)} stopped answering during the protocol"
                    q.dropped = lost
                continue
            sid = g.sid(run)
            if g in masking:  # the sum of this step's masked inputs -> next step's totals
                masked = {s: replies[s].get("masked", {}).get(sid) for s in g.participants}
                have = {s: v for s, v in masked.items() if v is not None}
                if have:  # (none: every query of the group finished this step)
                    try:
                        g.total = aggregate(have, list(g.participants), session_id=sid)
                        g.masked_rounds += 1
                    except SecAggDropout as exc:
                        g.dead = True
                        for q in g.active():
                            q.error = f"site(s) {', '.join(exc.missing)} sent no masked input"
                            q.dropped = list(exc.missing)
                    except ValueError as exc:
                        g.dead = True
                        for q in g.active():
                            q.error = f"masked inputs do not fit together: {exc}"
                    for q in g.active():
                        q.rounds += 1
            if g in sharing and not g.dead:
                shares = {s: replies[s].get("envelopes", {}).get(sid) for s in g.participants}
                try:
                    g.inbox = route_envelopes({s: v for s, v in shares.items() if v is not None},
                                              list(g.participants), session_id=sid)
                except (SecAggDropout, ValueError) as exc:
                    g.dead = True
                    for q in g.active():
                        q.error = f"the secure-aggregation key exchange failed: {exc}"
                        q.dropped = list(getattr(exc, "missing", []))
        settle()
    for q in queries:
        if q.released is None and q.error is None:
            q.error = f"did not finish within {max_steps} steps"
    if retry:
        again = []
        for q in queries:
            left = [s for s in q.participants if s not in q.dropped]
            if q.dropped and q.released is None and left:
                again.append(SiteQuery(q.qid, q.protocol, q.cohort, q.columns, left))
                q.failures = {s: (q.refused[s].get("reason", "") if s in q.refused else q.error or "") for s in q.dropped}
        if again:
            logger.warning("re-running %d quer(ies) without the site(s) that dropped out", len(again))
            run_site_queries(again, transport, run=run, k=k, roles=roles, max_steps=max_steps, retry=False,
                             batch=f"{batch}r")
            for new in again:
                old = by_qid[new.qid]
                old.released, old.result, old.error, old.refused = new.released, new.result, new.error, {
                    **old.refused, **new.refused}
                old.rounds += new.rounds
    return queries


def releases_json(queries: list[SiteQuery]) -> str:
    """All releases as one JSON document (what the run directory keeps of the statistics)."""
    return json.dumps({q.qid: {"spec": q.spec(), "released": q.released, "error": q.error, "refused": q.refused,
                               "dropped": q.dropped} for q in queries}, sort_keys=True, default=str)
