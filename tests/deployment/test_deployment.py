"""A real consortium on one machine: flower-superlink + flower-supernodes as separate processes, TLS and
SuperNode authentication, an unregistered key refused, a site killed mid-run, the SuperLink killed and the
run resumed. Loopback only; every process is killed at the end, whatever happens. Slow (CI runs it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from server.deploy import flwr, register_sites, start_superlink, submit_run
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
        """A hospital as its IT team runs it: `rectalfl site join` (which supervises flower-supernode)."""
        site = name if name in SITES else "site_a"
        site_cfg = self.root / "site.yaml"
        site_cfg.write_text(self.cfg.to_yaml())
        cmd = [str(Path(sys.executable).parent / "rectalfl"), "site", "join", "--config", str(site_cfg),
               "--server", self.address, "--root-cert", str(self.certs / "ca.crt"),
               "--key", str(self.certs / "sites" / (key_of or name) / "site.key"), "--name", site,
               "--data", str(Path(self.cfg.data_root) / site), "--cache", str(Path(self.cfg.cache_root) / site),
               "--node-port", str(free_port()), "--skip-check"]
        log = self.root / f"site_join_{name}.log"
        self.logs[name] = log
        proc = subprocess.Popen(cmd, env={**os.environ, "COLUMNS": "200"}, stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL, no clean-up: the process and the SuperNode (own process group) it supervises die at once."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for pid in [proc.pid, *children_of(proc.pid)]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait(timeout=30)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc, no extra tools)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def online(c: Consortium) -> int:
    res = flwr(["supernode", "list", "rectalfl", "--format", "json"], c.home, check=False)
    return res.stdout.count('"online"')


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
    # generous: every message starts a ClientApp process (torch import) on a loaded 2-core CI machine
    data["federation"].update(rounds=rounds, min_sites=2, external_sites=["ext"], round_timeout_s=150,
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
    text = " ".join(consortium.logs["intruder"].read_text(errors="replace").split())
    assert code == 1
    assert "refused this site's key" in text and "not registered" in text
    listing = flwr(["supernode", "list", "rectalfl", "--format", "json"], consortium.home).stdout
    assert listing.count('"online"') <= len(SITES)


def test_run_completes_when_a_site_dies_mid_run(consortium) -> None:
    run_dir = consortium.root / "runs" / "A"
    result: dict = {}
    wait_for(lambda: online(consortium) == len(SITES), 120, "4 SuperNodes online")
    t = threading.Thread(target=lambda: result.update(submit_run(server_config(consortium, 2), consortium.home,
                                                                 run_dir=run_dir, expected_sites=4, timeout=900)))
    t.start()
    wait_for(lambda: completed_rounds(run_dir) >= 1, 300, "round 1")
    consortium.kill("site_c")
    t.join(timeout=900)
    assert result.get("status") == "finished:completed", result
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        rid = store.runs()["run_id"].iloc[0]
        assert store.runs()["status"].iloc[0] == "completed"
        rounds = store.rounds(rid)
        assert rounds["round"].tolist() == [1, 2] and set(rounds["status"]) == {"completed"}
        assert rounds["n_replied"].tolist() == [3, 2]
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
    wait_for(lambda: online(consortium) == len(SITES), 180, "the restarted site_c online, the old node gone")

    errors: list[BaseException] = []

    def first_attempt() -> None:
        try:
            submit_run(cfg_path, consortium.home, run_dir=run_dir, expected_sites=4, timeout=900)
        except Exception as exc:  # noqa: BLE001 - the SuperLink is killed under it on purpose
            errors.append(exc)

    t = threading.Thread(target=first_attempt, daemon=True)
    t.start()
    wait_for(lambda: completed_rounds(run_dir) >= 1 or (errors and completed_rounds(run_dir) == 0), 300, "round 1")
    assert completed_rounds(run_dir) >= 1, f"the first attempt failed before round 1: {errors}"
    consortium.kill("superlink")  # the SuperLink and the ServerApp it started go down together
    time.sleep(2)
    # (`site join` restarts each SuperNode once it notices; the first attempt's `flwr ls` polling stops)
    done_before = completed_rounds(run_dir)
    assert 1 <= done_before < 3
    consortium.superlink()  # fresh SuperLink on the same address; the SuperNodes reconnect by themselves
    wait_for(lambda: online(consortium) == len(SITES), 180, "the SuperNodes reconnected")
    info = submit_run(cfg_path, consortium.home, run_dir=run_dir, resume=True, expected_sites=4, timeout=900)
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
