"""The site (hospital) side of the protocol: :class:`SiteSecAgg`.

Four rounds, each one message from the server and one reply; see :mod:`shared.secagg` for the
protocol and the message shapes, ``docs/secure_aggregation.md`` for what it guarantees.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .encoding import ArraySpec, as_specs, check_capacity, check_key, decode, encode
from .errors import SecAggError, SecAggIntegrityError, SecAggRefused
from .primitives import (
    MAC_WORDS,
    PROTOCOL,
    TAG_LEN,
    TAG_LIMB_BOUNDS,
    advert_payload,
    check_site_name,
    digest,
    expand,
    hkdf,
    load_identity_key,
    load_roster,
    lp,
    mac,
    mac_coefficients,
    open_sealed,
    prg_u64,
    public_bytes,
    seal,
    sign,
    tag_from_limbs,
    tag_limbs,
    verify,
)
from .state import SessionStore

logger = logging.getLogger(__name__)

TAG_KEY = "__tag__"
SEED_BYTES = 32
DEFAULT_TTL_S = 3600.0
DEFAULT_LEDGER_TTL_S = 30 * 86400.0
ADVERT_FIELDS = ("site", "session", "query", "participants", "epk", "sig")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode())


def _as_bytes(x: object) -> bytes | None:
    """A byte string from ``bytes`` or a 1-D uint8 array (how bytes travel in an ArrayRecord)."""
    if isinstance(x, bytes | bytearray):
        return bytes(x)
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 1:
        return x.tobytes()
    return None


def _u8(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8).copy()


def _check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 256 or any(ord(c) < 32 for c in value):
        raise ValueError(f"{what} must be non-empty text (max 256 characters, no control characters), "
                         f"got {value!r}")
    return value


class SiteSecAgg:
    """One site's secure-aggregation endpoint.

    Parameters
    ----------
    site : str
        This site's name (as in the roster).
    identity_key : EllipticCurvePrivateKey or path or bytes
        Its long-term EC P-384 key (``certs/sites/<name>/site.key``, OpenSSH format).
    roster : mapping
        ``{site name: public key}`` from the site's own policy (objects, OpenSSH text or ``site.pub``
        paths), never from a server message. Only these sites can take part.
    state_dir : Path
        Site-owned folder for the state kept between rounds (created mode 0700).
    min_sites : int
        Fewest distinct participants (this site included) it takes part with; at least 2, default 3
        (with 2, each participant can subtract its own vector from the total and learns the other's).
    ttl_s : float
        A session older than this since its advert is refused (default one hour).
    ledger_ttl_s : float
        How long used session ids and unmasked query ids are remembered (default 30 days).
    clock : callable
        ``time.time`` or a test clock.

    Raises
    ------
    ValueError
        If the identity key is not P-384, ``site`` is not in the roster, or its roster key differs.
    """

    def __init__(self, site: str, identity_key: ec.EllipticCurvePrivateKey | bytes | str | os.PathLike[str],
                 roster: Mapping[str, Any], state_dir: str | os.PathLike[str], *, min_sites: int = 3,
                 ttl_s: float = DEFAULT_TTL_S, ledger_ttl_s: float = DEFAULT_LEDGER_TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.site = check_site_name(site, "site")
        self._key = load_identity_key(identity_key)
        self.roster = load_roster(roster)
        if site not in self.roster:
            raise ValueError(f"site {site!r} is not in its own roster; add its site.pub to the site policy")
        if public_bytes(self.roster[site]) != public_bytes(self._key.public_key()):
            raise ValueError(f"site {site!r}: its identity key does not match its own roster entry (wrong "
                             "site.key or site.pub)")
        if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 2:
            raise ValueError(f"min_sites must be an integer >= 2, got {min_sites!r}")
        if min_sites == 2:
            logger.info("site %s: min_sites=2 lets each of two participants learn the other's vector", site)
        self.min_sites = min_sites
        self.store = SessionStore(Path(state_dir), ttl_s=ttl_s, ledger_ttl_s=ledger_ttl_s, clock=clock)
        self.store.purge()

    # ------------------------------------------------------------------------- helpers
    def _refused(self, session_id: str, why: str) -> SecAggRefused:
        logger.warning("site %s refuses session %r: %s", self.site, session_id, why)
        return SecAggRefused(f"site {self.site}: session {session_id!r} refused: {why}")

    @contextlib.contextmanager
    def _fail_closed(self, session_id: str) -> Iterator[None]:
        """Any protocol error destroys the session's state: a session that went wrong is never resumed."""
        try:
            yield
        except SecAggError:
            self.store.delete(session_id)
            raise

    def _load(self, session_id: str, phase: str | tuple[str, ...], round_name: str) -> dict[str, Any]:
        session_id = _check_id(session_id, "session_id")
        state = self.store.load(session_id)
        if state is None:
            why = ("its state is gone (finished, refused earlier or expired)"
                   if self.store.claimed("session", session_id) else "this site never advertised it")
            raise self._refused(session_id, f"{round_name} request, but {why}")
        with self._fail_closed(session_id):
            if self.store.expired(state):
                raise self._refused(session_id, f"{round_name} request for a session older than the "
                                                f"TTL ({self.store.ttl_s:g} s); start a fresh session")
            phases = (phase,) if isinstance(phase, str) else phase
            if state["phase"] not in phases:
                extra = (" (masking twice would let the server difference two vectors under the same masks)"
                         if round_name == "mask" else "")
                want = " or ".join(repr(p) for p in phases)
                raise self._refused(session_id, f"{round_name} request out of order: the session is in "
                                                f"phase {state['phase']!r}, not {want}{extra}")
        return state

    def _check_participants(self, session_id: str, participants: Sequence[str] | str) -> list[str]:
        if isinstance(participants, str):
            participants = participants.split(",")
        parts = list(participants)
        for p in parts:
            try:
                check_site_name(p, "participants")
            except ValueError as exc:
                raise self._refused(session_id, str(exc)) from None
        dup = sorted({p for p in parts if parts.count(p) > 1})
        if dup:
            raise self._refused(session_id, f"participant(s) listed twice: {', '.join(dup)}")
        unknown = sorted(set(parts) - set(self.roster))
        if unknown:
            raise self._refused(session_id, f"participant(s) {', '.join(unknown)} not in this site's roster "
                                            "(a site the server made up?)")
        if self.site not in parts:
            raise self._refused(session_id, f"this site ({self.site}) is not in the participant list")
        if len(parts) < self.min_sites:
            raise self._refused(session_id, f"only {len(parts)} participant(s); this site takes part only with "
                                            f"at least min_sites={self.min_sites}")
        return sorted(parts)

    def _salt(self, st: dict[str, Any]) -> bytes:
        return digest(PROTOCOL, b"session", st["session"], st["query"], ",".join(st["participants"]))

    def _pair_key(self, st: dict[str, Any], esk: X25519PrivateKey, peer: str, peer_epk: bytes) -> bytes:
        """The pairwise key with ``peer``: X25519 + HKDF, bound to the session and both ephemeral keys."""
        try:
            shared = esk.exchange(X25519PublicKey.from_public_bytes(peer_epk))
        except ValueError:
            raise self._refused(st["session"], f"ephemeral key of site {peer} is invalid (low-order point)") \
                from None
        mine = esk.public_key().public_bytes_raw()
        (lo, lo_k), (hi, hi_k) = sorted([(self.site, mine), (peer, peer_epk)])
        return hkdf(shared, self._salt(st), lp(PROTOCOL, b"pair", lo, lo_k, hi, hi_k))

    def _group_mask(self, k_group: bytes, key: str, ctx: bytes, n: int) -> np.ndarray:
        return prg_u64(expand(k_group, lp(b"group-mask", key, ctx)), n)

    @staticmethod
    def _ctx(st: dict[str, Any], layout: list[list[Any]], reveal: bool) -> bytes:
        """Digest of everything the sites must agree on; every mask and MAC key is bound to it.

        From a kept session's second round on, the round number is bound too: each round's masks are
        fresh, so two rounds' masked vectors cannot be differenced.
        """
        parts = [PROTOCOL, b"layout", st["session"], st["query"], ",".join(st["participants"]),
                 json.dumps(layout, separators=(",", ":")), b"reveal" if reveal else b"hide"]
        r = int(st.get("round", 1))
        if r >= 2:
            parts.append(f"round={r}")
        return digest(*parts)

    @staticmethod
    def _query_name(st: dict[str, Any]) -> str:
        """The ledger name of what a round unmasks: the query, and for a kept session's later rounds ``#rN``."""
        r = int(st.get("round", 1))
        return st["query"] if r < 2 else f"{st['query']}#r{r}"

    # -------------------------------------------------------------------- round 1: advertise
    def advertise(self, session_id: str, participants: Sequence[str] | str, *,
                  query_id: str | None = None) -> dict[str, Any]:
        """Round 1: a fresh ephemeral X25519 key, signed with the site's identity key.

        Parameters
        ----------
        session_id : str
            Unique per protocol run (e.g. ``"<run id>/<query>/<round>/<attempt>"``).
        participants : sequence of str or comma-separated str
            The sites taking part; each must be in this site's roster, this site included.
        query_id : str, optional
            Names the data being summed (e.g. ``"<run id>/<query>/<round>"``); defaults to
            ``session_id``. A site unmasks at most one session per query id, so a re-run after a
            dropout (fresh session id, same query id) cannot give a site two subset totals to difference.

        Returns
        -------
        dict
            The advert: ``site``, ``session``, ``query``, ``participants`` (str), ``epk`` (uint8[32]),
            ``sig`` (uint8, DER ECDSA P-384/SHA-384).

        Raises
        ------
        SecAggRefused
            Unknown or duplicate participants, too few, a session id already used, a query already unmasked.
        """
        session_id = _check_id(session_id, "session_id")
        query_id = session_id if query_id is None else _check_id(query_id, "query_id")
        parts = self._check_participants(session_id, participants)
        if self.store.claimed("query", query_id):
            raise self._refused(session_id, f"query {query_id!r} was already unmasked in another session")
        if not self.store.claim("session", session_id):
            raise self._refused(session_id, "already advertised (a repeated or replayed request); "
                                            "use a fresh session id")
        esk = X25519PrivateKey.generate()
        epk = esk.public_key().public_bytes_raw()
        sig = sign(self._key, advert_payload(session_id, self.site, epk, parts, query_id))
        self.store.save(session_id, {"v": 1, "phase": "advertised", "site": self.site, "session": session_id,
                                     "query": query_id, "participants": parts, "created": self.store.clock(),
                                     "esk": _b64(esk.private_bytes_raw())})
        logger.info("site %s advertised session %r (%d participants)", self.site, session_id, len(parts))
        return {"site": self.site, "session": session_id, "query": query_id, "participants": ",".join(parts),
                "epk": _u8(epk), "sig": _u8(sig)}

    # ------------------------------------------------------------------------ round 2: share
    def _check_adverts(self, st: dict[str, Any], adverts: Mapping[str, Mapping[str, Any]]) -> dict[str, bytes]:
        sid, parts = st["session"], st["participants"]
        if not isinstance(adverts, Mapping):
            raise self._refused(sid, "adverts must be a mapping {site: advert}")
        missing = [p for p in parts if p not in adverts]
        if missing:
            raise self._refused(sid, f"no advert from {', '.join(missing)} (every participant's advert must "
                                     "be relayed)")
        extra = sorted(set(adverts) - set(parts))
        if extra:
            raise self._refused(sid, f"advert(s) from {', '.join(map(str, extra))}, not participants of this "
                                     "session (sybil?)")
        epks: dict[str, bytes] = {}
        for name in parts:
            adv = adverts[name]
            if not isinstance(adv, Mapping) or any(f not in adv for f in ADVERT_FIELDS):
                raise self._refused(sid, f"advert of site {name} lacks fields (need {', '.join(ADVERT_FIELDS)})")
            epk, sig = _as_bytes(adv["epk"]), _as_bytes(adv["sig"])
            if adv["site"] != name:
                raise self._refused(sid, f"advert relayed as site {name} says it is from {adv['site']!r}")
            if adv["session"] != sid:
                raise self._refused(sid, f"advert of site {name} is for session {adv['session']!r} "
                                         "(a replayed advert)")
            if adv["query"] != st["query"]:
                raise self._refused(sid, f"advert of site {name} is for query {adv['query']!r}, this site's "
                                         f"is {st['query']!r}")
            if adv["participants"] != ",".join(parts):
                raise self._refused(sid, f"site {name} was given other participants ({adv['participants']!r}) "
                                         f"than this site ({','.join(parts)!r})")
            if epk is None or len(epk) != 32 or sig is None:
                raise self._refused(sid, f"advert of site {name}: epk must be 32 bytes and sig bytes (uint8 arrays)")
            if not verify(self.roster[name], sig, advert_payload(sid, name, epk, parts, st["query"])):
                raise self._refused(sid, f"signature of site {name}'s advert does not verify against {name}'s "
                                         "key in this site's roster (forged, or a key the server made)")
            epks[name] = epk
        own = X25519PrivateKey.from_private_bytes(_unb64(st["esk"])).public_key().public_bytes_raw()
        if epks[self.site] != own:
            raise self._refused(sid, "this site's own advert was replaced by another one")
        if len(set(epks.values())) != len(epks):
            raise self._refused(sid, "two adverts carry the same ephemeral key")
        return epks

    def share(self, session_id: str, adverts: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Round 2: verify every advert against the site's roster, then seal a fresh group seed to each peer.

        Parameters
        ----------
        session_id : str
        adverts : mapping
            ``{site: advert}`` for every participant, as relayed by the server.

        Returns
        -------
        dict
            ``{receiver: uint8 envelope}`` (nonce || ChaCha20-Poly1305 ciphertext of the 32-byte seed).

        Raises
        ------
        SecAggRefused
            Naming the site and the reason: missing/extra/replayed/forged advert, participant-list
            mismatch, out of order, expired. The session's state is destroyed.
        """
        st = self._load(session_id, "advertised", "share")
        with self._fail_closed(session_id):
            epks = self._check_adverts(st, adverts)
            esk = X25519PrivateKey.from_private_bytes(_unb64(st["esk"]))
            seed = os.urandom(SEED_BYTES)
            out = {}
            for peer in st["participants"]:
                if peer == self.site:
                    continue
                key = expand(self._pair_key(st, esk, peer, epks[peer]), lp(b"envelope", self.site, peer))
                out[peer] = _u8(seal(key, seed, lp(PROTOCOL, st["session"], self.site, peer)))
            st.update(phase="shared", seed=_b64(seed), peers={p: _b64(k) for p, k in epks.items()})
            self.store.save(session_id, st)
        logger.info("site %s shared its group seed in session %r", self.site, session_id)
        return out

    # ------------------------------------------------------------------------- round 3: mask
    def _open_envelopes(self, st: dict[str, Any], pair_keys: dict[str, bytes],
                        envelopes: Mapping[str, Any]) -> dict[str, bytes]:
        sid, parts = st["session"], st["participants"]
        if not isinstance(envelopes, Mapping):
            raise self._refused(sid, "envelopes must be a mapping {sender: envelope}")
        peers = [p for p in parts if p != self.site]
        missing = [p for p in peers if p not in envelopes]
        if missing:
            raise self._refused(sid, f"no envelope from {', '.join(missing)} (dropped by the server?)")
        extra = sorted(set(envelopes) - set(peers))
        if extra:
            raise self._refused(sid, f"envelope(s) from {', '.join(map(str, extra))}, not a peer in this session")
        seeds = {self.site: _unb64(st["seed"])}
        for peer in peers:
            key = expand(pair_keys[peer], lp(b"envelope", peer, self.site))
            box = _as_bytes(envelopes[peer])
            seed = None if box is None else open_sealed(key, box, lp(PROTOCOL, sid, peer, self.site))
            if seed is None or len(seed) != SEED_BYTES:
                raise self._refused(sid, f"envelope from site {peer} does not open (altered, forged, from another "
                                         "session or addressed to another site)")
            seeds[peer] = seed
        return seeds

    def _layout(self, contribution: Mapping[str, Any], specs: dict[str, ArraySpec],
                n_sites: int) -> tuple[list[list[Any]], dict[str, np.ndarray]]:
        if not isinstance(contribution, Mapping) or not contribution:
            raise ValueError("contribution must be a non-empty mapping {array key: array}")
        for k in contribution:
            check_key(k)
        if set(contribution) != set(specs):
            raise ValueError(f"contribution keys {sorted(contribution)} differ from spec keys {sorted(specs)}; "
                             "every array needs a spec and vice versa")
        layout, enc = [], {}
        for k in sorted(specs):
            arr = np.asarray(contribution[k])
            enc[k] = encode(k, arr, specs[k], n_sites)
            layout.append([k, list(arr.shape), specs[k].frac_bits, specs[k].bound.hex()])
        return layout, enc

    def mask(self, session_id: str, envelopes: Mapping[str, Any], contribution: Mapping[str, Any],
             spec: Mapping[str, ArraySpec | Mapping[str, float | int]], *,
             reveal_total: bool = False, keep: bool = False) -> dict[str, np.ndarray]:
        """Round 3: open the peers' seeds, then return the masked, tagged contribution (once per round).

        Parameters
        ----------
        session_id : str
        envelopes : mapping
            ``{sender: uint8 envelope}`` addressed to this site, one from every other participant.
        contribution : mapping
            ``{array key: array}`` of this site's numbers (any shape; same keys and shapes at every site).
        spec : mapping
            ``{array key: ArraySpec or {"bound": .., "frac_bits": ..}}``; the same at every site
            (the masks are bound to it, so a mismatch makes every site's unmask fail).
        reveal_total : bool
            Leave the group mask off the data so the server's sum *is* the encoded total (for totals
            that may be published; the tag stays hidden). Must be the same at every site.
        keep : bool
            Keep the session for more rounds (:meth:`mask_next` after each :meth:`unmask`, then
            :meth:`close`): the pairwise keys and group key are kept on site instead of being set up
            again per round (see ``docs/secure_aggregation.md``, "kept sessions"). Must be the same at
            every site.

        Returns
        -------
        dict
            ``{array key: uint64[n_k], "__tag__": uint64[4]}``: encoding + pairwise masks (+ group mask).

        Raises
        ------
        ValueError
            Bad contribution or spec (naming the array); the session stays usable.
        SecAggRefused
            Missing or altered envelope (naming the sender), second mask, expiry; the state is destroyed.
        """
        st = self._load(session_id, "shared", "mask")
        parts = st["participants"]
        layout, enc = self._layout(contribution, as_specs(spec), len(parts))
        with self._fail_closed(session_id):
            esk = X25519PrivateKey.from_private_bytes(_unb64(st["esk"]))
            pair_keys = {p: self._pair_key(st, esk, p, _unb64(st["peers"][p])) for p in parts if p != self.site}
            seeds = self._open_envelopes(st, pair_keys, envelopes)
            k_group = hkdf(b"".join(lp(p, seeds[p]) for p in parts), self._salt(st), lp(PROTOCOL, b"group"))
            # the ephemeral secret and seeds are no longer needed: keep only what unmask (and later rounds) use
            new = {k: st[k] for k in ("v", "site", "session", "query", "participants", "created")}
            new.update(k_group=_b64(k_group), round=1, keep=bool(keep))
            if keep:
                new["pair_keys"] = {p: _b64(k) for p, k in pair_keys.items()}
            vectors = self._masked(new, pair_keys, k_group, layout, enc, bool(reveal_total))
        return vectors

    def mask_next(self, session_id: str, contribution: Mapping[str, Any],
                  spec: Mapping[str, ArraySpec | Mapping[str, float | int]], *,
                  reveal_total: bool = False) -> dict[str, np.ndarray]:
        """The next round of a kept session (``mask(..., keep=True)``): mask a new contribution.

        Allowed only once the previous round's sum was unmasked here (phase ``ready``), or, when the
        previous round was masked with ``reveal_total=True`` (a sum the server reads itself, e.g. a
        model update), right after it: the server never gets two masked vectors of one round. Every
        round's masks, group mask and MAC key are bound to the round number, so rounds cannot be
        differenced or mixed up.

        Parameters and returns as :meth:`mask` (without ``envelopes``).

        Raises
        ------
        ValueError
            Bad contribution or spec; the session stays usable.
        SecAggRefused
            Not a kept session, out of order (previous round not unmasked, or masked twice), expired.
        """
        st = self._load(session_id, ("ready", "masked"), "mask")
        parts = st["participants"]
        with self._fail_closed(session_id):
            if st["phase"] == "masked" and not st.get("reveal"):
                raise self._refused(session_id, "mask request out of order: the previous round's hidden total "
                                                "was not unmasked here yet (masking twice would let the server "
                                                "difference two vectors under the same masks)")
        layout, enc = self._layout(contribution, as_specs(spec), len(parts))
        with self._fail_closed(session_id):
            pair_keys = {p: _unb64(k) for p, k in st["pair_keys"].items()}
            st["round"] = int(st["round"]) + 1
            vectors = self._masked(st, pair_keys, _unb64(st["k_group"]), layout, enc, bool(reveal_total))
        return vectors

    def close(self, session_id: str) -> None:
        """Destroy a kept session's keys (after its last round). Closing an unknown session does nothing."""
        self.store.delete(_check_id(session_id, "session_id"))
        logger.info("site %s closed session %r", self.site, session_id)

    def _masked(self, st: dict[str, Any], pair_keys: Mapping[str, bytes], k_group: bytes, layout: list[list[Any]],
                enc: dict[str, np.ndarray], reveal: bool) -> dict[str, np.ndarray]:
        """Encode + pairwise masks (+ group mask) + tag for the round ``st`` describes; saves ``st`` masked."""
        parts = st["participants"]
        ctx = self._ctx(st, layout, reveal)
        values = np.concatenate([enc[k].view(np.int64) for k in sorted(enc)])
        coeffs = mac_coefficients(prg_u64(expand(k_group, lp(b"mac", ctx)), MAC_WORDS * values.size))
        vectors = {**enc, TAG_KEY: tag_limbs(mac(values, coeffs))}
        for peer in parts:
            if peer == self.site:
                continue
            for k, vec in vectors.items():
                m = prg_u64(expand(pair_keys[peer], lp(b"mask", k, ctx)), vec.size)
                if peer > self.site:
                    vec += m
                else:
                    vec -= m
        if self.site == parts[0]:  # one site adds the group mask R; only the sites can remove it
            for k, vec in vectors.items():
                if k == TAG_KEY or not reveal:
                    vec += self._group_mask(k_group, k, ctx, vec.size)
        st.update(phase="masked", layout=layout, reveal=reveal, active=self.store.clock())
        self.store.save(st["session"], st)
        logger.info("site %s masked %d array(s), %d values, in session %r (round %d)", self.site, len(enc),
                    values.size, st["session"], int(st.get("round", 1)))
        return vectors

    # ----------------------------------------------------------------------- round 4: unmask
    def unmask(self, session_id: str, total: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Round 4: remove the group mask from the server's sum, check range and tag, decode (once).

        Parameters
        ----------
        session_id : str
        total : mapping
            The server's sum ``{array key: uint64[n_k], "__tag__": uint64[4]}`` (:func:`aggregate`).

        Returns
        -------
        dict
            ``{array key: summed array}`` in the contribution's shapes (int64 for ``frac_bits=0``,
            float64 otherwise).

        Raises
        ------
        SecAggIntegrityError
            The sum does not verify (altered, forged, mixed up between keys or sessions).
        SecAggRefused
            Never masked, already unmasked, expired, or the query was unmasked in another session.
            The session's state is destroyed in every case, except that a kept session whose sum
            verified stays, ready for :meth:`mask_next`.
        """
        st = self._load(session_id, "masked", "unmask")
        kept = False
        try:
            out = self._unmask(st, total)
            if st.get("keep"):  # ready for the next round (mask_next) until closed or expired
                st.update(phase="ready", active=self.store.clock())
                for k in ("layout", "reveal"):
                    st.pop(k, None)
                self.store.save(session_id, st)
                kept = True
            return out
        finally:
            if not kept:
                self.store.delete(session_id)

    def _integrity(self, sid: str, why: str) -> SecAggIntegrityError:
        logger.warning("site %s: sum for session %r does not verify: %s", self.site, sid, why)
        return SecAggIntegrityError(f"site {self.site}: the sum received for session {sid!r} does not verify "
                                    f"({why}); the server altered or mixed it up - discard this session")

    def _unmask(self, st: dict[str, Any], total: Mapping[str, Any]) -> dict[str, np.ndarray]:
        sid, n = st["session"], len(st["participants"])
        layout, reveal = st["layout"], bool(st["reveal"])
        k_group = _unb64(st["k_group"])
        ctx = self._ctx(st, layout, reveal)
        sizes = {k: int(np.prod(shape, dtype=np.int64)) for k, shape, _, _ in layout}
        sizes[TAG_KEY] = TAG_LEN
        if not isinstance(total, Mapping) or set(total) != set(sizes):
            got = sorted(map(str, total)) if isinstance(total, Mapping) else type(total).__name__
            raise self._integrity(sid, f"it has arrays {got}, expected {sorted(sizes)}")
        plain: dict[str, np.ndarray] = {}
        for k, size in sizes.items():
            arr = total[k]
            if not isinstance(arr, np.ndarray) or arr.dtype != np.uint64 or arr.shape != (size,):
                raise self._integrity(sid, f"array {k!r} must be uint64 of shape ({size},)")
            vec = arr.copy()
            if k == TAG_KEY or not reveal:
                vec -= self._group_mask(k_group, k, ctx, size)
            plain[k] = vec
        specs = {k: ArraySpec(float.fromhex(b), f) for k, _, f, b in layout}
        for k, spec in specs.items():
            limit = check_capacity(k, spec, n)
            s = plain[k].view(np.int64)
            if np.any((s > limit) | (s < -limit)):
                raise self._integrity(sid, f"array {k!r} is outside the range the declared bounds allow")
        values = np.concatenate([plain[k].view(np.int64) for k in sorted(specs)])
        coeffs = mac_coefficients(prg_u64(expand(k_group, lp(b"mac", ctx)), MAC_WORDS * values.size))
        limbs = plain[TAG_KEY]  # honest limb sums are exact: anything out of range was altered
        if np.any(limbs >= np.array(TAG_LIMB_BOUNDS, dtype=np.uint64) * np.uint64(n)) \
                or mac(values, coeffs) != tag_from_limbs(limbs):
            raise self._integrity(sid, "integrity tag mismatch")
        name = self._query_name(st)
        if not self.store.claim("query", name):
            raise self._refused(sid, f"query {name!r} was already unmasked in another session; a site "
                                     "unmasks one session per query")
        logger.info("site %s unmasked session %r", self.site, sid)
        return {k: decode(k, plain[k], specs[k], tuple(shape)) for k, shape, _, _ in layout}
