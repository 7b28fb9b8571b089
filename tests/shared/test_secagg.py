"""Secure aggregation: exact sums, what the server can reconstruct, and a malicious server's attacks.

The tests play the server: they relay, drop, replay, alter and forge messages, and assert on what
can be reconstructed or on the sites' refusals (each naming the site/session).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scipy import stats

from shared.secagg import (
    TAG_KEY,
    ArraySpec,
    SecAggDropout,
    SecAggIntegrityError,
    SecAggRefused,
    SiteSecAgg,
    aggregate,
    decode_sum,
    encode,
    flatten,
    make_identities,
    route_envelopes,
    run_secure_sum,
    unflatten,
)
from shared.secagg.primitives import P31, P61, _mulmod_p61, advert_payload, mac, sign

NAMES = [f"s{i:02d}" for i in range(20)]
A, B, C, D = "s00", "s01", "s02", "s03"
SPEC = {"n": ArraySpec(bound=1000), "x": ArraySpec(bound=100.0, frac_bits=24)}


@pytest.fixture(scope="module")
def identities() -> tuple[dict[str, ec.EllipticCurvePrivateKey], dict[str, ec.EllipticCurvePublicKey]]:
    return make_identities(NAMES)


def make_sites(identities, root: Path, names, **kw) -> dict[str, SiteSecAgg]:
    keys, roster = identities
    return {n: SiteSecAgg(n, keys[n], roster, root / n, **kw) for n in names}


@pytest.fixture
def sites(identities, tmp_path) -> dict[str, SiteSecAgg]:
    return make_sites(identities, tmp_path, [A, B, C, D])


def data_for(names, seed: int = 0, length: int = 7) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {n: {"n": rng.integers(-1000, 1001, size=(length,)), "x": rng.uniform(-100, 100, size=(2, length))}
            for n in names}


def advertise(sites, sid, parts, **kw):
    return {p: sites[p].advertise(sid, parts, **kw) for p in parts}


def share(sites, sid, adverts):
    return route_envelopes({p: sites[p].share(sid, adverts) for p in adverts}, list(adverts))


def to_masked(sites, sid, data, spec=SPEC, **kw):
    """Run rounds 1-3 honestly; returns the masked replies."""
    parts = sorted(data)
    inbox = share(sites, sid, advertise(sites, sid, parts, **kw))
    return {p: sites[p].mask(sid, inbox[p], data[p], spec) for p in parts}


def plain_sum(data, key):
    return sum(np.asarray(d[key]) for d in data.values())


def session_files(site: SiteSecAgg) -> list[Path]:
    return list((site.store.root / "sessions").iterdir())


# ============================================================================ encoding

@given(st.integers(1, 40), st.integers(0, 2**32 - 1), st.integers(0, 40))
@settings(max_examples=40, deadline=None)
def test_encoding_round_trip_is_exact_for_integers_and_within_resolution_for_floats(n, seed, f):
    rng = np.random.default_rng(seed)
    ints = rng.integers(-(10**6), 10**6 + 1, size=n)
    ints[0] = -(10**6)  # the bound itself is allowed
    spec = ArraySpec(bound=10**6)
    out = decode_sum({"k": encode("k", ints, spec, 3)}, {"k": spec})["k"]
    assert out.dtype == np.int64 and np.array_equal(out, ints)
    x = rng.normal(0, 50, size=n)
    fspec = ArraySpec(bound=1e3, frac_bits=f)
    back = decode_sum({"k": encode("k", x, fspec, 3)}, {"k": fspec})["k"]
    assert np.all(np.abs(back - x) <= 2.0 ** -(f + 1) * (1 + 1e-9))


def test_overflow_guard_refuses_a_declaration_that_could_reach_2_to_63_naming_the_key():
    spec = ArraySpec(bound=2**60)
    encode("fits", np.array([2**60, -(2**60)]), spec, 7)  # 7 * 2**60 < 2**63
    with pytest.raises(ValueError, match=r"array 'big'.*over 8 sites.*2\*\*63"):
        encode("big", np.array([1, -1]), spec, 8)  # 8 * 2**60 == 2**63
    with pytest.raises(ValueError, match=r"array 'fsum'.*frac_bits=40"):
        encode("fsum", np.array([0.5]), ArraySpec(bound=2**20, frac_bits=40), 20)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_naming_the_key(bad):
    with pytest.raises(ValueError, match=r"array 'sum_age'.*NaN or infinite"):
        encode("sum_age", np.array([1.0, bad]), ArraySpec(bound=10.0, frac_bits=8), 3)


def test_values_above_the_declared_bound_are_refused_without_echoing_them():
    with pytest.raises(ValueError, match=r"array 'cea'.*1 value\(s\) exceed the declared bound") as ei:
        encode("cea", np.array([3.0, 1234.5678]), ArraySpec(bound=100.0, frac_bits=8), 3)
    assert "1234" not in str(ei.value)
    with pytest.raises(ValueError, match="array 'n'"):
        encode("n", np.array([2**40], dtype=np.uint64), ArraySpec(bound=10), 3)


@pytest.mark.parametrize("kw", [{"bound": 0}, {"bound": -1}, {"bound": float("nan")}, {"bound": 1, "frac_bits": 63},
                                {"bound": 1, "frac_bits": -1}])
def test_bad_specs_are_refused(kw):
    with pytest.raises(ValueError):
        ArraySpec(**kw)


# ========================================================================== the MAC

def test_mulmod_p61_matches_python_integers_including_edge_values():
    rng = np.random.default_rng(1)
    a = rng.integers(0, P61, size=5000, dtype=np.uint64)
    b = rng.integers(0, P61, size=5000, dtype=np.uint64)
    a[:3] = [P61 - 1, P61 - 1, 0]
    b[:3] = [P61 - 1, 1, P61 - 1]
    got = _mulmod_p61(a, b)
    assert [int(x) for x in got] == [int(x) * int(y) % P61 for x, y in zip(a, b, strict=True)]


def test_mac_is_linear_and_a_second_prime_catches_what_p61_alone_misses():
    rng = np.random.default_rng(2)
    coeffs = (rng.integers(0, P61, 50, dtype=np.uint64), rng.integers(0, P31, 50, dtype=np.uint64),
              rng.integers(0, P31, 50, dtype=np.uint64))
    v1, v2 = rng.integers(-(2**61), 2**61, 50), rng.integers(-(2**61), 2**61, 50)
    t1, t2, t12 = mac(v1, coeffs), mac(v2, coeffs), mac(v1 + v2, coeffs)
    assert t12 == ((t1[0] + t2[0]) % P61, (t1[1] + t2[1]) % P31, (t1[2] + t2[2]) % P31)
    shifted = v1.copy()
    shifted[7] += P61  # invisible modulo P61 ...
    m = mac(shifted, coeffs)
    assert m[0] == t1[0]
    assert m[1:] != t1[1:]  # ... but not modulo P31


# ==================================================================== exact sums

@given(st.integers(3, 20), st.integers(0, 60), st.integers(0, 2**32 - 1), st.booleans())
@example(20, 13, 1, False)
@example(3, 0, 2, True)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_unmasked_sum_equals_the_plain_sum(identities, n_sites, length, seed, reveal):
    rng = np.random.default_rng(seed)
    names = NAMES[:n_sites]
    data = {n: {"count": rng.integers(-500, 501, size=length),
                "x": rng.normal(0, 30, size=(length, 2)).clip(-99, 99)} for n in names}
    if length:
        data[names[0]]["count"][0] = -500  # the bounds themselves
        data[names[-1]]["x"][0, 0] = 99.0
    spec = {"count": ArraySpec(bound=500), "x": ArraySpec(bound=99.0, frac_bits=24)}
    with tempfile.TemporaryDirectory() as tmp:
        res = run_secure_sum(data, spec, state_root=tmp, identities=identities[0], reveal_total=reveal)
    for site, tot in res.totals.items():
        assert tot["count"].dtype == np.int64 and np.array_equal(tot["count"], plain_sum(data, "count")), site
        assert tot["x"].shape == (length, 2)
        assert np.all(np.abs(tot["x"] - plain_sum(data, "x")) <= n_sites * 2.0**-25 + 1e-9), site
    if reveal:  # the server can decode the revealed sum, and it is the same total
        seen = decode_sum(res.server_sum, spec, {"count": (length,), "x": (length, 2)})
        assert np.array_equal(seen["count"], res.total["count"])


def test_run_from_openssh_key_files_made_by_certs(tmp_path):
    from shared.certs import add_site, init_ca, site_public_keys
    init_ca(tmp_path / "certs")
    for n in (A, B, C):
        add_site(tmp_path / "certs", n)
    roster = site_public_keys(tmp_path / "certs")  # {name: site.pub path}, as a site policy would list
    sites = {n: SiteSecAgg(n, tmp_path / "certs" / "sites" / n / "site.key", roster, tmp_path / "state" / n)
             for n in (A, B, C)}
    data = data_for([A, B, C])
    sid = "run1/query/round1/attempt1"
    adverts = unflatten(flatten(advertise(sites, sid, [A, B, C])))  # as one flat Flower record
    inbox = share(sites, sid, adverts)
    masked = {p: sites[p].mask(sid, unflatten(flatten({p: inbox[p]}))[p], data[p], SPEC) for p in (A, B, C)}
    total = aggregate(masked, [A, B, C])
    for p in (A, B, C):
        assert np.array_equal(sites[p].unmask(sid, total)["n"], plain_sum(data, "n"))


def test_identity_key_must_match_the_roster(identities, tmp_path):
    keys, roster = identities
    with pytest.raises(ValueError, match=f"site '{A}'.*does not match"):
        SiteSecAgg(A, keys[B], roster, tmp_path)
    with pytest.raises(ValueError, match="not in its own roster"):
        SiteSecAgg("newcomer", keys[A], roster, tmp_path)
    with pytest.raises(ValueError, match="min_sites"):
        SiteSecAgg(A, keys[A], roster, tmp_path, min_sites=1)


# ================================================================ the server's view

def test_masked_reply_minus_the_data_is_the_same_mask_whatever_the_data(sites, tmp_path):
    """For fixed keys the mask does not depend on the data: the server learns nothing from one reply,
    and two replies under the same masks would give away the data's difference (why a second mask
    in one session is refused)."""
    parts = [A, B, C]
    sid = "same-mask"
    inbox = share(sites, sid, advertise(sites, sid, parts))
    snap = tmp_path / "snapshot"
    shutil.copytree(sites[B].store.root, snap)  # a clone of site B's state, as if it could mask twice
    x1 = {"n": np.arange(7) - 3, "x": np.full((2, 7), 42.5)}
    x2 = {"n": np.full(7, 999), "x": np.full((2, 7), -77.25)}
    y1 = sites[B].mask(sid, inbox[B], x1, SPEC)
    shutil.rmtree(sites[B].store.root)
    shutil.copytree(snap, sites[B].store.root)
    y2 = sites[B].mask(sid, inbox[B], x2, SPEC)
    for k in SPEC:
        e1, e2 = encode(k, x1[k], SPEC[k], 3), encode(k, x2[k], SPEC[k], 3)
        assert np.array_equal(y1[k] - e1, y2[k] - e2)  # the same mask stream
        assert np.array_equal(y1[k] - y2[k], e1 - e2)  # hence the refusal of a second mask
        assert not np.any(y1[k] == e1)  # masked everywhere (a 64-bit coincidence is ~1e-18)


def _uniform01(words: np.ndarray) -> np.ndarray:
    return (words >> np.uint64(11)).astype(np.float64) / 2.0**53


def _bit_freqs(words: np.ndarray) -> np.ndarray:
    return np.array([((words >> np.uint64(b)) & np.uint64(1)).mean() for b in range(64)])


def test_a_sites_masked_reply_is_distributed_independently_of_its_data(identities, tmp_path):
    """Many sessions, fixed-size vectors: site s01's masked replies for all-zero data and for data at
    the bound are indistinguishable (KS test and per-bit balance). s01 is not the site adding the
    group mask, so this is the pairwise masks' work alone."""
    sites = make_sites(identities, tmp_path, [A, B, C])
    n, sessions = 1500, 10
    spec = {"v": ArraySpec(bound=10**6)}
    replies = {"zero": [], "bound": []}
    for i in range(sessions):
        for label, fill in (("zero", 0), ("bound", 10**6)):
            data = {p: {"v": np.full(n, fill if p == B else 5)} for p in (A, B, C)}
            replies[label].append(to_masked(sites, f"stat-{label}-{i}", data, spec)[B]["v"])
    z, b = np.concatenate(replies["zero"]), np.concatenate(replies["bound"])
    assert stats.ks_2samp(_uniform01(z), _uniform01(b)).pvalue > 1e-4
    for words in (z, b):
        assert stats.kstest(_uniform01(words), "uniform").pvalue > 1e-4
        sd = np.sqrt(0.25 / words.size)
        assert np.all(np.abs(_bit_freqs(words) - 0.5) < 6 * sd)


def test_the_servers_sum_is_uniform_with_the_group_mask_and_is_the_total_without(identities, tmp_path):
    sites = make_sites(identities, tmp_path, [A, B, C])
    spec = {"v": ArraySpec(bound=10)}
    data = {p: {"v": np.zeros(2000, dtype=np.int64)} for p in (A, B, C)}  # the total is all zeros
    ys = []
    for i in range(6):
        masked = to_masked(sites, f"hidden-{i}", data, spec)
        ys.append(aggregate(masked, [A, B, C])["v"])
    y = np.concatenate(ys)
    assert stats.kstest(_uniform01(y), "uniform").pvalue > 1e-4
    assert np.all(np.abs(_bit_freqs(y) - 0.5) < 6 * np.sqrt(0.25 / y.size))
    inbox = share(sites, "revealed", advertise(sites, "revealed", [A, B, C]))
    masked = {p: sites[p].mask("revealed", inbox[p], data[p], spec, reveal_total=True) for p in (A, B, C)}
    total = aggregate(masked, [A, B, C])
    assert not np.any(total["v"])  # reveal_total: the server reads the (zero) total ...
    assert all(not np.any(masked[p]["v"] == 0) for p in (A, B, C))  # ... but still no site's vector
    assert np.array_equal(sites[A].unmask("revealed", total)["v"], np.zeros(2000))


# ======================================================================== attacks

def test_a_replayed_advert_of_an_earlier_session_is_refused(sites):
    old = advertise(sites, "session-1", [A, B, C])
    new = advertise(sites, "session-2", [A, B, C])
    with pytest.raises(SecAggRefused, match=r"site s00: session 'session-2'.*site s01 is for session 'session-1'"):
        sites[A].share("session-2", {**new, B: old[B]})
    with pytest.raises(SecAggRefused, match="state is gone"):  # fail closed: the session is dead
        sites[A].share("session-2", new)


def test_sybils_are_refused_unknown_names_and_roster_names_with_server_made_keys(sites):
    with pytest.raises(SecAggRefused, match=r"site s00: .*mallory not in this site's roster"):
        sites[A].advertise("sybil-1", [A, B, "mallory"])
    sid = "sybil-2"
    adverts = advertise(sites, sid, [A, B, C])
    server_key = ec.generate_private_key(ec.SECP384R1())
    epk = X25519PrivateKey.generate().public_key().public_bytes_raw()
    forged = dict(adverts[C], epk=np.frombuffer(epk, np.uint8).copy(),
                  sig=np.frombuffer(sign(server_key, advert_payload(sid, C, epk, [A, B, C], sid)), np.uint8).copy())
    with pytest.raises(SecAggRefused, match=r"signature of site s02's advert does not verify"):
        sites[A].share(sid, {**adverts, C: forged})
    extra = dict(forged, site="mallory")
    with pytest.raises(SecAggRefused, match=r"site s01: .*advert\(s\) from mallory, not participants"):
        sites[B].share(sid, {**adverts, "mallory": extra})


def test_fewer_than_min_sites_is_refused(sites):
    with pytest.raises(SecAggRefused, match=r"site s00: session 'two'.*only 2 participant.*min_sites=3"):
        sites[A].advertise("two", [A, B])
    sid = "subset"
    adverts = advertise(sites, sid, [A, B, C])
    del adverts[C]
    with pytest.raises(SecAggRefused, match="no advert from s02"):
        sites[A].share(sid, adverts)


def test_different_participant_lists_are_detected(sites):
    sid = "split-view"
    adverts = {A: sites[A].advertise(sid, [A, B, C]), B: sites[B].advertise(sid, [A, B, C, D]),
               C: sites[C].advertise(sid, [A, B, C])}
    with pytest.raises(SecAggRefused, match=r"site s01 was given other participants"):
        sites[A].share(sid, adverts)


def test_each_round_runs_once_per_session_and_in_order(sites):
    sid = "once"
    data = data_for([A, B, C])
    adverts = advertise(sites, sid, [A, B, C])
    with pytest.raises(SecAggRefused, match="already advertised"):
        sites[A].advertise(sid, [A, B, C])
    with pytest.raises(SecAggRefused, match=r"site s00: session 'never'.*never advertised"):
        sites[A].unmask("never", {})
    with pytest.raises(SecAggRefused, match="unmask request out of order"):
        sites[B].unmask(sid, {})  # advertised, never masked (and now dead)
    with pytest.raises(SecAggRefused, match="state is gone"):
        sites[B].share(sid, adverts)
    sites[A].share(sid, adverts)
    with pytest.raises(SecAggRefused, match="share request out of order"):
        sites[A].share(sid, adverts)
    sid2 = "twice"
    inbox = share(sites, sid2, advertise(sites, sid2, [A, B, C]))
    sites[A].mask(sid2, inbox[A], data[A], SPEC)
    with pytest.raises(SecAggRefused, match=r"site s00: session 'twice'.*masking twice"):
        sites[A].mask(sid2, inbox[A], {"n": np.zeros(7), "x": np.zeros((2, 7))}, SPEC)
    assert session_files(sites[A]) == []


def _shift(y, key, idx, delta):
    out = {k: v.copy() for k, v in y.items()}
    out[key][idx:idx + 1] += np.array([delta % 2**64], dtype=np.uint64)  # wraps modulo 2**64
    return out


ALTERATIONS = {
    "delta": lambda y: _shift(y, "n", 3, 1),
    "plus_2_63": lambda y: _shift(y, "x", 0, 2**63),
    "minus_big": lambda y: _shift(y, "n", 0, -(10**12)),
    "tag_forged": lambda y: _shift(y, TAG_KEY, 1, 12345),
    "tag_plus_p61": lambda y: _shift(y, TAG_KEY, 1, P61),
    "swapped_keys": lambda y: {**y, "a": y["b"], "b": y["a"]},
    "doubled": lambda y: {k: v * np.uint64(2) for k, v in y.items()},
    "missing_key": lambda y: {k: v for k, v in y.items() if k != "a"},
    "wrong_dtype": lambda y: {**y, "a": y["a"].astype(np.int64)},
}


@pytest.mark.parametrize("attack", sorted(ALTERATIONS))
def test_an_altered_sum_is_detected_by_every_site(sites, attack):
    spec = {"a": ArraySpec(bound=50), "b": ArraySpec(bound=50), "n": ArraySpec(bound=1000),
            "x": ArraySpec(bound=100.0, frac_bits=24)}
    rng = np.random.default_rng(5)
    data = {p: {"a": rng.integers(-50, 51, 6), "b": rng.integers(-50, 51, 6), "n": rng.integers(0, 1000, 6),
                "x": rng.uniform(-100, 100, 6)} for p in (A, B, C)}
    sid = f"alter-{attack}"
    y = aggregate(to_masked(sites, sid, data, spec), [A, B, C])
    bad = ALTERATIONS[attack](y)
    for p in (A, B, C):
        with pytest.raises(SecAggIntegrityError, match=f"site {p}: the sum received for session '{sid}' does not"):
            sites[p].unmask(sid, bad)
    with pytest.raises(SecAggRefused, match="state is gone"):  # no second try with the true sum
        sites[A].unmask(sid, y)


def test_adding_p61_inside_the_declared_range_is_caught_by_the_tag(sites):
    """The zero-divisor case: +P61 is invisible to a MAC modulo P61 alone; within the declared range
    the range check cannot see it either, so this is the second prime's catch."""
    spec = {"v": ArraySpec(bound=2**61)}  # 3 * 2**61 < 2**63
    data = {p: {"v": np.array([1, -2, 3])} for p in (A, B, C)}
    y = aggregate(to_masked(sites, "p61", data, spec), [A, B, C])
    for p, idx in zip((A, B, C), range(3), strict=True):
        with pytest.raises(SecAggIntegrityError, match="integrity tag mismatch"):
            sites[p].unmask("p61", _shift(y, "v", idx, P61))


def test_a_sum_outside_the_declared_range_is_refused_as_such(sites):
    data = {p: {"v": np.array([1, 2])} for p in (A, B, C)}
    y = aggregate(to_masked(sites, "range", data, {"v": ArraySpec(bound=10)}), [A, B, C])
    with pytest.raises(SecAggIntegrityError, match="array 'v' is outside the range"):
        sites[A].unmask("range", _shift(y, "v", 0, 31))


def test_a_sum_from_another_session_is_detected(sites):
    data = data_for([A, B, C])
    y1 = aggregate(to_masked(sites, "mix-1", data), [A, B, C])
    y2 = aggregate(to_masked(sites, "mix-2", data), [A, B, C])
    with pytest.raises(SecAggIntegrityError, match="session 'mix-1'"):
        sites[A].unmask("mix-1", y2)
    assert np.array_equal(sites[B].unmask("mix-1", y1)["n"], plain_sum(data, "n"))


def test_different_sums_to_different_sites_each_site_checks_its_own(sites):
    data = data_for([A, B, C])
    y = aggregate(to_masked(sites, "split-sum", data), [A, B, C])
    assert np.array_equal(sites[A].unmask("split-sum", y)["n"], plain_sum(data, "n"))
    with pytest.raises(SecAggIntegrityError, match="site s01"):
        sites[B].unmask("split-sum", _shift(y, "n", 0, 7))
    with pytest.raises(SecAggIntegrityError, match="site s02"):
        sites[C].unmask("split-sum", _shift(y, TAG_KEY, 0, 1))


def test_sites_that_disagree_on_the_spec_all_fail_instead_of_decoding_garbage(sites):
    data = data_for([A, B, C])
    sid = "spec-mismatch"
    inbox = share(sites, sid, advertise(sites, sid, [A, B, C]))
    other = {"n": ArraySpec(bound=1000), "x": ArraySpec(bound=100.0, frac_bits=20)}
    masked = {p: sites[p].mask(sid, inbox[p], data[p], other if p == C else SPEC) for p in (A, B, C)}
    y = aggregate(masked, [A, B, C])
    for p in (A, B, C):
        with pytest.raises(SecAggIntegrityError):
            sites[p].unmask(sid, y)


@pytest.mark.parametrize("attack", ["dropped", "altered", "redirected", "other_session", "from_non_peer"])
def test_envelope_attacks_are_refused_naming_the_sender(sites, attack):
    sid = f"env-{attack}"
    data = data_for([A, B, C, D])
    inbox = share(sites, sid, advertise(sites, sid, [A, B, C]))
    box = dict(inbox[C])
    if attack == "dropped":
        del box[A]
        expect = "no envelope from s00"
    elif attack == "altered":
        box[A] = box[A].copy()
        box[A][20] ^= 1
        expect = "envelope from site s00 does not open"
    elif attack == "redirected":  # the envelope s00 sealed for s01, passed to s02 as its own
        box[A] = inbox[B][A]
        expect = "envelope from site s00 does not open"
    elif attack == "other_session":
        other = share(sites, sid + "-x", advertise(sites, sid + "-x", [A, B, C]))
        box[A] = other[C][A]
        expect = "envelope from site s00 does not open"
    else:
        box[D] = box[A]
        expect = r"envelope\(s\) from s03, not a peer"
    with pytest.raises(SecAggRefused, match=f"site s02: session '{sid}'.*{expect}"):
        sites[C].mask(sid, box, data[C], SPEC)
    assert sites[C].store.load(sid) is None  # refused sessions are destroyed


def test_a_dropout_is_named_and_a_rerun_without_the_site_works_but_cannot_be_differenced(sites):
    data = data_for([A, B, C, D], seed=9)
    parts4 = [A, B, C, D]
    masked = to_masked(sites, "q7/attempt1", data, query_id="q7")
    with pytest.raises(SecAggDropout, match="no masked input message from s03") as ei:
        aggregate({p: masked[p] for p in (A, B, C)}, parts4, session_id="q7/attempt1")
    assert ei.value.missing == (D,)
    y_all = aggregate(masked, parts4)  # a lying server did receive s03's input
    rerun = {p: data[p] for p in (A, B, C)}
    y3 = aggregate(to_masked(sites, "q7/attempt2", rerun, query_id="q7"), [A, B, C])
    tot = sites[A].unmask("q7/attempt2", y3)
    assert np.array_equal(tot["n"], plain_sum(rerun, "n"))
    # site A now holds the 3-site total; the 4-site total of the same query would give away s03's vector
    with pytest.raises(SecAggRefused, match="query 'q7' was already unmasked in another session"):
        sites[A].unmask("q7/attempt1", y_all)
    with pytest.raises(SecAggRefused, match="query 'q7' was already unmasked"):
        sites[A].advertise("q7/attempt3", [A, B, C], query_id="q7")
    assert np.array_equal(sites[B].unmask("q7/attempt1", y_all)["n"], plain_sum(data, "n"))  # B: one total


def test_a_session_older_than_the_ttl_is_refused_and_destroyed(identities, tmp_path):
    now = [1_000_000.0]
    sites = make_sites(identities, tmp_path, [A, B, C], ttl_s=600, clock=lambda: now[0])
    adverts = advertise(sites, "slow", [A, B, C])
    now[0] += 601
    with pytest.raises(SecAggRefused, match=r"site s00: session 'slow'.*older than the TTL \(600 s\)"):
        sites[A].share("slow", adverts)
    assert session_files(sites[A]) == []
    assert len(session_files(sites[B])) == 1
    SiteSecAgg(B, identities[0][B], identities[1], tmp_path / B, ttl_s=600, clock=lambda: now[0])
    assert session_files(sites[B]) == []  # purged when the next message's process starts


def test_state_files_are_0600_from_creation_hold_no_stale_secrets_and_are_gone_after_use(sites, monkeypatch):
    created: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *a, **kw):
        if flags & os.O_CREAT:
            created.append((str(path), flags, mode))
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    old_umask = os.umask(0)  # a permissive umask must not widen anything
    try:
        data = data_for([A, B, C])
        sid = "files"
        adverts = advertise(sites, sid, [A, B, C])
        inbox = share(sites, sid, adverts)

        def check_modes():
            for site in (A, B, C):
                for f in sites[site].store.root.rglob("*"):
                    want = 0o700 if f.is_dir() else 0o600
                    assert stat.S_IMODE(f.stat().st_mode) == want, f
            assert stat.S_IMODE(sites[A].store.root.stat().st_mode) == 0o700

        check_modes()
        assert "esk" in json.loads(session_files(sites[A])[0].read_bytes())
        masked = {p: sites[p].mask(sid, inbox[p], data[p], SPEC) for p in (A, B, C)}
        check_modes()
        st_a = json.loads(session_files(sites[A])[0].read_bytes())
        assert not {"esk", "seed", "peers"} & set(st_a)  # ephemeral secret and seeds destroyed after use
        y = aggregate(masked, [A, B, C])
        for p in (A, B, C):
            sites[p].unmask(sid, y)
            assert session_files(sites[p]) == []
        check_modes()
    finally:
        os.umask(old_umask)
    roots = [str(sites[p].store.root) for p in (A, B, C)]
    mine = [c for c in created if c[0].startswith(tuple(roots))]
    assert mine and all(flags & os.O_EXCL and mode == 0o600 for _, flags, mode in mine)
    for f in sites[A].store.root.rglob("*"):  # what is left: the ledger, timestamps only
        if f.is_file():
            assert set(json.loads(f.read_bytes())) == {"at"}


def test_logging_names_the_refusal(sites, caplog):
    with caplog.at_level(logging.WARNING, logger="shared.secagg"):
        with pytest.raises(SecAggRefused):
            sites[A].advertise("log", [A, B])
    assert "s00 refuses session 'log'" in caplog.text


def test_aggregate_checks_shapes_and_extras(sites):
    data = data_for([A, B, C])
    masked = to_masked(sites, "agg", data)
    bad = {**masked, B: {**masked[B], "n": masked[B]["n"][:-1]}}
    with pytest.raises(ValueError, match="masked input of site s01"):
        aggregate(bad, [A, B, C])
    with pytest.raises(ValueError, match="from s03, not participants"):
        aggregate({**masked, D: masked[A]}, [A, B, C])


def test_a_bad_contribution_is_a_value_error_naming_the_array_and_the_session_stays_usable(sites):
    data = data_for([A, B, C])
    sid = "bad-input"
    inbox = share(sites, sid, advertise(sites, sid, [A, B, C]))
    broken = {"n": data[A]["n"], "x": np.where(np.eye(2, 7) > 0, np.nan, data[A]["x"])}
    with pytest.raises(ValueError, match="array 'x': 2 NaN"):
        sites[A].mask(sid, inbox[A], broken, SPEC)
    with pytest.raises(ValueError, match="differ from spec keys"):
        sites[A].mask(sid, inbox[A], {"n": data[A]["n"]}, SPEC)
    masked = {p: sites[p].mask(sid, inbox[p], data[p], SPEC) for p in (A, B, C)}  # nothing was sent: retry ok
    assert np.array_equal(sites[A].unmask(sid, aggregate(masked, [A, B, C]))["n"], plain_sum(data, "n"))


def test_with_two_participants_each_learns_the_others_vector(identities, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="shared.secagg"):
        sites = make_sites(identities, tmp_path, [A, B], min_sites=2)
    assert "min_sites=2 lets each of two participants learn the other's vector" in caplog.text
    data = data_for([A, B], seed=3)
    res = run_secure_sum(data, SPEC, sites=sites)
    assert np.array_equal(res.totals[A]["n"] - data[A]["n"], data[B]["n"])  # why min_sites defaults to 3


# ============================================================================ kept sessions

def kept_round1(sites, sid, data, spec=SPEC):
    parts = sorted(data)
    inbox = share(sites, sid, advertise(sites, sid, parts))
    return {p: sites[p].mask(sid, inbox[p], data[p], spec, keep=True) for p in parts}


def test_a_kept_session_sums_exactly_round_after_round(sites):
    sid = "kept"
    rounds = [data_for([A, B, C], seed=s) for s in range(4)]
    masked = kept_round1(sites, sid, rounds[0])
    for r, data in enumerate(rounds):
        if r:
            masked = {p: sites[p].mask_next(sid, data[p], SPEC) for p in (A, B, C)}
        y = aggregate(masked, [A, B, C])
        for p in (A, B, C):
            out = sites[p].unmask(sid, y)
            assert np.array_equal(out["n"], plain_sum(data, "n"))
            np.testing.assert_allclose(out["x"], plain_sum(data, "x"), atol=3 * 2**-24)
    for p in (A, B, C):
        assert len(session_files(sites[p])) == 1
        sites[p].close(sid)
        assert session_files(sites[p]) == []
        with pytest.raises(SecAggRefused, match="state is gone"):
            sites[p].mask_next(sid, rounds[0][p], SPEC)


def test_each_kept_round_has_fresh_masks_so_rounds_cannot_be_differenced(sites):
    """The same data in rounds 1 and 2: if the masks repeated, the server's difference of one site's two
    masked replies would be zero; and a round-2 reply minus the data must not equal round 1's mask."""
    sid = "fresh"
    data = data_for([A, B, C])
    m1 = kept_round1(sites, sid, data)
    y1 = aggregate(m1, [A, B, C])
    for p in (A, B, C):
        sites[p].unmask(sid, y1)
    m2 = {p: sites[p].mask_next(sid, data[p], SPEC) for p in (A, B, C)}
    for p in (A, B, C):
        for k in ("n", "x", TAG_KEY):
            assert not np.array_equal(m1[p][k], m2[p][k]), (p, k)
    # round 1's sum is not accepted as round 2's (the MAC key is bound to the round)
    for p in (A, B, C):
        with pytest.raises(SecAggIntegrityError, match="does not verify"):
            sites[p].unmask(sid, y1)


def test_a_kept_round_is_masked_once_and_only_after_the_last_was_unmasked(sites):
    sid = "order"
    data = data_for([A, B, C])
    masked = kept_round1(sites, sid, data)
    with pytest.raises(SecAggRefused, match=r"hidden total was not unmasked.*masking twice"):
        sites[A].mask_next(sid, data[A], SPEC)  # before round 1 was unmasked: refused, and A's state is gone
    assert session_files(sites[A]) == []
    y = aggregate(masked, [A, B, C])
    sites[B].unmask(sid, y)
    sites[B].mask_next(sid, data[B], SPEC)
    with pytest.raises(SecAggRefused, match="masking twice"):
        sites[B].mask_next(sid, data[B], SPEC)
    # a non-kept session has no next round
    plain = to_masked(sites, "one-shot", data)
    sites[C].unmask("one-shot", aggregate(plain, [A, B, C]))
    with pytest.raises(SecAggRefused, match="state is gone"):
        sites[C].mask_next("one-shot", data[C], SPEC)


def test_a_kept_session_expires_from_its_last_round_and_an_altered_sum_ends_it(identities, tmp_path):
    now = [1_000_000.0]
    sites = make_sites(identities, tmp_path, [A, B, C], ttl_s=600, clock=lambda: now[0])
    sid = "ttl"
    data = data_for([A, B, C])
    masked = kept_round1(sites, sid, data)
    for _ in range(3):  # 3 x 400 s > the TTL since the advert, but each round is within 600 s of the last
        now[0] += 400
        y = aggregate(masked, [A, B, C])
        for p in (A, B, C):
            sites[p].unmask(sid, y)
        masked = {p: sites[p].mask_next(sid, data[p], SPEC) for p in (A, B, C)}
    now[0] += 601
    with pytest.raises(SecAggRefused, match=r"older than the TTL"):
        sites[A].unmask(sid, aggregate(masked, [A, B, C]))
    y = aggregate(masked, [A, B, C])
    with pytest.raises(SecAggRefused, match=r"older than the TTL"):
        sites[B].unmask(sid, y)
    now[0] -= 601
    with pytest.raises(SecAggIntegrityError):
        sites[C].unmask(sid, _shift(y, "n", 0, 1))
    assert all(session_files(sites[p]) == [] for p in (A, B, C))


def test_kept_session_state_holds_pair_keys_not_the_ephemeral_secret_and_close_removes_them(sites):
    sid = "keys"
    data = data_for([A, B, C])
    kept_round1(sites, sid, data)
    st_a = json.loads(session_files(sites[A])[0].read_bytes())
    assert not {"esk", "seed", "peers"} & set(st_a)
    assert sorted(st_a["pair_keys"]) == [B, C] and st_a["round"] == 1
    sites[A].close(sid)
    assert session_files(sites[A]) == []


def test_revealed_kept_rounds_follow_each_other_without_unmask_and_sum_exactly(sites):
    """Model updates: the server reads each round's sum itself (reveal_total); the sites mask round after
    round without an unmask, each round under fresh masks, and one site's reply stays hidden."""
    from shared.secagg import decode_sum

    sid = "updates"
    spec = {"n": ArraySpec(bound=1000)}
    rounds = [{p: {"n": np.random.default_rng(10 * r + i).integers(-1000, 1001, 5)} for i, p in enumerate((A, B, C))}
              for r in range(3)]
    inbox = share(sites, sid, advertise(sites, sid, [A, B, C]))
    masked = {p: sites[p].mask(sid, inbox[p], rounds[0][p], spec, reveal_total=True, keep=True) for p in (A, B, C)}
    for r, data in enumerate(rounds):
        if r:
            masked = {p: sites[p].mask_next(sid, data[p], spec, reveal_total=True) for p in (A, B, C)}
        y = aggregate(masked, [A, B, C])
        assert np.array_equal(decode_sum(y, spec)["n"], plain_sum(data, "n"))
        for p in (A, B, C):  # no reply is its data in the clear
            assert not np.array_equal(masked[p]["n"].view(np.int64), np.asarray(data[p]["n"]))
    sites[A].close(sid)
    with pytest.raises(SecAggRefused, match="state is gone"):
        sites[A].mask_next(sid, rounds[0][A], spec, reveal_total=True)
