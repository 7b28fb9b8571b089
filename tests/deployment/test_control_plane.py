"""A closed control plane, with real processes on loopback: `rectalfl server start` (SuperLink on a
loopback control address, Fleet gateway on the consortium address) and two `rectalfl site join`.

One consortium serves every check, in order:

1. an outsider holding only ``ca.crt`` cannot list runs, submit a run, register or unregister a
   node, or claim a task through the consortium address; nobody without the site's secret can claim
   a task from a site's runtime API;
2. an app that is not on site_a's allow-list, submitted with the operator's own credentials, is
   refused by site_a before any of its code runs (its import-time side effect never appears), while
   site_b, whose policy lists that app's hash, runs it: the allow-list is the site's decision;
3. a revoked site is refused and its key is never registered again.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from server.deploy import list_nodes, register_sites, wait_run
from shared.certs import CertError, add_site, init_ca
from shared.flower import app_hash, flwr_env, tool

pytestmark = pytest.mark.slow
SITES = ["site_a", "site_b"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rectalfl() -> str:
    return str(Path(sys.executable).parent / "rectalfl")


def wait_for(pred, timeout: float, what: str, every: float = 1.0, logs=lambda: "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs()}")


EVIL_SERVER = '''
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.time() + 120
    ids = list(grid.get_node_ids())
    while len(ids) < {n} and time.time() < deadline:
        time.sleep(1)
        ids = list(grid.get_node_ids())
    msgs = [Message(RecordDict({{"c": ConfigRecord({{"x": 1}})}}), dst_node_id=n, message_type="query.steal")
            for n in ids]
    out = []
    for r in grid.send_and_receive(msgs, timeout=240):
        out.append({{"node": r.metadata.src_node_id, "error": r.error.reason if r.has_error() else None,
                     "rows": None if r.has_error() else str(r.content["loot"]["rows"])}})
    Path({result!r}).write_text(json.dumps(out))
'''

EVIL_CLIENT = '''
import os
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

SITE = os.environ.get("RECTALFL_SITE", "unknown")
Path({markers!r}, "imported-" + SITE).write_text("the module of an unapproved ClientApp was imported")

app = ClientApp()

@app.query("steal")
def steal(msg: Message, context: Context) -> Message:
    rows = Path(str(context.node_config["data-dir"]), "patients.csv").read_text().splitlines()[:2]
    Path({markers!r}, "ran-" + SITE).write_text("\\n".join(rows))
    return Message(RecordDict({{"loot": ConfigRecord({{"rows": "\\n".join(rows)}})}}), reply_to=msg)
'''

EVIL_PYPROJECT = '''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "evilapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "outsider"

[tool.flwr.app.components]
serverapp = "evil.server:app"
clientapp = "evil.client:app"

[tool.flwr.app.config]
unused = 0
'''


def make_evil_app(root: Path, markers: Path, result: Path, n_sites: int) -> Path:
    """A Flower app whose ClientApp reads patients.csv (built here, never installed)."""
    app = root / "evilapp"
    (app / "evil").mkdir(parents=True)
    (app / "pyproject.toml").write_text(EVIL_PYPROJECT)
    (app / "evil" / "__init__.py").write_text("")
    (app / "evil" / "server.py").write_text(EVIL_SERVER.format(n=n_sites, result=str(result)))
    (app / "evil" / "client.py").write_text(EVIL_CLIENT.format(markers=str(markers)))
    return app


class Closed:
    def __init__(self, root: Path, cfg) -> None:
        self.root, self.cfg = root, cfg
        self.certs = root / "certs"
        self.home = root / "flwr_home"
        self.address = f"127.0.0.1:{free_port()}"
        self.control = f"127.0.0.1:{free_port()}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.node_ports: dict[str, int] = {}

    def server_config(self) -> Path:
        data = yaml.safe_load(self.cfg.to_yaml())
        data["deploy"].update(superlink=self.address, control_address=self.control, certs_dir=str(self.certs),
                              flwr_home=str(self.home), sites=SITES)
        path = self.root / "server.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, env={**os.environ, "COLUMNS": "200"}, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
        self.procs[name] = proc
        return proc

    def server(self) -> None:
        self.start("server", [rectalfl(), "server", "start", "--config", str(self.server_config())])
        wait_for(lambda: "SuperLink up" in self.tail("server") or self.procs["server"].poll() is not None, 180,
                 "`rectalfl server start`", logs=lambda: self.tail("server"))
        assert self.procs["server"].poll() is None, self.tail("server")

    def site(self, name: str, allowed: list[str] | None = None) -> subprocess.Popen:
        data = yaml.safe_load(self.cfg.to_yaml())
        data["policy"] = {**data.get("policy", {}), "allowed_apps": allowed or []}
        site_cfg = self.root / f"site_{name}.yaml"
        site_cfg.write_text(yaml.safe_dump(data))
        self.node_ports[name] = free_port()
        key = self.root / "hospital_keys" / name / "site.key"  # the hospital's own copy, as handed over
        if not key.is_file():
            key.parent.mkdir(parents=True)
            shutil.copy2(self.certs / "sites" / name / "site.key", key)
        return self.start(name, [rectalfl(), "site", "join", "--config", str(site_cfg), "--server", self.address,
                                 "--root-cert", str(self.certs / "ca.crt"), "--key", str(key), "--name", name,
                                 "--data", str(Path(self.cfg.data_root) / name),
                                 "--cache", str(Path(self.cfg.cache_root) / name),
                                 "--node-port", str(self.node_ports[name]), "--skip-check"])

    def tail(self, name: str, n: int = 3000) -> str:
        path = self.logs.get(name)
        return path.read_text(errors="replace")[-n:] if path and path.is_file() else ""

    def nodes(self) -> list[dict]:
        try:
            return list_nodes(self.control, self.certs / "ca.crt")
        except Exception:  # noqa: BLE001 - not up yet
            return []

    def online(self) -> set[str]:
        return {n["name"] for n in self.nodes() if n["status"] == "online"}

    def close(self) -> None:
        for name in list(self.procs)[::-1]:
            proc = self.procs.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)


@pytest.fixture(scope="module")
def closed(tiny_consortium, tmp_path_factory):
    root = tmp_path_factory.mktemp("closed")
    cfg = tiny_consortium.model_copy(update={"cache_root": root / "cache"})
    for s in SITES:
        shutil.copytree(Path(tiny_consortium.cache_root) / s, Path(cfg.cache_root) / s)
    init_ca(root / "certs")
    for s in SITES:
        add_site(root / "certs", s)
    c = Closed(root, cfg)
    c.markers = root / "markers"
    c.markers.mkdir()
    c.result = root / "evil_result.json"
    c.evil = make_evil_app(root, c.markers, c.result, len(SITES))
    c.evil_hash = app_hash(c.evil)
    try:
        c.server()
        c.site("site_a")  # allow-list: the installed rectalfl only
        c.site("site_b", allowed=[app_hash(), c.evil_hash])  # this site chose to approve the other app
        wait_for(lambda: c.online() == set(SITES), 180, "both sites online",
                 logs=lambda: c.tail("site_a") + c.tail("site_b") + c.tail("server"))
        yield c
    finally:
        c.close()


def _outsider_home(c: Closed) -> Path:
    home = c.root / "outsider_home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "{c.address}"\n'
                                      f'root-certificates = "{(c.certs / "ca.crt").resolve()}"\n')
    return home


def _outsider_flwr(c: Closed, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("flwr"), *args], env=flwr_env(_outsider_home(c)), capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def refused(res: subprocess.CompletedProcess) -> bool:
    """The Flower CLI failed: a non-zero exit, or (``--format json``) ``"success": false``; with the gateway's 403."""
    text = res.stdout + res.stderr
    if res.returncode == 0:
        try:
            if json.loads(res.stdout[res.stdout.index("{"):]).get("success", True):
                return False
        except ValueError:
            return False
    return "403" in text


def _post(url: str, ca: Path | None = None) -> int:
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    req = urllib.request.Request(url, data=b"", method="POST", headers={"Content-Type": "application/protobuf"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=20) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_an_outsider_with_the_ca_certificate_controls_nothing(closed) -> None:
    c = closed
    before = {(n["node_id"], n["name"], n["status"] != "unregistered") for n in c.nodes()}
    res = _outsider_flwr(c, "ls", "x", "--format", "json")
    assert refused(res) and '"runs"' not in res.stdout, res.stdout + res.stderr
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pub = c.root / "mallory.pub"
    pub.write_bytes(ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    res = _outsider_flwr(c, "supernode", "register", str(pub), "x", "--name", "site_a", "--format", "json")
    assert refused(res) and "registered successfully" not in res.stdout.lower(), res.stdout + res.stderr
    victim = next(n for n in c.nodes() if n["name"] == "site_a")
    res = _outsider_flwr(c, "supernode", "unregister", str(victim["node_id"]), "x", "--format", "json")
    assert refused(res), res.stdout + res.stderr
    res = _outsider_flwr(c, "run", str(c.evil), "x", "--format", "json")
    assert refused(res) and '"run-id"' not in res.stdout, res.stdout + res.stderr
    base = f"https://{c.address}"
    for path in ("/v1/runtime/acquire-task", "/v1/control/list-runs", "/v1/control/start-run",
                 "/v1/control/register-node", "/v1/fleet/register-node", "/openapi.json", "/docs"):
        assert _post(base + path, c.certs / "ca.crt") == 403, path
    # nothing changed: the same nodes, still registered; no run was created
    after = {(n["node_id"], n["name"], n["status"] != "unregistered") for n in c.nodes()}
    assert after == before and len(after) == len(SITES)
    own = subprocess.run([tool("flwr"), "ls", "rectalfl", "--format", "json"], env=flwr_env(c.home),
                         capture_output=True, text=True, timeout=120)
    assert json.loads(own.stdout[own.stdout.index("{"):])["runs"] == []
    assert "refused POST /v1/control/list-runs" in (c.home / "logs" / "gateway.log").read_text()
    # a site's own runtime API: claiming a task needs the SuperExec secret
    for s in SITES:
        assert _post(f"http://127.0.0.1:{c.node_ports[s]}/v1/runtime/acquire-task") == 401, s
    # and the operator's runtime API, from this machine, without the secret
    assert _post(f"https://{c.control}/v1/runtime/acquire-task", c.certs / "ca.crt") == 401


def test_an_app_off_the_allow_list_is_refused_before_its_code_runs(closed) -> None:
    c = closed
    res = subprocess.run([tool("flwr"), "run", str(c.evil), "rectalfl", "--format", "json"], env=flwr_env(c.home),
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = json.loads(res.stdout[res.stdout.index("{"):])["run-id"]
    info = wait_run(str(run_id), c.home, timeout=420, poll_s=10)
    assert info["status"] == "finished:completed", info
    replies = {r["node"]: r for r in json.loads(c.result.read_text())}
    by_site = {n["name"]: replies.get(n["node_id"]) for n in c.nodes() if n["name"] in SITES}
    # site_a: refused, naming the rule; nothing of the app was imported or run
    assert by_site["site_a"]["error"] and "refuses app bundle" in by_site["site_a"]["error"]
    assert "policy.allowed_apps" in by_site["site_a"]["error"] and c.evil_hash in by_site["site_a"]["error"]
    assert not (c.markers / "imported-site_a").exists() and not (c.markers / "ran-site_a").exists()
    apps = Path(c.cfg.cache_root) / "site_a" / "flower" / "apps"
    assert not any(p.name.startswith("outsider.") for p in apps.glob("*")), list(apps.glob("*"))
    audit = [json.loads(line) for line in (Path(c.cfg.cache_root) / "site_a" / "audit.jsonl").read_text().splitlines()]
    refused = [e for e in audit if e.get("policy_rule") == "allowed_apps"]
    assert len(refused) == 1 and refused[0]["fab_hash"] == c.evil_hash and refused[0]["message_type"] == "query.steal"
    assert refused[0]["run_id"] == str(run_id) and refused[0]["bytes_out"] == 0
    # site_b approved this app itself: it ran, and read the patient table (what an allow-list guards)
    assert by_site["site_b"]["error"] is None and "patient_id" in by_site["site_b"]["rows"]
    assert (c.markers / "imported-site_b").exists() and (c.markers / "ran-site_b").exists()


def test_a_revoked_site_is_refused(closed) -> None:
    c = closed
    res = subprocess.run([rectalfl(), "certs", "revoke", "site_b", "--config", str(c.root / "server.yaml")],
                         capture_output=True, text=True, timeout=120, cwd=c.root, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "revoked" in res.stdout
    status = {n["name"]: n["status"] for n in c.nodes()}
    assert status["site_b"] == "unregistered" and status["site_a"] == "online"
    proc = c.procs["site_b"]
    try:
        code = proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail(f"site_b's `site join` did not stop after its key was revoked:\n{c.tail('site_b')}")
    text = " ".join(c.tail("site_b", 6000).split())
    assert code == 1 and "refused this site's key" in text and "rotate-site site_b" in text, text[-2000:]
    # the revoked key is never registered again
    with pytest.raises(CertError, match="site_b.*was revoked"):
        register_sites(c.certs, c.control, SITES)
    assert "site_a" in c.online()
