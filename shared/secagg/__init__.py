"""Secure aggregation: the server sums the sites' arrays without seeing any site's numbers, nor the total.

Plain Python (numpy + ``cryptography``), no Flower import: every message is a flat dict of numpy
arrays (uint8/uint64) and text, which maps onto Flower records (arrays -> ``ArrayRecord``, text ->
``ConfigRecord``). Threat model and guarantees: ``docs/secure_aggregation.md``.

Protocol (Bonawitz et al. 2017 pairwise masking, without dropout recovery, plus a group mask and
an integrity tag), for a session id and a participant list chosen by the caller:

1. **advertise** (site): fresh X25519 key pair; the advert is signed with the site's P-384 identity
   key over (session, site, ephemeral key, sorted participants, query id). The ephemeral secret is
   kept in the site's state folder.
2. **share** (site): every participant's advert is checked against the site's *own* roster
   (unknown site, wrong key, other session, other participant list -> refused, naming the site);
   pairwise keys X25519 + HKDF-SHA256; a fresh 32-byte group seed ``g_i`` is sealed to each peer
   (ChaCha20-Poly1305, key from the pairwise secret, associated data = session, sender, receiver).
3. **mask** (site): opens the peers' seeds; group key ``K = HKDF(g_1..g_n)`` (never known to the
   server). Encodes its arrays in the 64-bit ring, computes the tag (linear MACs with coefficients
   from ``K``, :mod:`shared.secagg.primitives`), adds pairwise masks ``+m_ij`` for ``j > i`` and
   ``-m_ij`` for ``j < i`` (AES-256-CTR streams keyed per pair, array and layout), and the first
   participant adds the group mask ``R = PRG(K)``. The server sums (:func:`aggregate`): pairwise
   masks cancel, so it holds ``Y = sum x + R``, uniformly random to it.
4. **unmask** (site): subtracts ``R``, checks every element is within the declared bounds and the
   tag matches (else :class:`SecAggIntegrityError`), decodes.

**Kept sessions** (``mask(..., keep=True)``): a multi-round computation (Newton steps, a CV path)
runs rounds 3-4 again in the same session, ``mask_next`` after each ``unmask``, instead of setting
up a session per round. The pairwise keys and ``K`` stay on site (mode-0600 state) until ``close``
or the TTL counted from the last round; every round's masks, group mask and MAC key are bound to
the round number, a round is masked at most once and only after the previous one was unmasked.

Why four rounds, not three: the tag must be computed with a key all sites share and the server does
not know, *before* the site's masked input is sent. Ephemeral keys only give pairwise secrets once
every advert is known, so the seeds travel in their own round (as Bonawitz's ShareKeys round).

Message shapes (per site; ``n_k`` = number of elements of array ``k``, ``P`` = participants)::

    server -> site  advertise: session_id (text), participants (text "a,b,c"), query_id (text)
    site -> server  advert:    site, session, query, participants (text); epk uint8[32]; sig uint8[~103]
    server -> site  share:     session_id; the adverts of all P   (flatten(): "site/field" keys)
    site -> server  envelopes: {receiver: uint8[60]} for each peer (12 nonce + 32 seed + 16 tag)
    server -> site  mask:      session_id; {sender: uint8[60]} addressed to it; the site's own data
                               and spec come from the site's side, never from the server
    site -> server  masked:    {k: uint64[n_k]} for every array, "__tag__": uint64[4]
    server -> site  unmask:    session_id; the sum, same shapes as "masked"
    (the site keeps the decoded totals)

State kept by a site between rounds: :mod:`shared.secagg.state`.

Typical use (in one process: :func:`run_secure_sum`)::

    site = SiteSecAgg("site_a", "certs/sites/site_a/site.key", roster, "state/secagg")
    advert = site.advertise("run7/tableone/r1/a1", ["site_a", "site_b", "site_c"],
                            query_id="run7/tableone/r1")
    envelopes = site.share("run7/tableone/r1/a1", adverts)                   # adverts of all three
    masked = site.mask("run7/tableone/r1/a1", inbox, {"n": counts, "s": sums},
                       {"n": ArraySpec(bound=1e5), "s": ArraySpec(bound=1e4, frac_bits=24)})
    totals = site.unmask("run7/tableone/r1/a1", Y)                            # Y = aggregate(...)
"""

from .encoding import ArraySpec, as_specs, check_capacity, decode, decode_sum, encode
from .errors import SecAggDropout, SecAggError, SecAggIntegrityError, SecAggRefused
from .primitives import load_identity_key, load_public_key, load_roster
from .server import aggregate, collect, flatten, message_bytes, route_envelopes, unflatten
from .simulate import SecureSumResult, make_identities, run_secure_sum
from .site import TAG_KEY, SiteSecAgg

__all__ = [
    "TAG_KEY",
    "ArraySpec",
    "SecAggDropout",
    "SecAggError",
    "SecAggIntegrityError",
    "SecAggRefused",
    "SecureSumResult",
    "SiteSecAgg",
    "aggregate",
    "as_specs",
    "check_capacity",
    "collect",
    "decode",
    "decode_sum",
    "encode",
    "flatten",
    "load_identity_key",
    "load_public_key",
    "load_roster",
    "make_identities",
    "message_bytes",
    "route_envelopes",
    "run_secure_sum",
    "unflatten",
]
