"""A real consortium on one machine: flower-superlink + flower-supernodes as separate processes, TLS and
SuperNode authentication, an unregistered key refused, a site killed mid-run, the SuperLink killed and the
run resumed. Loopback only; every process is killed at the end, whatever happens. Slow (CI runs it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from server.deploy import (
    explain_supernode_exit,
    flwr,
    flwr_env,
    register_sites,
    start_superlink,
    submit_run,
    supernode_command,
)
from server.store import RunStore
from shared.certs import add_site, init_ca

pytestmark = pytest.mark.slow
SITES = ["site_a", "site_b", "site_c", "ext"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Consortium:
    def __init__(self, root: Path, cfg):
        self.root, self.cfg = root, cfg
        self.certs = root / "certs"
        self.home = root / "flwr_home"
        self.address = f"127.0.0.1:{free_port()}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def superlink(self) -> None:
        self.procs["superlink"] = start_superlink(self.certs, self.address, self.home, self.root / "superlink.log")
        register_sites(self.certs, self.home, sites=SITES)

    def supernode(self, name: str, key_of: str | None = None) -> subprocess.Popen:
        site = name if name in SITES else "site_a"
        cmd = supernode_command(self.address, self.certs / "ca.crt", self.certs / "sites" / (key_of or name) / "site.key",
                                site=site, data_dir=Path(self.cfg.data_root) / site,
                                cache_dir=Path(self.cfg.cache_root) / site, device="cpu", node_port=free_port())
        log = self.root / f"supernode_{name}.log"
        self.logs[name] = log
        proc = subprocess.Popen(cmd, env=flwr_env(), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def completed_rounds(run_dir: Path) -> int:
    if not (run_dir / "run.db").is_file():
        return 0
    try:
        with RunStore.open_run_dir(run_dir, readonly=True) as s:
            runs = s.runs()
            if not len(runs):
                return 0
            r = s.rounds(runs["run_id"].iloc[0])
            return int((r["status"] == "completed").sum())
    except Exception:  # noqa: BLE001 - the database may be mid-write
        return 0


@pytest.fixture(scope="module")
def consortium(tiny_consortium, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("deploy")
    cfg = tiny_consortium.model_copy(update={"cache_root": root / "cache"})
    shutil.copytree(tiny_consortium.cache_root, cfg.cache_root)
    init_ca(root / "certs")
    for s in [*SITES, "intruder"]:
        add_site(root / "certs", s)
    c = Consortium(root, cfg)
    try:
        c.superlink()
        for s in SITES:
            c.supernode(s)
        yield c
    finally:
        c.close()


def server_config(c: Consortium, rounds: int) -> Path:
    data = yaml.safe_load(c.cfg.to_yaml())
    data["federation"].update(rounds=rounds, min_sites=2, external_sites=["ext"], round_timeout_s=40,
                              join_timeout_s=120)
    data["fusion"]["enabled"] = False
    path = c.root / f"server_{rounds}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unregistered_key_is_refused(consortium) -> None:
    proc = consortium.supernode("intruder", key_of="intruder")
    try:
        code = proc.wait(timeout=120)
    finally:
        consortium.kill("intruder")
    text = consortium.logs["intruder"].read_text(errors="replace")
    assert code != 0
    assert "refused this site's key" in explain_supernode_exit(code, text, Path("site.key"))
    listing = flwr(["supernode", "list", "rectalfl", "--format", "json"], consortium.home).stdout
    assert listing.count('"online"') <= len(SITES)


def test_run_completes_when_a_site_dies_mid_run(consortium) -> None:
    run_dir = consortium.root / "runs" / "A"
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(submit_run(server_config(consortium, 3), consortium.home,
                                                                 run_dir=run_dir, expected_sites=4, timeout=600)))
    t.start()
    wait_for(lambda: completed_rounds(run_dir) >= 1, 300, "round 1")
    consortium.kill("site_c")
    t.join(timeout=600)
    assert result.get("status") == "finished:completed", result
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        rid = store.runs()["run_id"].iloc[0]
        assert store.runs()["status"].iloc[0] == "completed"
        rounds = store.rounds(rid)
        assert rounds["round"].tolist() == [1, 2, 3] and set(rounds["status"]) == {"completed"}
        assert rounds["n_replied"].iloc[0] == 3 and (rounds["n_replied"].iloc[1:] == 2).all()
        ev = store.events(rid)
        lost = ev[ev["kind"].isin(["site_dropped", "site_failed"])]
        assert "site_c" in set(lost["site"])
        assert sorted(ev.loc[ev["kind"] == "site_joined", "site"]) == sorted(SITES)
    table = pd.read_csv(run_dir / "tables" / "signature_auc.csv")
    assert "ext" in set(table["site"])
    consortium.supernode("site_c")  # the site rejoins for the next test


def test_superlink_killed_mid_run_then_resumed(consortium) -> None:
    run_dir = consortium.root / "runs" / "B"
    cfg_path = server_config(consortium, 3)
    t = threading.Thread(target=lambda: submit_run(cfg_path, consortium.home, run_dir=run_dir, expected_sites=4,
                                                   timeout=600) if True else None, daemon=True)
    t.start()
    wait_for(lambda: completed_rounds(run_dir) >= 1, 300, "round 1")
    consortium.kill("superlink")  # the SuperLink and the ServerApp it started go down together
    time.sleep(2)
    done_before = completed_rounds(run_dir)
    assert 1 <= done_before < 3
    consortium.superlink()  # fresh SuperLink on the same address; the SuperNodes reconnect by themselves
    info = submit_run(cfg_path, consortium.home, run_dir=run_dir, resume=True, expected_sites=4, timeout=600)
    assert info["status"] == "finished:completed", info
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        rid = store.runs()["run_id"].iloc[0]
        rounds = store.rounds(rid)
        assert rounds.loc[rounds["status"] == "completed", "round"].tolist() == [1, 2, 3]
        ev = store.events(rid)
        resumed = ev[ev["kind"] == "resumed"]
        assert len(resumed) == 1 and f"after round {done_before}" in resumed["message"].iloc[0]
        assert store.runs()["status"].iloc[0] == "completed"
    assert (run_dir / "models" / "final.npz").is_file()
