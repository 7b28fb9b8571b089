"""`site audit`: reading the site's audit log (client/audit.py).

The log is written by the ClientApp's own ``audit`` function from real Flower messages, so the test
breaks if the two drift apart; lines with the newer fields (run_id, refused, policy_rule) and a
half-written line are appended by hand, as a newer or killed ClientApp would leave them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import typer
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from typer.testing import CliRunner

from client.audit import UNKNOWN_RUN, AuditError, audit, build_report, read_audit, render_html, report_to_dict
from client.client_app import audit as write_audit


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from flwr.supercore.task_identity import TaskIdentity

    # Flower stamps Messages with the running app's identity; outside a running app, give it one
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    site = SimpleNamespace(cache_dir=tmp_path / "cache")
    weights = ArrayRecord({"w": Array(np.zeros(1000, dtype=np.float32))})
    for rnd in (1, 2):
        msg = Message(RecordDict({"config": ConfigRecord({"server-round": rnd, "rectalfl-config": "name: x"}),
                                  "arrays": weights}), dst_node_id=7, message_type="train")
        reply = Message(RecordDict({"arrays": weights, "metrics": MetricRecord({"num-examples": 12, "train-loss": 0.5}),
                                    "site": ConfigRecord({"name": "site_a"})}), reply_to=msg)
        write_audit(site, msg, reply)
    bad = Message(RecordDict({"config": ConfigRecord({"rectalfl-config": "name: x"})}), dst_node_id=7,
                  message_type="evaluate.stats")
    write_audit(site, bad, Message(Error(code=4200, reason="site site_a failed: ValueError: no signatures"),
                                   reply_to=bad))
    log = site.cache_dir / "audit.jsonl"
    with log.open("a") as fh:
        fh.write(json.dumps({"time": "2030-01-01T10:00:00+00:00", "run_id": "run-2", "message_type": "evaluate.stats",
                             "server_round": 0, "bytes_in": 500, "bytes_out": 120,
                             "sent": {"metrics": ["q1/n", "q1/sum"], "site": ["name"]}}) + "\n")
        fh.write(json.dumps({"time": "2030-01-01T10:00:05+00:00", "run_id": "run-2", "message_type": "evaluate.stats",
                             "bytes_in": 480, "bytes_out": 60, "sent": {}, "refused": "asks for a column outside "
                             "the site's allow-list", "policy_rule": "privacy.columns", "new_field": 42}) + "\n")
        fh.write('{"time": "2030-01-01T10:00:09+00:00", "run_id": "run-2", "message_ty')  # killed mid-write
    return site.cache_dir


def test_every_message_is_read_with_what_left(cache: Path) -> None:
    path, entries, problems = read_audit(cache)
    assert path == cache / "audit.jsonl"
    assert len(entries) == 5
    assert len(problems) == 1 and re.fullmatch(r"line 6: not JSON \(.+\); skipped", problems[0])
    train = entries[0]
    assert train.message_type == "train" and train.server_round == 1 and train.outcome == "answered"
    assert train.sent["metrics"] == ["num-examples", "train-loss"] and train.sent["arrays"] == "1 arrays"
    assert train.bytes_in > 4000 and train.bytes_out > 4000  # 1000 float32 weights each way
    assert entries[2].outcome == "error" and "no signatures" in entries[2].error and entries[2].bytes_out == 0
    refused = entries[4]
    assert refused.refused and refused.policy_rule == "privacy.columns" and refused.outcome == "refused"
    assert refused.server_round is None and refused.extra == {"new_field": 42}


def test_totals_per_run(cache: Path) -> None:
    report = build_report(cache)
    runs = {r.run_id: r for r in report.runs}
    assert set(runs) == {UNKNOWN_RUN, "run-2"}  # the current ClientApp does not log run ids yet
    old = runs[UNKNOWN_RUN]
    _, entries, _ = read_audit(cache)
    assert (old.messages, old.answered, old.errors, old.refused) == (3, 2, 1, 0)
    assert old.bytes_in == sum(e.bytes_in for e in entries[:3])
    assert old.bytes_out == sum(e.bytes_out for e in entries[:3])
    assert old.by_type["train"]["messages"] == 2 and old.by_type["evaluate.stats"]["errors"] == 1
    assert old.keys_left["metrics"] == ["num-examples", "train-loss"]
    new = runs["run-2"]
    assert (new.messages, new.refused, new.bytes_in, new.bytes_out) == (2, 1, 980, 180)
    assert new.rules == {"privacy.columns": 1}
    assert new.keys_left == {"metrics": ["q1/n", "q1/sum"], "site": ["name"]}
    only = build_report(cache, run="run-2")
    assert [r.run_id for r in only.runs] == ["run-2"]
    with pytest.raises(AuditError, match="run-9.*runs there: .*run-2"):
        build_report(cache, run="run-9")


def test_html_page_is_self_contained_and_escapes_what_it_shows(cache: Path) -> None:
    log = cache / "audit.jsonl"
    with log.open("a") as fh:
        fh.write("\n" + json.dumps({"time": "t", "run_id": "<script>alert(1)</script>", "message_type": "x",
                                    "sent": {"<img src=x>": ["k"]}}) + "\n")
    page = render_html(build_report(cache))
    assert "<script" not in page and "<img" not in page and "&lt;script&gt;" in page
    for external in ("http://", "https://", "<link", "@import", "url("):
        assert external not in page, external
    assert not re.search(r"<[a-zA-Z][^>]*\s(?:src|href|action)\s*=", page)  # no tag loads anything
    assert "privacy.columns" in page and "no signatures" in page and "num-examples, train-loss" in page
    assert "line 6: not JSON" in page


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("audit")(audit)

    @app.command("noop")
    def _noop() -> None:  # a second command, so typer keeps "audit" as a sub-command name
        pass

    return app


def test_cli_prints_writes_html_and_json(cache: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    page = tmp_path / "dpo" / "audit.html"
    res = runner.invoke(_cli(), ["audit", "--cache", str(cache), "--html", str(page)], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "refused (privacy.columns)" in res.output and "num-examples" in res.output
    assert page.read_text().startswith("<!doctype html>")
    res = runner.invoke(_cli(), ["audit", "--cache", str(cache / "audit.jsonl"), "--run", "run-2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # stdout alone: a log line on stderr (e.g. a warning) is not part of the JSON
    assert data == json.loads(json.dumps(report_to_dict(build_report(cache, "run-2")) | {
        "generated_at": data["generated_at"]}))
    assert [e["outcome"] for e in data["runs"][0]["entries"]] == ["answered", "refused"]
    assert data["runs"][0]["entries"][1]["new_field"] == 42


def test_cli_names_a_wrong_cache_folder(tmp_path: Path) -> None:
    res = CliRunner().invoke(_cli(), ["audit", "--cache", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = CliRunner().invoke(_cli(), ["audit", "--cache", str(tmp_path)])
    assert res.exit_code == 2 and "no audit log" in res.output and "cache-dir" in res.output
