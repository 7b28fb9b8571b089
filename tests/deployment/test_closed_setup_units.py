"""The closed control plane's parts, without Flower processes: key files, revocation, server
certificate renewal, the gateway's rule, the site's app gate, node identity and the run progress
reader (fast)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shared.certs import (
    CertError,
    add_site,
    consortium_keys,
    init_ca,
    key_fingerprint,
    renew_server,
    revoke_site,
    revoked_keys,
    rotate_site,
    server_hosts,
    site_public_keys,
    write_file,
)


# ------------------------------------------------------------------ keys 0600 from the first byte
def test_private_keys_are_created_0600_before_any_byte_is_written(tmp_path, monkeypatch):
    """Every file is created by os.open with O_EXCL; a private key's mode is 0600 at creation, even with
    a permissive umask (the old code wrote a 0644 temporary file and chmod-ed it afterwards)."""
    created: dict[str, int] = {}
    real_open = os.open

    def spy(path, flags, mode=0o777, *a, **kw):
        fd = real_open(path, flags, mode, *a, **kw)
        if flags & os.O_CREAT:
            assert flags & os.O_EXCL, f"{path} opened without O_EXCL"
            created[Path(path).name] = stat.S_IMODE(os.fstat(fd).st_mode)  # before the first write
        return fd

    monkeypatch.setattr(os, "open", spy)
    old = os.umask(0)
    try:
        init_ca(tmp_path, ["fl.example"])
        add_site(tmp_path, "site_a")
        renew_server(tmp_path, ["other.example"])
    finally:
        os.umask(old)
    private = {name: mode for name, mode in created.items() if any(k in name for k in ("ca.key", "server.key",
                                                                                          "site.key"))}
    # ca.key, server.key (twice: init and renew), site.key: each created 0600, never wider
    assert len(private) >= 3 and set(private.values()) == {0o600}, created
    public = {name: mode for name, mode in created.items() if name.endswith(".crt.tmp") or ".pub." in name}
    assert public and set(public.values()) == {0o644}
    for p in tmp_path.rglob("*"):
        if p.is_file() and b"PRIVATE KEY" in p.read_bytes():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert not list(tmp_path.rglob("*.tmp"))  # temporary files never stay behind


def test_write_file_refuses_a_planted_temporary_file(tmp_path, monkeypatch):
    """O_EXCL: the temporary name cannot be pre-created (or be a symlink) to capture the key."""
    import secrets

    monkeypatch.setattr(secrets, "token_hex", lambda n: "fixed")
    (tmp_path / ".site.key.fixed.tmp").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        write_file(tmp_path / "site.key", b"secret", private=True)
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "site.key").exists()


def test_fingerprint_is_the_same_for_the_openssh_and_pem_forms(tmp_path):
    init_ca(tmp_path)
    files = add_site(tmp_path, "site_a")
    pem = serialization.load_ssh_public_key(files["pub"].read_bytes()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key_fingerprint(files["pub"]) == key_fingerprint(pem)  # Flower's NodeInfo carries the PEM form
    other = add_site(tmp_path, "site_b")
    assert key_fingerprint(other["pub"]) != key_fingerprint(files["pub"])
    with pytest.raises(CertError, match="not an EC public key"):
        key_fingerprint(b"not a key")


# ------------------------------------------------------------------ revocation, rotation, renewal
def test_revoked_keys_are_refused_and_expected_sites_come_from_the_config(tmp_path):
    init_ca(tmp_path)
    for s in ("site_a", "site_b", "stray_test_key"):
        add_site(tmp_path, s)
    keys = consortium_keys(tmp_path, ["site_a", "site_b"])
    assert set(keys) == {"site_a", "site_b"}  # the stray key in certs/sites is not a member
    with pytest.raises(CertError, match="deploy.sites lists site_c.*certs add-site site_c"):
        consortium_keys(tmp_path, ["site_a", "site_c"])
    old_fp = key_fingerprint(keys["site_b"])
    done = revoke_site(tmp_path, "site_b")
    assert done["fingerprint"] == old_fp and old_fp in revoked_keys(tmp_path)
    assert Path(done["moved_to"]).joinpath("site.key").is_file() and "site_b" not in site_public_keys(tmp_path)
    with pytest.raises(CertError, match="site_b.*was revoked"):
        consortium_keys(tmp_path, ["site_a", "site_b"])
    # putting the revoked key back does not make it a member again
    (tmp_path / "sites" / "site_b").mkdir()
    (tmp_path / "sites" / "site_b" / "site.pub").write_bytes(Path(done["moved_to"], "site.pub").read_bytes())
    with pytest.raises(CertError, match="rotate-site site_b"):
        consortium_keys(tmp_path, ["site_b"])
    (tmp_path / "sites" / "site_b" / "site.pub").unlink()
    (tmp_path / "sites" / "site_b").rmdir()
    new = add_site(tmp_path, "site_b")  # a new key for the same hospital
    assert key_fingerprint(new["pub"]) != old_fp and set(consortium_keys(tmp_path, ["site_b"])) == {"site_b"}


def test_rotate_site_revokes_the_old_key(tmp_path):
    init_ca(tmp_path)
    old = key_fingerprint(add_site(tmp_path, "site_a")["pub"])
    with pytest.raises(CertError, match="rotate-site site_a"):
        add_site(tmp_path, "site_a")
    new = rotate_site(tmp_path, "site_a")
    assert key_fingerprint(new["pub"]) != old and old in revoked_keys(tmp_path)
    assert revoked_keys(tmp_path)[old]["reason"] == "rotated"


def test_renew_server_keeps_the_ca_and_adds_host_names(tmp_path):
    init_ca(tmp_path, ["fl.hospital.example"])
    ca_before = (tmp_path / "ca.crt").read_bytes()
    key_before = (tmp_path / "server.key").read_bytes()
    names = renew_server(tmp_path, ["10.0.0.7", "fl2.hospital.example"])
    assert (tmp_path / "ca.crt").read_bytes() == ca_before  # every site keeps its ca.crt
    assert (tmp_path / "server.key").read_bytes() != key_before
    assert {"fl.hospital.example", "fl2.hospital.example", "10.0.0.7", "localhost", "127.0.0.1"} <= set(names)
    assert set(server_hosts(tmp_path)) == set(names)
    ca = x509.load_pem_x509_certificate(ca_before)
    srv = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    from cryptography.hazmat.primitives.asymmetric import ec

    ca.public_key().verify(srv.signature, srv.tbs_certificate_bytes, ec.ECDSA(srv.signature_hash_algorithm))
    (tmp_path / "ca.key").unlink()
    with pytest.raises(CertError, match="ca.key"):
        renew_server(tmp_path)


def test_cli_revoke_and_renew(tmp_path):
    from typer.testing import CliRunner

    from rectalfl import app

    r = CliRunner()
    d = str(tmp_path / "c")
    assert r.invoke(app, ["certs", "init", "--dir", d]).exit_code == 0
    assert r.invoke(app, ["certs", "add-site", "site_a", "--dir", d]).exit_code == 0
    res = r.invoke(app, ["certs", "revoke", "site_a", "--dir", d])
    assert res.exit_code == 0 and "revoked" in res.output, res.output
    res = r.invoke(app, ["certs", "revoke", "site_a", "--dir", d])
    assert res.exit_code == 2 and "nothing to revoke" in " ".join(res.output.split())
    res = r.invoke(app, ["certs", "renew-server", "--dir", d, "--host", "fl.example"])
    assert res.exit_code == 0 and "fl.example" in res.output


# ------------------------------------------------------------------ config
def test_control_address_must_be_loopback():
    from shared.config import ConfigError, parse_config

    assert parse_config({"deploy": {"control_address": "127.0.0.1:9000"}}).deploy.control_address == "127.0.0.1:9000"
    with pytest.raises(ConfigError, match="deploy.control_address.*not a loopback address"):
        parse_config({"deploy": {"control_address": "0.0.0.0:9092"}})
    with pytest.raises(ConfigError, match="deploy.sites.*unique"):
        parse_config({"deploy": {"sites": ["a", "a"]}})


# ------------------------------------------------------------------ the gateway's rule
def test_the_gateway_passes_only_a_supernodes_fleet_calls():
    from server.gateway import allowed

    for call in ("pull-messages", "push-messages", "activate-node", "send-node-heartbeat", "get-fab", "pull-object"):
        assert allowed("POST", f"/v1/fleet/{call}")
    for method, path in [("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/register-node"),
                         ("POST", "/v1/fleet/unregister-node"), ("POST", "/v1/control/list-runs"),
                         ("POST", "/v1/control/start-run"), ("POST", "/v1/runtime/acquire-task"),
                         ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/v1/fleet/pull-messages/../x"),
                         ("POST", "/v1/fleet/"), ("POST", "/health")]:
        assert not allowed(method, path), (method, path)


def test_the_gateway_app_refuses_without_reaching_the_superlink(tmp_path):
    """The ASGI app itself: a refused path answers 403 and never opens a connection upstream."""
    import asyncio

    import httpx

    from server.gateway import create_app

    init_ca(tmp_path)
    app = create_app("127.0.0.1:9", tmp_path / "ca.crt")  # port 9: nothing listens; a forward would give 502

    async def calls() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://fl") as client:
            return [(await client.post("/v1/control/list-runs")).status_code,
                    (await client.get("/docs")).status_code,
                    (await client.post("/v1/runtime/acquire-task")).status_code,
                    (await client.post("/v1/fleet/pull-messages", content=b"")).status_code]

    assert asyncio.run(calls()) == [403, 403, 403, 502]  # the allowed call was forwarded (and found nobody)


# ------------------------------------------------------------------ the site's app gate
def test_app_gate_accepts_only_allowed_bundles():
    from client.app_gate import AppNotApproved, check_bundle

    good, bad = b"approved bundle", b"another bundle"
    h = hashlib.sha256(good).hexdigest()
    assert check_bundle(good, {h}, h, "site_a") == h
    with pytest.raises(AppNotApproved, match="site_a refuses app bundle sha256:" + hashlib.sha256(bad).hexdigest()):
        check_bundle(bad, {h}, None, "site_a")
    with pytest.raises(AppNotApproved, match="announced"):  # approved bytes, but not what the run announced
        check_bundle(good, {h}, "0" * 64, "site_a")


def test_allowed_apps_default_to_the_installed_release(tmp_path):
    from client.join import allowed_apps
    from shared.flower import APP_DIR, DeployError, app_hash

    own = app_hash(APP_DIR)
    assert allowed_apps([]) == ([own], f"the rectalfl installed in {APP_DIR}")
    assert allowed_apps(["SHA256:" + "AB" * 32]) == (["ab" * 32], "policy.allowed_apps")
    with pytest.raises(DeployError, match="not an app hash"):
        allowed_apps(["abc"])
    assert app_hash(APP_DIR) == own  # deterministic: the operator and every site compute the same number
    # a config or document edit does not change it (the bundle holds the code only, fab-include)
    assert all(not n.startswith(("configs/", "docs/", "README")) for n in _bundle_names(APP_DIR))


def _bundle_names(app_dir: Path) -> list[str]:
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    return zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app_dir))).namelist()


def test_the_gate_is_run_by_path_and_imports_no_project_package():
    """The gate must not import ``client``/``shared``: the app's packages come from the approved bundle."""
    import ast

    from client import app_gate

    tree = ast.parse(Path(app_gate.__file__).read_text())
    roots = {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    roots |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not roots & {"client", "shared", "server", "simulations", "rectalfl"}, roots


# ------------------------------------------------------------------ identity bound to the key
def _node(node_id: int, name: str, pub: Path | None = None):
    from flwr.proto.node_pb2 import NodeInfo

    key = b""
    if pub is not None:
        key = serialization.load_ssh_public_key(pub.read_bytes()).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return NodeInfo(node_id=node_id, name=name, public_key=key)


def test_identity_problem(tmp_path):
    from server.orchestrator import identity_problem
    from shared.config import parse_config

    init_ca(tmp_path)
    a, b = add_site(tmp_path, "site_a"), add_site(tmp_path, "site_b")
    cfg = parse_config({"deploy": {"certs_dir": str(tmp_path), "sites": ["site_a", "site_b"]}})
    assert identity_problem(_node(1, "site_a", a["pub"]), "site_a", cfg) is None
    p = identity_problem(_node(2, "site_b", b["pub"]), "site_a", cfg)
    assert p and "site_b's key but calls itself site_a" in p["message"] and p["registered"] == "site_b"
    assert p["fingerprint"] == key_fingerprint(b["pub"])
    p = identity_problem(_node(3, "site_a", b["pub"]), "site_a", cfg)  # registered name, someone else's key
    assert p and "not" in p["message"] and "site.pub" in p["message"]
    p = identity_problem(_node(4, "site_x"), "site_x", cfg)
    assert p and "not in deploy.sites" in p["message"]
    p = identity_problem(_node(5, ""), "site_a", cfg)
    assert p and "no registered site name" in p["message"]


def test_a_node_claiming_another_sites_name_is_refused_and_recorded(tmp_path, run_identity):
    from server.orchestrator import Orchestrator
    from server.store import RunStore
    from shared.config import parse_config
    from tests.deployment.test_certs_and_checks import _FakeGrid

    cfg = parse_config({"federation": {"min_sites": 2}, "deploy": {"sites": ["site_a", "site_b", "site_c"]}},
                       source="test")
    store = RunStore.open_run_dir(tmp_path)
    store.start_run("r", "t", cfg.to_yaml(), cfg.digest(), "federated", "fedavg", 0, "deployment")
    # node 13 authenticated with site_c's key (registered as site_c) but says it is site_a
    grid = _FakeGrid({11: "site_a", 12: "site_b", 13: "site_a"}, registered={13: "site_c"})
    orch = Orchestrator(grid, cfg, tmp_path, store, "r", expected_nodes=3)
    orch.discover()
    assert {n.site: n.node_id for n in orch.nodes} == {"site_a": 11, "site_b": 12}
    ev = store.events("r")
    bad = ev[ev["kind"] == "identity_mismatch"]
    assert len(bad) == 1 and bad["site"].iloc[0] == "site_c" and bad["level"].iloc[0] == "error"
    assert bad["detail"].iloc[0]["claimed"] == "site_a" and bad["detail"].iloc[0]["node_id"] == "13"
    assert sorted(ev.loc[ev["kind"] == "site_joined", "site"]) == ["site_a", "site_b"]
    # a refused node is not asked again when the nodes are refreshed
    assert orch.refresh_nodes(2) is False and len(grid.asked) == 1
    store.close()


def test_simulation_nodes_keep_the_partition_mapping(tmp_path, run_identity):
    """On the simulation engine nodes have no keys: no identity check, sites map by partition-id."""
    from server.orchestrator import Orchestrator
    from server.store import RunStore
    from shared.config import parse_config
    from tests.deployment.test_certs_and_checks import _FakeGrid

    cfg = parse_config({"federation": {"min_sites": 2}, "deploy": {"sites": ["x"]}}, source="test")
    store = RunStore.open_run_dir(tmp_path)
    store.start_run("r", "t", cfg.to_yaml(), cfg.digest(), "federated", "fedavg", 0, "simulation")
    grid = _FakeGrid({0: "site_a", 1: "site_b"}, registered={0: "", 1: ""})
    orch = Orchestrator(grid, cfg, tmp_path, store, "r", sim_sites=[{"name": "site_a"}, {"name": "site_b"}])
    orch.discover()
    assert sorted(n.site for n in orch.nodes) == ["site_a", "site_b"]
    assert not len(store.events("r").query("kind == 'identity_mismatch'"))
    store.close()


# ------------------------------------------------------------------ `rectalfl run` progress
def test_progress_reader_follows_stages_rounds_events_and_message_rounds(tmp_path, run_identity):
    from server.orchestrator import Orchestrator
    from server.progress import RunProgress
    from server.store import RunStore
    from shared.config import parse_config
    from tests.deployment.test_certs_and_checks import _FakeGrid

    cfg = parse_config({"federation": {"min_sites": 2, "rounds": 3}}, source="test")
    prog = RunProgress(tmp_path, t0=time.time())
    assert prog.poll()[0] == [] and "waiting for the ServerApp" in prog.poll()[1]  # nothing written yet
    store = RunStore.open_run_dir(tmp_path)
    store.start_run("r", "t", cfg.to_yaml(), cfg.digest(), "federated", "fedavg", 0, "deployment")
    orch = Orchestrator(_FakeGrid({1: "site_a", 2: "site_b"}), cfg, tmp_path, store, "r", expected_nodes=2)
    orch.discover()
    store.start_round("r", "train", 1, n_sent=2)
    store.finish_round("r", "train", 1, n_replied=2, n_failed=0, train_loss=0.5, seconds=3.0)
    lines, status = prog.poll()
    text = "\n".join(lines)
    assert "site_joined: site_a joined as train" in text and "discovery" in text and "completed" in text
    assert "train round 1/3 completed: 2 site(s) replied, mean loss 0.5000" in text
    with store.stage("r", "evaluate"):
        for _ in range(3):  # three message rounds of the evaluation, through the orchestrator's grid
            orch.grid.send_and_receive([])
        lines, status = prog.poll()
        assert any("evaluation" in line and "started" in line for line in lines)
        assert status.startswith("evaluation") and "3 message round(s) done" in status
    lines, _ = prog.poll()
    assert any("evaluation" in line and "completed" in line and "3 message round(s)" in line for line in lines)
    assert prog.poll()[0] == []  # each line once
    assert json.loads((tmp_path / "progress.json").read_text())["stages"]["evaluate"]["exchanges"] == 3
    store.close()
