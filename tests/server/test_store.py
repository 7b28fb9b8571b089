"""The run record (server/store.py): schema, lifecycle, crash safety, resume, concurrent readers."""

from __future__ import annotations

import hashlib
import math
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from server.store import DB_NAME, SCHEMA_VERSION, RunStore, StoreError

RUN = "run-001"
YAML = "name: demo\nseed: 7\n"


def _start(store: RunStore, run_id: str = RUN, digest: str = "abc123") -> None:
    store.start_run(run_id, "demo", YAML, digest, "federated", "fedavg", 7, "simulation")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    s = RunStore.open_run_dir(tmp_path)
    yield s
    s.close()


def test_schema_created_with_user_version_and_wal(tmp_path: Path) -> None:
    with RunStore.open_run_dir(tmp_path) as s:
        assert s.path == tmp_path / DB_NAME
    con = sqlite3.connect(tmp_path / DB_NAME)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()
    assert {"runs", "stages", "rounds", "site_metrics", "events", "artefacts"} <= tables
    # Reopening an existing record neither fails nor recreates anything.
    with RunStore.open_run_dir(tmp_path) as s:
        assert s.runs().empty


def test_newer_schema_version_is_refused_naming_both_versions(tmp_path: Path) -> None:
    RunStore.open_run_dir(tmp_path).close()
    con = sqlite3.connect(tmp_path / DB_NAME)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    con.close()
    for readonly in (False, True):
        with pytest.raises(
            StoreError, match=rf"schema version {SCHEMA_VERSION + 5}.*{SCHEMA_VERSION}"
        ) as err:
            RunStore.open_run_dir(tmp_path, readonly=readonly)
        assert str(tmp_path / DB_NAME) in str(err.value)


def test_foreign_sqlite_file_is_not_taken_for_a_run_record(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE patients (id TEXT)")
    con.close()
    with pytest.raises(StoreError, match="not a rectalfl run record"):
        RunStore(path)


def test_full_run_lifecycle_reads_back_exact_values(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    model = tmp_path / "models" / "final.npz"
    payload = b"weights" * 1000
    model.write_bytes(payload)
    (tmp_path / "config.yaml").write_text(YAML)

    with RunStore.open_run_dir(tmp_path) as s:
        _start(s)
        with s.stage(RUN, "discover") as detail:
            s.event(RUN, "site_joined", "A joined as train", site="A", detail={"n_train": 10, "n_val": 2})
            detail["n_sites"] = 2
        with s.stage(RUN, "train"):
            for rnd, loss in ((1, 0.7), (2, 0.5)):
                s.start_round(RUN, "train", rnd, n_sent=2)
                s.log_metrics(
                    RUN, "train", "A", {"train-loss": loss, "n-steps": 4.0}, round=rnd, split="train", n=10
                )
                s.log_metric(RUN, "train", "B", "train-loss", loss + 0.1, round=rnd, split="train", n=12)
                s.finish_round(
                    RUN,
                    "train",
                    rnd,
                    n_replied=2,
                    n_failed=0,
                    train_loss=loss,
                    bytes_down=1000 * rnd,
                    bytes_up=2000 * rnd,
                    seconds=1.5,
                )
            s.event(
                RUN,
                "site_dropped",
                "C did not reply",
                level="warning",
                site="C",
                round=2,
                detail={"stage": "train"},
            )
        s.add_artefact(RUN, "config", Path("config.yaml"), tmp_path)
        s.add_artefact(RUN, "model", model, tmp_path, meta={"metadata": "models/final.json"})
        s.log_metric(RUN, "evaluate", "EXT", "pre_t2w/auc", 0.8125, split="external", n=40)
        s.finish_run(RUN, "completed")

    with RunStore.open_run_dir(tmp_path, readonly=True) as r:
        runs = r.runs()
        assert len(runs) == 1
        row = runs.iloc[0]
        assert (row.run_id, row["name"], row.status, row.config_yaml, row.config_digest) == (
            RUN,
            "demo",
            "completed",
            YAML,
            "abc123",
        )
        assert (row["mode"], row.strategy, row.seed, row.engine) == ("federated", "fedavg", 7, "simulation")
        assert row.error is None and row.finished_at >= row.created_at
        assert pd.Timestamp(row.created_at).tzinfo is not None  # UTC ISO-8601

        stages = r.stages(RUN)
        assert stages["name"].tolist() == ["discover", "train"]
        assert stages.status.tolist() == ["completed", "completed"]
        assert stages.detail.tolist() == [{"n_sites": 2}, {}]
        assert stages.finished_at.notna().all()

        rounds = r.rounds(RUN)
        assert rounds["round"].tolist() == [1, 2]
        assert rounds.status.tolist() == ["completed", "completed"]
        assert rounds.n_sent.tolist() == [2, 2] and rounds.n_replied.tolist() == [2, 2]
        assert rounds.n_failed.tolist() == [0, 0]
        assert rounds.train_loss.tolist() == [0.7, 0.5]
        assert rounds.bytes_down.tolist() == [1000, 2000] and rounds.bytes_up.tolist() == [2000, 4000]
        assert rounds.seconds.tolist() == [1.5, 1.5]
        assert r.last_completed_round(RUN) == 2

        m = r.metrics(RUN, stage="train")
        assert list(zip(m.site, m["round"], m.key, m.value, m.n, m.split, strict=True)) == [
            ("A", 1, "train-loss", 0.7, 10, "train"),
            ("A", 1, "n-steps", 4.0, 10, "train"),
            ("B", 1, "train-loss", 0.7 + 0.1, 12, "train"),
            ("A", 2, "train-loss", 0.5, 10, "train"),
            ("A", 2, "n-steps", 4.0, 10, "train"),
            ("B", 2, "train-loss", 0.5 + 0.1, 12, "train"),
        ]
        auc = r.metrics(RUN, key="pre_t2w/auc")
        assert len(auc) == 1
        assert (auc.stage[0], auc.site[0], auc.value[0], auc.n[0], auc.split[0]) == (
            "evaluate",
            "EXT",
            0.8125,
            40,
            "external",
        )
        assert pd.isna(auc["round"][0])
        assert len(r.metrics(RUN)) == 7

        ev = r.events(RUN)
        assert ev.kind.tolist() == ["site_joined", "site_dropped"]
        assert ev.detail.tolist() == [{"n_train": 10, "n_val": 2}, {"stage": "train"}]
        assert ev["round"].isna().tolist() == [True, False] and ev["round"][1] == 2
        warn = r.events(RUN, level="warning")
        assert warn.message.tolist() == ["C did not reply"] and warn.site.tolist() == ["C"]

        art = r.artefacts(RUN)
        assert art.kind.tolist() == ["config", "model"]
        assert art.path.tolist() == ["config.yaml", "models/final.npz"]
        assert art.sha256.tolist() == [
            hashlib.sha256(YAML.encode()).hexdigest(),
            hashlib.sha256(payload).hexdigest(),
        ]
        assert art.bytes.tolist() == [len(YAML.encode()), len(payload)]
        assert art.meta.tolist() == [{}, {"metadata": "models/final.json"}]


def test_readers_return_typed_empty_frames(store: RunStore) -> None:
    _start(store)
    rounds = store.rounds(RUN)
    assert rounds.empty and "train_loss" in rounds.columns
    assert str(rounds["round"].dtype) == "Int64"
    assert store.events(RUN).empty and store.artefacts(RUN).empty and store.metrics(RUN).empty


def test_stage_records_failed_with_error_and_reraises(store: RunStore) -> None:
    _start(store)
    with pytest.raises(ValueError, match="bad site"), store.stage(RUN, "signatures"):
        raise ValueError("bad site")
    st = store.stages(RUN)
    assert st.status.tolist() == ["failed"]
    assert st.detail[0] == {"error": "ValueError: bad site"}
    assert st.finished_at.notna().all()


def test_stage_of_unknown_run_raises(store: RunStore) -> None:
    with pytest.raises(StoreError, match="no run 'nope'"), store.stage("nope", "train"):
        pass


def test_killed_mid_round_leaves_round_running_and_it_is_ignored(tmp_path: Path) -> None:
    writer = RunStore.open_run_dir(tmp_path)
    _start(writer)
    writer.start_round(RUN, "train", 1, n_sent=3)
    writer.finish_round(RUN, "train", 1, n_replied=3, n_failed=0, train_loss=0.4)
    writer.start_round(RUN, "train", 2, n_sent=3)
    # "Kill": never finish round 2 and never close this connection; a new process opens the file.
    after = RunStore.open_run_dir(tmp_path)
    try:
        assert after.last_completed_round(RUN, "train") == 1
        rounds = after.rounds(RUN, stage="train")
        assert rounds.status.tolist() == ["completed", "running"]
        assert pd.isna(rounds.finished_at[1]) and pd.isna(rounds.n_replied[1])
        assert after.runs().status.tolist() == ["running"]
        assert after.last_completed_round(RUN, "signatures") == 0
        # Resume: same digest, the stale round is closed as failed, then re-run and completed.
        _start(after)
        assert after.rounds(RUN).status.tolist() == ["completed", "failed"]
        after.start_round(RUN, "train", 2, n_sent=2)
        after.finish_round(RUN, "train", 2, n_replied=1, n_failed=1, train_loss=float("nan"))
        rounds = after.rounds(RUN)
        assert rounds.status.tolist() == ["completed", "completed"]
        assert rounds.n_sent.tolist() == [3, 2] and pd.isna(rounds.train_loss[1])
        assert after.last_completed_round(RUN) == 2
    finally:
        after.close()
        writer.close()


def test_process_killed_mid_round_leaves_a_consistent_record(tmp_path: Path) -> None:
    child = textwrap.dedent(f"""
        import os, sys
        from server.store import RunStore
        s = RunStore.open_run_dir(sys.argv[1])
        s.start_run({RUN!r}, "demo", "y", "abc123", "federated", "fedavg", 7, "simulation")
        with s.stage({RUN!r}, "train"):
            s.start_round({RUN!r}, "train", 1, n_sent=2)
            s.finish_round({RUN!r}, "train", 1, n_replied=2, n_failed=0)
            s.start_round({RUN!r}, "train", 2, n_sent=2)
            s.log_metric({RUN!r}, "train", "A", "train-loss", 0.3, round=2)
            os._exit(9)  # no finish, no close, no cleanup
        """)
    proc = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 9, proc.stderr
    with RunStore.open_run_dir(tmp_path, readonly=True) as r:
        assert r.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert r.runs().status.tolist() == ["running"]
        assert r.stages(RUN).status.tolist() == ["running"]
        assert r.rounds(RUN).status.tolist() == ["completed", "running"]
        assert r.last_completed_round(RUN) == 1
        assert r.metrics(RUN).value.tolist() == [0.3]


def test_finish_run_closes_what_is_left_running(store: RunStore) -> None:
    _start(store)
    store.start_round(RUN, "train", 1, n_sent=2)
    store.finish_run(RUN, "failed", error="FederationError: only 1 of 2 sites replied")
    run = store.runs().iloc[0]
    assert (run.status, run.error) == ("failed", "FederationError: only 1 of 2 sites replied")
    assert store.rounds(RUN).status.tolist() == ["failed"]
    assert store.last_completed_round(RUN) == 0


def test_start_run_is_idempotent_with_same_digest_and_refuses_another(store: RunStore) -> None:
    _start(store)
    store.finish_run(RUN, "interrupted", error="interrupted by the operator")
    created = store.runs().created_at[0]
    _start(store)
    _start(store)
    runs = store.runs()
    assert len(runs) == 1
    assert (runs.status[0], runs.created_at[0]) == ("running", created)
    assert pd.isna(runs.finished_at[0]) and pd.isna(runs.error[0])
    with pytest.raises(StoreError, match="config digest abc123, not zzz999"):
        _start(store, digest="zzz999")
    assert store.runs().config_digest.tolist() == ["abc123"]


def test_readonly_on_missing_file_raises_naming_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "run.db"
    with pytest.raises(StoreError, match="does not exist") as err:
        RunStore(missing, readonly=True)
    assert str(missing) in str(err.value)
    assert not missing.exists() and not missing.parent.exists()


def test_readonly_store_refuses_writes(tmp_path: Path) -> None:
    with RunStore.open_run_dir(tmp_path) as w:
        _start(w)
    with RunStore.open_run_dir(tmp_path, readonly=True) as r, pytest.raises(StoreError, match="read-only"):
        r.event(RUN, "x", "y")


def test_concurrent_reader_sees_committed_rows_while_writer_is_open(tmp_path: Path) -> None:
    writer = RunStore.open_run_dir(tmp_path)
    reader = RunStore.open_run_dir(tmp_path, readonly=True)
    try:
        assert reader.runs().empty
        _start(writer)
        writer.start_round(RUN, "train", 1, n_sent=4)
        assert reader.runs().run_id.tolist() == [RUN]
        assert reader.rounds(RUN).status.tolist() == ["running"]
        with writer.stage(RUN, "train"):
            assert reader.stages(RUN).status.tolist() == ["running"]
            writer.finish_round(RUN, "train", 1, n_replied=4, n_failed=0, train_loss=0.25)
            assert reader.last_completed_round(RUN) == 1
        assert reader.stages(RUN).status.tolist() == ["completed"]
        # A reader holding a snapshot does not block the writer (WAL).
        reader.conn.execute("BEGIN")
        reader.conn.execute("SELECT COUNT(*) FROM rounds").fetchone()
        writer.event(RUN, "checkpoint", "round 1 saved", round=1)
        reader.conn.execute("COMMIT")
        assert reader.events(RUN).kind.tolist() == ["checkpoint"]
    finally:
        reader.close()
        writer.close()


def test_nan_metric_stored_as_null_with_event(store: RunStore) -> None:
    _start(store)
    store.log_metrics(RUN, "evaluate", "B", {"post_dwi/auc": float("nan"), "post_dwi/n": 5.0}, split="test")
    store.log_metric(RUN, "evaluate", "B", "loss", math.inf, round=3)
    m = store.metrics(RUN)
    assert m.key.tolist() == ["post_dwi/auc", "post_dwi/n", "loss"]
    assert m.value.isna().tolist() == [True, False, True]
    assert m.value[1] == 5.0
    ev = store.events(RUN)
    assert ev.kind.tolist() == ["non_finite_metric", "non_finite_metric"]
    assert ev.level.tolist() == ["warning", "warning"]
    assert ev.site.tolist() == ["B", "B"]
    assert ev.detail[0] == {"key": "post_dwi/auc", "split": "test", "stage": "evaluate", "value": "nan"}
    assert ev.detail[1]["value"] == "inf" and ev["round"][1] == 3


def test_bad_values_are_refused_with_clear_errors(store: RunStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="mode must be one of"):
        store.start_run(RUN, "demo", YAML, "d", "swarm", "fedavg", 1, "simulation")
    with pytest.raises(StoreError, match="unknown run_id"):
        store.event("ghost", "x", "y")
    _start(store)
    with pytest.raises(StoreError, match="split must be one of"):
        store.log_metric(RUN, "train", "A", "loss", 0.1, split="holdout")
    with pytest.raises(StoreError, match="never started"):
        store.finish_round(RUN, "train", 9, n_replied=1, n_failed=0)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("x")
    try:
        with pytest.raises(StoreError, match="not inside the run directory"):
            store.add_artefact(RUN, "table", outside, tmp_path)
    finally:
        outside.unlink()
    with pytest.raises(StoreError, match="does not exist"):
        store.add_artefact(RUN, "table", tmp_path / "missing.csv", tmp_path)


def test_rewritten_artefact_replaces_its_row(store: RunStore, tmp_path: Path) -> None:
    _start(store)
    ck = tmp_path / "checkpoints" / "round_0001.npz"
    ck.parent.mkdir()
    ck.write_bytes(b"one")
    store.add_artefact(RUN, "checkpoint", ck, tmp_path, meta={"round": 1})
    ck.write_bytes(b"second")
    store.add_artefact(RUN, "checkpoint", ck, tmp_path, meta={"round": 1})
    art = store.artefacts(RUN)
    assert art.path.tolist() == ["checkpoints/round_0001.npz"]
    assert art.sha256[0] == hashlib.sha256(b"second").hexdigest() and art.bytes[0] == 6


def test_closed_store_raises(tmp_path: Path) -> None:
    s = RunStore.open_run_dir(tmp_path)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.runs()
