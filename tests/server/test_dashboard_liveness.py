"""Site liveness in the run record (server/liveness.py), fed with Flower's own NodeInfo messages."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flwr.proto.node_pb2 import NodeInfo

from server.liveness import TABLE, poll_grid, read_node_status, record_node_status
from server.store import RunStore

RUN = "run-1"
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
# Flower node ids are unsigned 64-bit: this one does not fit SQLite's signed INTEGER
BIG_ID = 2**64 - 5
SITES = {11: "site_a", BIG_ID: "site_b"}


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    s = RunStore.open_run_dir(tmp_path)
    s.start_run(RUN, "demo", "name: demo\n", "d1", "federated", "fedavg", 1, "deployment")
    yield s
    s.close()


def _online(node_id: int, at: datetime, interval: float = 30.0) -> NodeInfo:
    # what the SuperLink reports: online_until = last heartbeat + HEARTBEAT_PATIENCE (2) intervals
    return NodeInfo(node_id=node_id, status="online", heartbeat_interval=interval,
                    online_until=(at + timedelta(seconds=2 * interval)).timestamp(),
                    last_activated_at=at.isoformat())


def test_online_sites_get_their_last_heartbeat_and_absent_ones_go_offline(store: RunStore) -> None:
    beat = T0 - timedelta(seconds=7)
    rows = record_node_status(store, RUN, [_online(11, beat), _online(BIG_ID, beat)], SITES,
                              roles={"site_a": "train", "site_b": "external"}, now=T0)
    assert [(r.site, r.status, r.node_id) for r in rows] == [("site_a", "online", "11"),
                                                             ("site_b", "online", str(BIG_ID))]
    assert datetime.fromisoformat(rows[0].last_seen) == beat
    assert rows[1].role == "external"
    # site_b's node is no longer listed (Flower lists online nodes only): offline, last seen kept
    later = T0 + timedelta(minutes=5)
    rows = record_node_status(store, RUN, [_online(11, later)], SITES, now=later)
    b = next(r for r in rows if r.site == "site_b")
    assert (b.status, b.online) == ("offline", False)
    assert datetime.fromisoformat(b.last_seen) == beat
    assert b.role == "external"  # not given this time: kept
    assert datetime.fromisoformat(b.updated_at) == later
    events = store.events(RUN)
    assert list(events["kind"]) == ["site_offline"]
    assert events.iloc[0]["site"] == "site_b" and events.iloc[0]["level"] == "warning"
    # and back
    record_node_status(store, RUN, [_online(11, later), _online(BIG_ID, later)], SITES, now=later)
    assert list(store.events(RUN)["kind"]) == ["site_offline", "site_online"]


def test_a_site_that_reconnected_under_a_new_node_id_is_one_site(store: RunStore) -> None:
    rows = record_node_status(store, RUN, [_online(99, T0)], {11: "site_a", 99: "site_a"}, now=T0)
    assert [(r.site, r.node_id, r.status) for r in rows] == [("site_a", "99", "online")]


def test_bare_node_info_from_the_simulation_grid_counts_as_online(store: RunStore) -> None:
    # Grid.get_nodes() of the base class yields NodeInfo(node_id=...) only
    rows = record_node_status(store, RUN, [NodeInfo(node_id=11)], SITES, now=T0)
    a = next(r for r in rows if r.site == "site_a")
    assert a.online and datetime.fromisoformat(a.last_seen) == T0
    assert next(r for r in rows if r.site == "site_b").last_seen is None


class _Grid:
    def __init__(self, nodes: list[NodeInfo] | Exception):
        self.nodes = nodes

    def get_nodes(self) -> list[NodeInfo]:
        if isinstance(self.nodes, Exception):
            raise self.nodes
        return self.nodes


def test_poll_grid_records_and_never_raises(store: RunStore, caplog: pytest.LogCaptureFixture) -> None:
    assert [r.site for r in poll_grid(_Grid([_online(11, T0)]), store, RUN, SITES, now=T0)] == ["site_a", "site_b"]
    assert poll_grid(_Grid(ConnectionError("SuperLink gone")), store, RUN, SITES) == []
    assert "SuperLink gone" in caplog.text
    # a missing record is logged, not raised: liveness must not stop a run
    assert poll_grid(_Grid([]), Path(store.path).parent / "nope.db", RUN, SITES) == []


def test_readers_see_the_table_and_the_store_schema_is_untouched(store: RunStore) -> None:
    assert read_node_status(store.path, RUN) == []  # nothing recorded yet: no table, no error
    record_node_status(store, RUN, [_online(11, T0)], SITES, now=T0)
    with RunStore(store.path, readonly=True) as ro:  # the run record still opens (schema version unchanged)
        assert [s.site for s in read_node_status(ro, RUN)] == ["site_a", "site_b"]
        assert len(ro.events(RUN)) == 1  # site_b's first sighting was offline
    con = sqlite3.connect(store.path)
    try:
        cols = [r[1] for r in con.execute(f"PRAGMA table_info({TABLE})")]
    finally:
        con.close()
    assert cols[:6] == ["run_id", "site", "node_id", "role", "status", "online"]


def test_bad_input_is_refused_clearly(tmp_path: Path, store: RunStore) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        record_node_status(tmp_path / "none.db", RUN, [], SITES)
    other = tmp_path / "other.db"
    sqlite3.connect(other).close()
    with pytest.raises(ValueError, match="not a rectalfl run record"):
        record_node_status(other, RUN, [], SITES)
    with pytest.raises(ValueError, match="run_id"):
        record_node_status(store, "", [], SITES)
    with pytest.raises(ValueError, match="integer node_id"):
        record_node_status(store, RUN, [object()], SITES)


def test_simulation_nodes_online_forever_are_recorded_without_a_deadline() -> None:
    """Flower's simulation engine reports online_until ~ 1e300: no overflow, online, no deadline."""
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from server.liveness import _node_fields

    node = SimpleNamespace(node_id=7, status="online", online_until=1e300, heartbeat_interval=30.0)
    nid, status, last_seen, until, interval = _node_fields(node, datetime(2026, 1, 1, tzinfo=UTC))
    assert (nid, status, until) == ("7", "online", None) and last_seen is not None and interval == 30.0
