"""The site statistics service end to end (secure aggregation included), honest and malicious servers."""

from __future__ import annotations

import numpy as np
import pytest

from client.stats_service import PolicyRefusal
from shared.stats.sc_basic import ColumnSumsProtocol
from shared.stats_driver import SiteQuery, run_site_queries
from simulations.sites import inprocess_transport

from .conftest import RUN


def pooled(cons, sites, cohort_splits, col):
    df = __import__("pandas").concat([cons.tables[s] for s in sites])
    df = df[df["split"].isin(cohort_splits)]
    return df


def recording_transport(cons):
    """An in-process transport that keeps every (requests, replies) pair the server exchanged."""
    seen: list = []
    inner = inprocess_transport(cons.services, RUN)

    def spy(requests):
        replies = inner(requests)
        seen.append((requests, replies))
        return replies

    return spy, seen


def test_federated_sums_equal_pooled(consortium) -> None:
    # Prepare
    q = SiteQuery("sums", ColumnSumsProtocol(n_columns=2), "training", ["pre_t2w", "age"], ["a", "b", "c"])
    # Execute
    run_site_queries([q], inprocess_transport(consortium.services, RUN), run=RUN, k=5)
    # Assert
    assert q.ok, q.error
    df = pooled(consortium, ["a", "b", "c"], ["train", "val"], None)
    for cls in (0, 1):
        sub = df[df["label"] == cls]
        assert q.released["n"][cls] == len(sub)
        np.testing.assert_allclose(q.released["mean"][cls], sub[["pre_t2w", "age"]].mean().to_numpy(), rtol=1e-6)  # fixed point: 2**-24
        np.testing.assert_allclose(q.released["sd"][cls], sub[["pre_t2w", "age"]].std().to_numpy(), rtol=1e-5)
    assert q.released["sites_included"] == 3


def test_server_never_sees_a_site_number_nor_the_total(consortium) -> None:
    """Record every message: no request or reply holds a site's or the pooled sum in the clear."""
    spy, seen = recording_transport(consortium)

    q = SiteQuery("sums", ColumnSumsProtocol(n_columns=1), "training", ["age"], ["a", "b", "c"])
    run_site_queries([q], spy, run=RUN, k=5)
    assert q.ok
    df = pooled(consortium, ["a", "b", "c"], ["train", "val"], None)
    secrets = {float(df.loc[df["label"] == c, "age"].sum()) for c in (0, 1)}
    for s in ("a", "b", "c"):
        t = consortium.tables[s]
        t = t[t["split"].isin(["train", "val"])]
        secrets |= {float(t.loc[t["label"] == c, "age"].sum()) for c in (0, 1)}
    # the fixed-point encoding of any of those sums (frac_bits 24) never travels
    encoded = {int(round(v * 2**24)) for v in secrets}
    for requests, replies in seen:
        for msg in (*requests.values(), *replies.values()):
            for masked in (msg.get("masked") or {}).values():
                for arr in masked.values():
                    vals = set(np.asarray(arr).view(np.int64).tolist())
                    assert not (vals & encoded)
            for total in (msg.get("totals") or {}).values():
                for arr in total.values():
                    vals = set(np.asarray(arr).view(np.int64).tolist())
                    assert not (vals & encoded)


@pytest.mark.parametrize(("change", "rule"), [
    (dict(k=3), "min_cell_count"),
    (dict(columns=["patient_id"]), "columns"),
    (dict(protocol="no_such"), "vocabulary"),
    (dict(participants=["a", "b", "mallory"]), "roster"),
    (dict(participants=["a"]), "release_site_figures"),
    (dict(cohort="external"), "role"),
    (dict(params={"n_columns": 10_000}), "parameters"),
])
def test_requests_outside_policy_are_refused_with_the_rule(consortium, change, rule) -> None:
    spec = {"qid": "q1", "protocol": "column_sums", "params": {"n_columns": 1}, "cohort": "training",
            "columns": ["age"], "participants": ["a", "b", "c"]}
    k = change.pop("k", 5)
    spec.update(change)
    rep = consortium.services["a"].handle(RUN, {"op": "open", "k": k, "queries": [spec], "advertise": {}})
    assert "q1" in rep["refused"], rep
    assert rep["refused"]["q1"]["rule"] == rule


def test_a_quantity_is_released_with_one_set_of_sites_only(consortium) -> None:
    tr = inprocess_transport(consortium.services, RUN)
    q1 = SiteQuery("sums", ColumnSumsProtocol(n_columns=1), "training", ["age"], ["a", "b", "c"])
    run_site_queries([q1], tr, run=RUN, k=5)
    assert q1.ok
    # the same quantity without site c: the difference would be c's numbers
    q2 = SiteQuery("sums2", ColumnSumsProtocol(n_columns=1), "training", ["age"], ["a", "b"])
    run_site_queries([q2], tr, run=RUN, k=5)
    assert not q2.ok
    assert {s: r["rule"] for s, r in q2.refused.items()} == {"a": "once", "b": "once"}


def test_query_budget(consortium, tmp_path) -> None:
    from .conftest import Consortium

    cons = Consortium(tmp_path / "x", {"a": 20, "b": 20, "c": 20}, query_budget=3)
    tr = inprocess_transport(cons.services, RUN)
    qs = [SiteQuery(f"q{i}", ColumnSumsProtocol(n_columns=1), "training", [c], ["a", "b", "c"])
          for i, c in enumerate(["age", "cea", "pre_t2w", "post_t2w"])]
    with pytest.raises(PolicyRefusal, match="query_budget"):
        run_site_queries(qs, tr, run=RUN, k=5)


def test_stale_signatures_are_refused_naming_the_fix(consortium) -> None:
    spec = {"qid": "q1", "protocol": "column_sums", "params": {"n_columns": 1}, "cohort": "training",
            "columns": ["age"], "participants": ["a", "b", "c"]}
    rep = consortium.services["a"].handle("run2", {"op": "open", "k": 5, "queries": [spec], "advertise": {}})
    assert "q1" in rep["failed"] and "run 'run1'" in rep["failed"]["q1"] and "signatures stage" in rep["failed"]["q1"]


def test_dropout_reruns_without_the_site_and_says_so(consortium) -> None:
    calls = {"n": 0}

    def fail(site, req):  # site c disappears after answering 'open'
        calls["n"] += 1
        return site == "c" and req.get("op") == "step" and bool(req.get("envelopes"))

    q = SiteQuery("sums", ColumnSumsProtocol(n_columns=1), "training", ["age"], ["a", "b", "c"])
    run_site_queries([q], inprocess_transport(consortium.services, RUN, fail=fail), run=RUN, k=5)
    assert q.ok, q.error
    assert q.dropped == ["c"] and q.released["participants"] == ["a", "b"]
    df = pooled(consortium, ["a", "b"], ["train", "val"], None)
    assert q.released["n"] == [int((df["label"] == 0).sum()), int((df["label"] == 1).sum())]


def test_site_with_few_patients_of_a_class_contributes_nothing(tmp_path) -> None:
    from .conftest import Consortium

    cons = Consortium(tmp_path, {"a": 30, "b": 30, "c": 30})
    t = cons.tables["c"]
    # site c keeps only 2 positives in its training cohort: below k=5, so it is excluded
    pos = t.index[(t["label"] == 1) & t["split"].isin(["train", "val"])]
    cons.tables["c"] = t.drop(pos[2:])
    q = SiteQuery("sums", ColumnSumsProtocol(n_columns=1), "training", ["age"], ["a", "b", "c"])
    run_site_queries([q], inprocess_transport(cons.services, RUN), run=RUN, k=5)
    assert q.ok and q.released["sites_included"] == 2
    df = pooled(cons, ["a", "b"], ["train", "val"], None)
    assert q.released["n"] == [int((df["label"] == 0).sum()), int((df["label"] == 1).sum())]


def test_one_kept_session_per_participant_set_closed_when_done(consortium) -> None:
    """A multi-round query sets up its secure-aggregation keys once (one share, envelopes once), each
    round's masked reply differs, and every site destroys the session's keys when it is done."""
    from shared.stats.sc_logistic import LogisticSite

    spy, seen = recording_transport(consortium)

    q = SiteQuery("logit", LogisticSite(["pre_t2w", "age"]), "training", ["pre_t2w", "age"], ["a", "b", "c"])
    s = SiteQuery("sums", ColumnSumsProtocol(n_columns=1), "training", ["age"], ["a", "b", "c"])
    run_site_queries([q, s], spy, run=RUN, k=5)
    assert q.ok and s.ok, (q.error, s.error)
    assert q.rounds >= 3
    steps = [(req, rep) for req, rep in seen if any(r.get("op") == "step" for r in req.values())]
    shares = [req for req, _ in steps if any(r.get("share") for r in req.values())]
    with_env = [req for req, _ in steps if any(r.get("envelopes") for r in req.values())]
    masks = [rep["a"]["masked"] for _, rep in steps if rep.get("a", {}).get("masked")]
    assert len(shares) == 1 and len(with_env) == 1 and len(masks) == q.rounds
    assert not any(r.get("adverts") for _, rep in steps for r in rep.values())  # advertised once, at open
    tags = [tuple(next(iter(m.values()))["__tag__"].tolist()) for m in masks]
    assert len(set(tags)) == len(tags)  # fresh masks every round
    for site in ("a", "b", "c"):
        assert list((consortium.cache(site) / "secagg" / "sessions").iterdir()) == []


def test_a_next_round_before_the_first_is_refused(consortium) -> None:
    """A server that skips the key exchange (a plan without envelopes for a session never masked) gets a
    refusal: a site masks only in a session whose seeds it has opened."""
    from shared.secagg import SecAggRefused

    spec = {"qid": "q1", "protocol": "column_sums", "params": {"n_columns": 1}, "cohort": "training",
            "columns": ["age"], "participants": ["a", "b", "c"]}
    svc = consortium.services["a"]
    rep = svc.handle(RUN, {"op": "open", "k": 5, "queries": [spec], "advertise": {"sx": ["a", "b", "c"]}})
    assert rep["accepted"] == ["q1"] and "sx" in rep["adverts"]
    with pytest.raises(SecAggRefused, match=r"phase 'advertised', not 'ready'"):
        svc.handle(RUN, {"op": "step", "plan": {"sx": ["q1"]}})


def test_a_two_site_sum_is_announced_once_per_pair(consortium) -> None:
    """Fewer than 3 sites: the server says so in the run record (the per-site floor protects each site)."""
    from server.pipeline import two_site_notice

    events = []

    class Store:
        def event(self, run_id, kind, message, **kw):
            events.append((kind, message, kw))

    class Orch:
        run_id, store = RUN, Store()

    tr = inprocess_transport(consortium.services, RUN)
    two = [SiteQuery(f"q{i}", ColumnSumsProtocol(n_columns=1), "training", [c], ["a", "b"])
           for i, c in enumerate(["age", "cea"])]
    three = SiteQuery("q3", ColumnSumsProtocol(n_columns=1), "training", ["pre_t2w"], ["a", "b", "c"])
    run_site_queries([*two, three], tr, run=RUN, k=5)
    assert all(q.ok for q in [*two, three])
    told: set = set()
    two_site_notice(Orch(), [*two, three], told)
    two_site_notice(Orch(), two, told)
    assert [(k, kw["detail"]["sites"]) for k, _, kw in events] == [("two_site_aggregate", ["a", "b"])]
    assert "learns the other's" in events[0][1] and events[0][2]["level"] == "warning"
