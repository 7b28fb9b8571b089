"""The dashboard's HTTP surface (server/dashboard): every endpoint, access control, files, read-only records.

Run records are written with the real RunStore API (server.dashboard.synthetic and inline), so the
tests break if the record's schema drifts away from what the dashboard reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note about httpx versions
    from fastapi.testclient import TestClient

from server.dashboard import create_app
from server.dashboard.security import COOKIE, session_value
from server.dashboard.synthetic import write_synthetic_run
from server.store import RunStore

TOKEN = "t0ken-for-tests-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HTML = {"Accept": "text/html"}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    write_synthetic_run(root, "run-a", name="fedavg-demo", n_rounds=4, n_sites=3, dp=True, seed=1)
    write_synthetic_run(root, "run-b", name="fedprox-demo", n_rounds=4, n_sites=3, strategy="fedprox", seed=2)
    # a run still going: training stopped after round 2 of 5, status 'running'
    write_synthetic_run(root, "run-live", name="live", n_rounds=2, n_sites=2, finish=False, drop_site_in_round=None)
    # a secret next to the runs folder, and links that try to reach it
    secret = root.parent / "outside-secret.txt"
    secret.write_text("do not serve me")
    (root / "run-a" / "escape.txt").symlink_to(secret)
    (root / "run-a" / "escape-dir").symlink_to(root.parent, target_is_directory=True)
    (root / "run-a" / ".hidden").write_text("hidden")
    return root


@pytest.fixture(scope="module")
def client(runs_root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(runs_root, TOKEN, poll_interval=0.05)) as c:
        yield c


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


ENDPOINTS = [
    "/",
    "/?q=fedprox",
    "/runs/run-a",
    "/compare?run=run-a&run=run-b",
    "/runs/run-a/files/report.html",
    "/runs/run-a/files/tables/table3_performance.csv",
    "/runs/run-a/files/",
    "/runs/run-a/files/tables",
    "/api/runs",
    "/api/runs/run-a",
    "/api/runs/run-a?series=0",
    "/api/compare?run=run-a&run=run-b",
    "/api/runs/run-a/stream",
    "/static/minichart.js",
    "/static/dashboard.css",
]


@pytest.mark.parametrize("url", ENDPOINTS)
def test_every_endpoint_needs_the_token(client: TestClient, url: str) -> None:
    assert client.get(url, headers=AUTH).status_code == 200
    anon = client.get(url)
    assert anon.status_code == 401
    assert anon.headers["www-authenticate"].startswith("Bearer")
    assert "run-a" not in anon.text and "fedavg-demo" not in anon.text
    assert client.get(url, headers={"Authorization": "Bearer " + TOKEN[:-1] + "X"}).status_code == 401
    assert client.get(url, headers={"Authorization": "Basic " + TOKEN}).status_code == 401
    forged = TestClient(client.app, cookies={COOKIE: "forged"})
    assert forged.get(url).status_code == 401


def test_unknown_paths_are_401_before_404(client: TestClient) -> None:
    assert client.get("/no/such/page").status_code == 401
    assert client.get("/no/such/page", headers=AUTH).status_code == 404


@pytest.mark.parametrize("url", ["/runs/nope", "/api/runs/nope", "/api/runs/nope/stream", "/runs/nope/files/x",
                                 "/compare?run=run-a&run=nope", "/api/compare?run=nope&run=run-a"])
def test_unknown_run_is_404(client: TestClient, url: str) -> None:
    r = client.get(url, headers=AUTH)
    assert r.status_code == 404
    assert "nope" in r.text


def test_404_page_for_browsers_is_html(client: TestClient) -> None:
    r = client.get("/runs/nope", headers={**AUTH, **HTML})
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("text/html")
    assert 'id="error-detail">no run &#39;nope&#39;' in r.text


def test_login_link_sets_a_cookie_without_the_token_and_redirects_without_it(client: TestClient) -> None:
    r = client.get(f"/runs/run-a?token={TOKEN}&x=1", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/runs/run-a?x=1"
    cookie = r.headers["set-cookie"]
    assert f"{COOKIE}={session_value(TOKEN)}" in cookie
    assert TOKEN not in cookie
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    # the cookie alone opens pages, the API and the live stream (EventSource cannot send headers)
    fresh = TestClient(client.app, cookies={COOKIE: session_value(TOKEN)})
    for url in ("/runs/run-a", "/api/runs", "/api/runs/run-a/stream"):
        assert fresh.get(url).status_code == 200
    fresh = TestClient(client.app)
    # a wrong token in the link is refused, and sets nothing
    bad = fresh.get("/runs/run-a?token=wrong-token-0000000000", follow_redirects=False)
    assert bad.status_code == 401
    assert "set-cookie" not in bad.headers


def test_login_link_never_redirects_to_another_host(client: TestClient) -> None:
    # an HTTP client would read "//evil.example/" as a host: send the raw path to the ASGI app itself
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "//evil.example/x", "raw_path": b"//evil.example/x",
             "query_string": f"token={TOKEN}".encode(), "headers": [], "root_path": ""}
    anyio.run(client.app, scope, receive, send)
    start = sent[0]
    assert start["status"] == 303
    location = dict(start["headers"])[b"location"].decode()
    assert location == "/evil.example/x"


@pytest.mark.parametrize("rel", [
    "..%2f..%2foutside-secret.txt",
    "%2e%2e/%2e%2e/outside-secret.txt",
    "%2E%2E%2F%2E%2E%2Foutside-secret.txt",
    "tables/..%2f..%2frun-b/run.db",
    "escape.txt",  # a symlink out of the runs folder
    "escape-dir/outside-secret.txt",  # a folder symlink out of it
    "%2Fetc%2Fpasswd",  # absolute
    "..%5c..%5coutside-secret.txt",  # backslashes
    ".hidden",
    "tables%00.csv",
])
def test_files_outside_the_run_directory_are_refused(client: TestClient, rel: str) -> None:
    r = client.get(f"/runs/run-a/files/{rel}", headers=AUTH)
    assert r.status_code in (403, 404), (rel, r.status_code)
    assert "do not serve me" not in r.text
    assert "root:" not in r.text


def test_traversal_through_the_run_id_is_refused(client: TestClient) -> None:
    for url in ("/runs/%2e%2e/files/outside-secret.txt", "/runs/..%2frun-a", "/api/runs/%2e%2e",
                "/runs/.hidden/files/x"):
        r = client.get(url, headers=AUTH)
        assert r.status_code == 404, url
        assert "do not serve me" not in r.text


def test_files_are_served_with_a_sandbox_policy(client: TestClient, runs_root: Path) -> None:
    r = client.get("/runs/run-a/files/report.html", headers=AUTH)
    assert r.text == (runs_root / "run-a" / "report.html").read_text()
    assert r.headers["content-security-policy"].startswith("sandbox")
    assert r.headers["x-content-type-options"] == "nosniff"
    csv_text = client.get("/runs/run-a/files/tables/signature_auc.csv", headers=AUTH)
    assert csv_text.headers["content-type"].startswith("text/plain")
    model = client.get("/runs/run-a/files/models/final.npz", headers=AUTH)
    assert model.headers["content-disposition"].startswith("attachment")
    listing = client.get("/runs/run-a/files/", headers=AUTH).text
    assert "report.html" in listing and "tables/" in listing and ".hidden" not in listing


def test_pages_have_a_strict_content_security_policy(client: TestClient) -> None:
    r = client.get("/runs/run-a", headers=AUTH)
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "<script>" not in r.text  # no inline script: the policy would block it
    assert "http://" not in r.text.replace("http://www.w3.org", "") and "https://" not in r.text  # no CDN


def test_runs_list_shows_each_run_with_its_facts(client: TestClient) -> None:
    data = client.get("/api/runs", headers=AUTH).json()
    rows = {r["run_id"]: r for r in data["runs"]}
    assert set(rows) == {"run-a", "run-b", "run-live"}
    a = rows["run-a"]
    assert a["status"] == "completed" and a["engine"] == "simulation" and a["strategy"] == "fedavg"
    assert a["n_sites"] == 4  # 3 training + 1 external
    assert a["stages_done"] == ["discover", "train", "signatures", "evaluate", "analysis", "report"]
    assert a["progress"]["rounds_done"] == 4 and a["progress"]["rounds_total"] == 4
    assert [h["label"] for h in a["headline"]] == ["FDL", "CR", "CRD"]
    assert {h["cohort"] for h in a["headline"]} == {"internal_test"}
    assert a["report"] == "report.html"
    live = rows["run-live"]
    assert live["status"] == "running" and live["current_stage"] is None and live["headline"] == []
    html = client.get("/", headers=AUTH).text
    for name in ("fedavg-demo", "fedprox-demo", "live"):
        assert name in html
    filtered = client.get("/api/runs?q=FEDPROX", headers=AUTH).json()["runs"]
    assert [r["run_id"] for r in filtered] == ["run-b"]
    assert [r["run_id"] for r in client.get("/api/runs?status=running", headers=AUTH).json()["runs"]] == ["run-live"]


def test_run_detail_numbers_match_what_was_recorded(client: TestClient, runs_root: Path) -> None:
    d = client.get("/api/runs/run-a", headers=AUTH).json()
    with RunStore.open_run_dir(runs_root / "run-a", readonly=True) as store:
        rounds = store.rounds("run-a", "train")
        metrics = store.metrics("run-a", "train")
        events = store.events("run-a")
    sites = {s["site"]: s for s in d["sites"]}
    assert set(sites) == {"site_01", "site_02", "site_03", "ext_01"}
    for name, s in sites.items():
        own = metrics[metrics["site"] == name]
        assert s["rounds_joined"] == own["round"].nunique()
        assert s["failures"] == int(((events["site"] == name) & events["kind"].isin(
            ["site_failed", "site_dropped"])).sum())
        assert s["rejected_updates"] == int(((events["site"] == name) & (events["kind"] == "update_rejected")).sum())
    # the synthetic run drops site_03 and rejects site_01 in round 2
    assert sites["site_03"]["failures"] == 1 and sites["site_01"]["rejected_updates"] == 1
    assert sites["site_01"]["role"] == "train" and sites["ext_01"]["role"] == "external"
    # bytes: each round's payload shared equally by the sites it went to / came from
    expect_down = sum(r.bytes_down / r.n_sent for r in rounds.itertuples())
    assert sites["site_02"]["bytes_to_site"] == round(expect_down)
    assert sites["site_02"]["bytes_from_site"] == round(sum(r.bytes_up / r.n_replied for r in rounds.itertuples()))
    # site_01's round-2 update was rejected: nothing of it counts as received
    assert sites["site_01"]["bytes_from_site"] == round(
        sum(r.bytes_up / r.n_replied for r in rounds.itertuples() if r.round != 2))
    # DP: epsilon is the site's largest (cumulative) recorded spend
    eps = metrics[(metrics["site"] == "site_02") & (metrics["key"] == "epsilon")]["value"].max()
    assert sites["site_02"]["epsilon"] == pytest.approx(eps)
    assert d["progress"]["rounds_done"] == 4 and d["progress"]["eta_s"] is None
    assert [s["name"] for s in d["stages"]] == ["discover", "train", "signatures", "evaluate", "analysis", "report"]
    # consortium loss per backbone: case-weighted mean of the sites' losses in the round
    r1 = metrics[(metrics["round"] == 1) & (metrics["key"] == "pre_t2w/train-loss")]
    w = metrics[(metrics["round"] == 1) & (metrics["key"] == "pre_t2w/n")].set_index("site")["value"]
    expect = float((r1.set_index("site")["value"] * w).sum() / w.sum())
    assert d["loss"]["consortium"]["pre_t2w"][0] == [1, pytest.approx(expect)]
    assert len(d["loss"]["sites"]["site_02"]["pre_t2w"]) == 4
    assert {a["key"] for a in d["aucs"]} >= {"pre_t2w/auc", "FDL/auc"}
    assert d["n_events"] == len(events)
    assert "federation:" in d["config"]
    assert {a["kind"] for a in d["artefacts"]} >= {"config", "model", "table", "report"}


def test_run_page_renders_panels(client: TestClient) -> None:
    html = client.get("/runs/run-a", headers=AUTH).text
    for marker in ('id="rounds-done">4<', 'id="sites-table"', 'data-site="site_03"', 'id="events-table"',
                   "update_rejected", "site_dropped", 'id="auc-table"', 'id="report-link"', 'id="config"',
                   'data-stage="analysis"'):
        assert marker in html, marker


def test_running_run_has_an_eta_and_pending_stages(client: TestClient) -> None:
    d = client.get("/api/runs/run-live", headers=AUTH).json()
    assert d["run"]["status"] == "running"
    assert d["progress"]["rounds_done"] == 2 and d["progress"]["rounds_total"] == 2
    pending = [s["name"] for s in d["stages"] if s["status"] == "pending"]
    assert pending == ["signatures", "evaluate", "analysis", "report"]


def test_compare_puts_runs_side_by_side(client: TestClient) -> None:
    cmp = client.get("/api/compare?run=run-a&run=run-b", headers=AUTH).json()
    assert [x["run"]["run_id"] for x in cmp["runs"]] == ["run-a", "run-b"]
    assert cmp["config_diff"]["federation.strategy"] == ["fedavg", "fedprox"]
    assert cmp["config_diff"]["privacy.dp"] == [True, False]
    fdl = next(r for r in cmp["table3"] if r["model"] == "FDL" and r["cohort"] == "internal_test")
    assert all(isinstance(v, float) for v in fdl["aucs"])
    assert len(cmp["runs"][0]["loss"]) == 4
    html = client.get("/compare?run=run-a&run=run-b", headers=AUTH).text
    assert 'id="compare-table3"' in html and "fedprox" in html
    assert client.get("/api/compare?run=run-a", headers=AUTH).status_code == 400


def test_stream_of_a_finished_run_sends_one_update_then_done(client: TestClient) -> None:
    r = client.get("/api/runs/run-a/stream", headers=AUTH)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [block for block in r.text.split("\n\n") if block.startswith("event:")]
    assert [e.splitlines()[0] for e in events] == ["event: update", "event: done"]
    snap = json.loads(events[0].splitlines()[1][len("data: "):])
    assert snap["rounds_done"] == 4 and snap["status"] == "completed"


def test_stream_of_a_running_run_reports_new_rounds(runs_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_synthetic_run(root, "r", n_rounds=1, n_sites=2, finish=False, drop_site_in_round=None)
    app = create_app(root, TOKEN, poll_interval=0.05, stream_limit_s=0.6)
    with TestClient(app) as c:
        first = c.get("/api/runs/r/stream", headers=AUTH).text
        with RunStore.open_run_dir(root / "r") as store:
            store.start_round("r", "train", 2, n_sent=2)
            store.finish_round("r", "train", 2, n_replied=2, n_failed=0, train_loss=0.4)
        second = c.get("/api/runs/r/stream", headers=AUTH).text
    assert '"rounds_done": 1' in first and "event: done" not in first
    assert '"rounds_done": 2' in second


def test_the_dashboard_never_writes_the_records(runs_root: Path) -> None:
    before = _digest(runs_root)
    with TestClient(create_app(runs_root, TOKEN, poll_interval=0.05)) as c:
        for url in ENDPOINTS:
            c.get(url, headers=AUTH)
    after = _digest(runs_root)
    assert before == after


def test_unreadable_record_is_listed_as_a_problem_not_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_synthetic_run(root, "good", n_rounds=1, n_sites=2)
    (root / "broken").mkdir()
    (root / "broken" / "run.db").write_bytes(b"this is not sqlite" * 10)
    with TestClient(create_app(root, TOKEN)) as c:
        data = c.get("/api/runs", headers=AUTH).json()
    assert [r["run_id"] for r in data["runs"]] == ["good"]
    assert any("broken" in p["path"] for p in data["problems"])


def test_create_app_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="runs folder"):
        create_app(tmp_path / "missing", TOKEN)
    with pytest.raises(ValueError, match="at least 16"):
        create_app(tmp_path, "short")
    with pytest.raises(ValueError, match="poll_interval"):
        create_app(tmp_path, TOKEN, poll_interval=0)


def test_symlinked_run_folder_pointing_outside_is_not_a_run(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    write_synthetic_run(outside, "foreign", n_rounds=1, n_sites=2)
    root = tmp_path / "runs"
    root.mkdir()
    os.symlink(outside / "foreign", root / "foreign", target_is_directory=True)
    with TestClient(create_app(root, TOKEN)) as c:
        assert c.get("/api/runs", headers=AUTH).json()["runs"] == []
        assert c.get("/api/runs/foreign", headers=AUTH).status_code == 404


def test_cached_metric_aggregates_follow_new_rows_and_replaced_records(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_synthetic_run(root, "r", n_rounds=2, n_sites=2, finish=False, drop_site_in_round=None)
    with TestClient(create_app(root, TOKEN)) as c:
        before = c.get("/api/runs/r", headers=AUTH).json()
        with RunStore.open_run_dir(root / "r") as store:
            store.start_round("r", "train", 3, n_sent=2)
            store.log_metrics("r", "train", "site_01", {"pre_t2w/train-loss": 0.125, "pre_t2w/n": 10.0,
                                                        "num-examples": 77.0}, round=3, split="train")
            store.finish_round("r", "train", 3, n_replied=1, n_failed=1, train_loss=0.125)
        after = c.get("/api/runs/r", headers=AUTH).json()
        # the same path now holds a different record (deleted and written again)
        shutil.rmtree(root / "r")
        write_synthetic_run(root, "r", n_rounds=1, n_sites=2, finish=False, drop_site_in_round=None, seed=9)
        replaced = c.get("/api/runs/r", headers=AUTH).json()
    site = {s["site"]: s for s in after["sites"]}["site_01"]
    assert {s["site"]: s for s in before["sites"]}["site_01"]["rounds_joined"] == 2
    assert site["rounds_joined"] == 3 and site["training_patients"] == 77
    assert after["loss"]["sites"]["site_01"]["pre_t2w"][-1] == [3, 0.125]
    assert {s["site"]: s for s in replaced["sites"]}["site_01"]["rounds_joined"] == 1
    assert len(replaced["loss"]["sites"]["site_01"]["pre_t2w"]) == 1
