"""A real consortium on one machine: flower-superlink + one `rectalfl site join` (supervising a
flower-supernode) per hospital, as separate processes, with TLS and SuperNode authentication.

One run carries the reliability scenarios, so the fixed costs of a run (ServerApp start, discovery,
signatures, evaluation) are paid twice instead of four times:

1. a SuperNode with an unregistered key is refused (started alongside the real sites);
2. round 1 with every site; site_c's SuperNode is SIGKILLed -> round 2 completes with the other two
   and the loss is recorded;
3. the SuperLink (and the ServerApp it started) is SIGKILLed during round 3; it is restarted on the same
   address and state file, site_c rejoins, and ``rectalfl run --resume`` continues after round 2 with
   all three training sites.

Loopback only, free ports, a temporary FLWR_HOME; every process started here is killed at the end
whatever happens. Slow (CI runs it); every wait has a hard bound.
"""

from __future__ import annotations

import json
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
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, env={**os.environ, "COLUMNS": "200"}, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL, no clean-up, of the process and everything it started (SuperNode, SuperExec, apps)."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait(timeout=30)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def tail(self, name: str, n: int = 3000) -> str:
        path = self.root / "superlink.log" if name == "superlink" else self.logs[name]
        return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc, no extra tools), found before any is killed."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def wait_for(pred, timeout: float, what: str, every: float = 1.0, logs: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def nodes(c: Consortium) -> list[dict]:
    res = flwr(["supernode", "list", "rectalfl", "--format", "json"], c.home, check=False)
    try:
        return json.loads(res.stdout[res.stdout.index("{"):]).get("nodes", [])
    except ValueError:
        return []


def online(c: Consortium) -> int:
    return sum(n.get("status") == "online" for n in nodes(c))


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
        c.supernode("intruder", key_of="intruder")  # a key made by the operator but never registered
        yield c
    finally:
        c.close()


def server_config(c: Consortium, rounds: int) -> Path:
    data = yaml.safe_load(c.cfg.to_yaml())
    # generous: every message starts a ClientApp process (torch import) on a loaded 2-core CI machine; a dead
    # SuperNode is reported by the SuperLink after 2 missed heartbeats (<= 60 s), well before this
    data["federation"].update(rounds=rounds, min_sites=2, external_sites=["ext"], round_timeout_s=150,
                              join_timeout_s=120)
    data["fusion"]["enabled"] = False
    path = c.root / f"server_{rounds}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unregistered_key_is_refused(consortium) -> None:
    proc = consortium.procs["intruder"]
    try:
        code = proc.wait(timeout=120)
    finally:
        consortium.kill("intruder")
    text = " ".join(consortium.logs["intruder"].read_text(errors="replace").split())
    assert code == 1, text[-2000:]
    assert "refused this site's key" in text and "not registered" in text
    wait_for(lambda: online(consortium) == len(SITES), 120, "the 4 registered SuperNodes online", every=3,
             logs=consortium.tail("site_a"))
    listed = nodes(consortium)
    assert len(listed) == len(SITES)  # only the registered keys are nodes: the intruder never became one


def test_dropout_then_superlink_restart_and_resume(consortium) -> None:
    c = consortium
    run_dir = c.root / "runs" / "R"
    cfg_path = server_config(c, 3)
    wait_for(lambda: online(c) == len(SITES), 120, "4 SuperNodes online", every=3)
    first: dict = {}

    def first_attempt() -> None:
        try:
            first["info"] = submit_run(cfg_path, c.home, run_dir=run_dir, expected_sites=4, timeout=600)
        except Exception as exc:  # noqa: BLE001 - the SuperLink is killed under it on purpose
            first["error"] = exc

    t0 = time.time()
    t = threading.Thread(target=first_attempt, daemon=True)
    t.start()
    wait_for(lambda: completed_rounds(run_dir) >= 1 or "error" in first, 240, "round 1", logs=c.tail("superlink"))
    assert completed_rounds(run_dir) >= 1, f"the run failed before round 1: {first}\n{c.tail('superlink')}"

    # a hospital disappears mid-run: round 2 goes on with the two others (min_sites = 2)
    print(f"\nround 1 done after {time.time() - t0:.0f} s; killing site_c")
    c.kill("site_c")
    wait_for(lambda: completed_rounds(run_dir) >= 2 or "error" in first or "info" in first, 240,
             "round 2 without site_c", logs=c.tail("superlink"))
    assert completed_rounds(run_dir) == 2, f"{first}\n{c.tail('superlink')}"

    # the server goes down during round 3: SuperLink, SuperExec and the ServerApp, all SIGKILLed
    print(f"round 2 done after {time.time() - t0:.0f} s; killing the SuperLink")
    c.kill("superlink")
    assert completed_rounds(run_dir) == 2

    # restart on the same address and state file; site_c comes back; the others' `site join` reconnect
    c.superlink()
    c.supernode("site_c")
    wait_for(lambda: online(c) == len(SITES), 180, "all 4 SuperNodes online again", every=3,
             logs=c.tail("site_c") + c.tail("site_a"))
    print(f"restarted, all online after {time.time() - t0:.0f} s; resuming")
    info = submit_run(cfg_path, c.home, run_dir=run_dir, resume=True, expected_sites=4, timeout=480)
    print(f"resumed run finished after {time.time() - t0:.0f} s")
    assert info["status"] == "finished:completed", f"{info}\n{c.tail('superlink')}"
    assert first.get("info", {}).get("status") != "finished:completed"  # the first attempt did not complete

    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        runs = store.runs()
        assert len(runs) == 1 and runs["status"].iloc[0] == "completed"
        rid = runs["run_id"].iloc[0]
        rounds = store.rounds(rid, "train")
        done = rounds[rounds["status"] == "completed"].sort_values("round")
        assert done["round"].tolist() == [1, 2, 3]
        # round 2 without site_c (dropped), round 3 with site_c again (rejoined after the restart)
        assert done["n_replied"].tolist() == [3, 2, 3]
        ev = store.events(rid)
        lost = ev[ev["kind"].isin(["site_dropped", "site_failed"])]
        assert set(lost["site"]) == {"site_c"} and 2 in set(lost["round"])
        resumed = ev[ev["kind"] == "resumed"]
        assert len(resumed) == 1 and "after round 2" in resumed["message"].iloc[0]
        joined = ev[ev["kind"] == "site_joined"]
        assert sorted(joined["site"]) == sorted(SITES * 2)  # discovered at the start and again on resume
        assert not len(ev[ev["kind"] == "update_rejected"])
        m = store.metrics(rid, "train")
        assert set(m.loc[m["round"] == 2, "site"]) == {"site_a", "site_b"}
        assert set(m.loc[m["round"] == 3, "site"]) == {"site_a", "site_b", "site_c"}
    assert (run_dir / "models" / "final.npz").is_file()
    assert (run_dir / "checkpoints" / "round_0003.npz").is_file()
    table = pd.read_csv(run_dir / "tables" / "signature_auc.csv")
    assert {"site_a", "site_b", "site_c", "ext"} <= set(table["site"])
