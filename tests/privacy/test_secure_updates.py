"""Securely aggregated model updates: what a malicious server can get, and the one-set-per-model rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.secure_updates import check_participants, mask_update
from client.stats_service import PolicyRefusal
from shared.secagg import SiteSecAgg, aggregate, make_identities, route_envelopes
from shared.secure_updates import mean_from_sum, weighted_update, weights_digest

SITES = ["a", "b", "c", "d"]


@pytest.fixture
def sas(tmp_path: Path) -> dict[str, SiteSecAgg]:
    keys, roster = make_identities(SITES)
    return {s: SiteSecAgg(s, keys[s], roster, tmp_path / s / "secagg", min_sites=3) for s in SITES}


def updates(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {s: {"packed/<f4": rng.normal(0, 0.3, 50).astype(np.float32),
                "packed/<i8": rng.integers(0, 40, 3)} for s in SITES}


N = {"a": 12, "b": 30, "c": 7, "d": 21}


def setup_session(sas, sid, parts):
    adverts = {p: sas[p].advertise(sid, parts, query_id=sid) for p in parts}
    return route_envelopes({p: sas[p].share(sid, adverts) for p in parts}, parts)


def test_the_revealed_sum_is_the_fedavg_mean_and_no_reply_is_a_sites_update(sas, tmp_path) -> None:
    ups, digest = updates(), "0" * 64
    inbox = setup_session(sas, "run1.train.x", SITES)
    masked = {s: mask_update(sas[s], tmp_path / s, site=s, session="run1.train.x", envelopes=inbox[s],
                             arrays=ups[s], n=N[s], weights_digest=digest) for s in SITES}
    shapes = {k: v.shape for k, v in ups["a"].items()}
    mean, n = mean_from_sum(aggregate(masked, SITES), shapes)
    assert n == sum(N.values())
    for k in shapes:
        want = sum(N[s] * ups[s][k].astype(np.float64) for s in SITES) / n
        np.testing.assert_allclose(mean[k], want, atol=1e-6)
    # the server's view of one site: its reply, minus the site's own encoded update, is not zero anywhere
    for s in SITES:
        enc = weighted_update(ups[s], N[s], site=s)
        for key, arr in masked[s].items():
            if key in enc and enc[key].ndim:
                plain = np.round(enc[key] * 2**24).astype(np.int64)
                assert np.mean(arr.view(np.int64) == plain) < 0.01


def test_a_claimed_dropout_gets_no_second_sum_of_the_same_model(sas, tmp_path) -> None:
    """The server receives everyone's masked update of model M, claims d dropped, and asks a, b, c again in a
    new session for the same M: the difference of the two sums would be d's update. Every site refuses."""
    ups, digest = updates(), weights_digest({"w": np.arange(10, dtype=np.float32)})
    inbox = setup_session(sas, "run1.train.s1", SITES)
    full = {s: mask_update(sas[s], tmp_path / s, site=s, session="run1.train.s1", envelopes=inbox[s], arrays=ups[s],
                           n=N[s], weights_digest=digest) for s in SITES}
    assert mean_from_sum(aggregate(full, SITES), {k: v.shape for k, v in ups["a"].items()})[1] == sum(N.values())
    inbox2 = setup_session(sas, "run1.train.s2", ["a", "b", "c"])
    for s in ("a", "b", "c"):
        with pytest.raises(PolicyRefusal, match=r"secure_updates.*already sent a masked update of these global "
                                                r"weights.*a,b,c,d.*a,b,c"):
            mask_update(sas[s], tmp_path / s, site=s, session="run1.train.s2", envelopes=inbox2[s], arrays=ups[s],
                        n=N[s], weights_digest=digest)
    # the same sites again (a resumed run) may: the difference of two sums over all four hides each site
    inbox3 = setup_session(sas, "run1.train.s3", SITES)
    again = {s: mask_update(sas[s], tmp_path / s, site=s, session="run1.train.s3", envelopes=inbox3[s],
                            arrays=ups[s], n=N[s], weights_digest=digest) for s in SITES}
    assert set(aggregate(again, SITES)) == set(full["a"])


def test_the_participant_record_survives_processes_and_expires(tmp_path) -> None:
    now = [1_000_000.0]
    check_participants(tmp_path, "x" * 64, ["a", "b", "c"], site="a", clock=lambda: now[0])
    with pytest.raises(PolicyRefusal, match="secure_updates"):
        check_participants(tmp_path, "x" * 64, ["a", "b"], site="a", clock=lambda: now[0])
    check_participants(tmp_path, "y" * 64, ["a", "b"], site="a", clock=lambda: now[0])  # another model: fine
    now[0] += 31 * 86400
    check_participants(tmp_path, "x" * 64, ["a", "b"], site="a", clock=lambda: now[0])


@pytest.mark.parametrize(("bad", "match"), [
    ({"packed/<f4": np.array([np.nan, 1.0])}, "non-finite values"),
    ({"packed/<f4": np.array([2e4, 1.0])}, "above the"),
])
def test_a_bad_update_is_refused_on_site_naming_it(bad, match) -> None:
    with pytest.raises(ValueError, match=rf"site a: .*{match}"):
        weighted_update(bad, 10, site="a")
    with pytest.raises(ValueError, match="1..1000000"):
        weighted_update({"packed/<f4": np.zeros(3)}, 0, site="a")
