"""A real consortium on one machine: `rectalfl server start` (the closed SuperLink: flower-superlink on
a loopback control address, flower-superexec, the Fleet gateway) + one `rectalfl site join`
(supervising flower-supernode and the site's app gate) per hospital, as separate processes, with TLS
and SuperNode authentication.

One run carries the reliability and identity scenarios, so the fixed costs of a run (ServerApp start,
discovery, signatures, evaluation) are paid twice instead of four times:

1. a SuperNode with a key that is not in deploy.sites is refused (started alongside the real sites);
2. a SuperNode holding site_d's registered key but calling itself site_a is refused at discovery
   (``identity_mismatch``) and takes no part;
3. round 1 with every site; site_c's SuperNode is SIGKILLed -> round 2 completes with the other two
   and the loss is recorded;
4. the operator's `rectalfl server start` is SIGKILLed during round 3: its SuperLink, SuperExec,
   gateway and ServerApp die with it (no orphans); it is started again on the same addresses and
   state file, site_c rejoins, and ``rectalfl run --resume`` continues after round 2 with all three
   training sites.

Loopback only, free ports, a temporary FLWR_HOME; every process started here is killed at the end
whatever happens. Slow (CI runs it); every wait has a hard bound.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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

from server.deploy import list_nodes, submit_run
from server.store import RunStore
from shared.certs import add_site, init_ca

pytestmark = pytest.mark.slow
SITES = ["site_a", "site_b", "site_c", "ext"]
IMPOSTOR_KEY = "site_d"  # registered (in deploy.sites), but its SuperNode calls itself site_a


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
        self.control = f"127.0.0.1:{free_port()}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def deploy(self) -> dict:
        return {"superlink": self.address, "control_address": self.control, "certs_dir": str(self.certs),
                "flwr_home": str(self.home), "sites": [*SITES, IMPOSTOR_KEY]}

    def superlink(self) -> None:
        """The operator's `rectalfl server start`, as a service manager would run it."""
        data = yaml.safe_load(self.cfg.to_yaml())
        data["deploy"].update(self.deploy())
        path = self.root / "server_start.yaml"
        path.write_text(yaml.safe_dump(data))
        log = self.root / "superlink.log"
        self.logs["superlink"] = log
        start = log.stat().st_size if log.is_file() else 0
        with open(log, "ab") as fh:
            self.procs["superlink"] = subprocess.Popen(
                [str(Path(sys.executable).parent / "rectalfl"), "server", "start", "--config", str(path)],
                env={**os.environ, "COLUMNS": "200"}, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.root)
        wait_for(lambda: "SuperLink up" in log.read_text(errors="replace")[start:]
                 or self.procs["superlink"].poll() is not None, 180, "`rectalfl server start`",
                 logs=self.tail("superlink"))
        assert self.procs["superlink"].poll() is None, self.tail("superlink")

    def supernode(self, name: str, key_of: str | None = None, claims: str | None = None) -> subprocess.Popen:
        """A hospital as its IT team runs it: `rectalfl site join` (which supervises flower-supernode)."""
        site = claims or (name if name in SITES else "site_a")
        site_cfg = self.root / "site.yaml"
        data = yaml.safe_load(self.cfg.to_yaml())  # the hospitals' own policy: the consortium's public keys
        data["policy"] = {**data.get("policy", {}), "roster": str(self.certs)}  # so statistics are aggregated
        site_cfg.write_text(yaml.safe_dump(data))
        key = self.root / "hospital_keys" / name / "site.key"  # the hospital's own copy of its key
        if not key.is_file():
            key.parent.mkdir(parents=True)
            shutil.copy2(self.certs / "sites" / (key_of or name) / "site.key", key)
        cache = Path(self.cfg.cache_root) / (site if name == site else f"{name}_as_{site}")
        if not cache.exists():
            shutil.copytree(Path(self.cfg.cache_root) / site, cache)
        cmd = [str(Path(sys.executable).parent / "rectalfl"), "site", "join", "--config", str(site_cfg),
               "--server", self.address, "--root-cert", str(self.certs / "ca.crt"), "--key", str(key),
               "--name", site, "--data", str(Path(self.cfg.data_root) / site), "--cache", str(cache),
               "--node-port", str(free_port()), "--skip-check"]
        log = self.root / f"site_join_{name}.log"
        self.logs[name] = log
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, env={**os.environ, "COLUMNS": "200"}, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str, *, tree: bool = True) -> list[int]:
        """SIGKILL, no clean-up, of the process (and, with ``tree``, everything it started); returns the
        processes that were below it."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return []
        below = descendants(proc.pid)
        for pid in [proc.pid, *(below if tree else [])]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait(timeout=30)
        return below

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def tail(self, name: str, n: int = 3000) -> str:
        path = self.logs.get(name)
        return path.read_text(errors="replace")[-n:] if path and path.is_file() else ""


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
    try:
        return [n for n in list_nodes(c.control, c.certs / "ca.crt") if n["status"] != "unregistered"]
    except Exception:  # noqa: BLE001 - the SuperLink is down or starting
        return []


def online(c: Consortium) -> int:
    return sum(n.get("status") == "online" for n in nodes(c))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


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
    root = tmp_path_factory.mktemp("deploy")
    cfg = tiny_consortium.model_copy(update={"cache_root": root / "cache"})
    shutil.copytree(tiny_consortium.cache_root, cfg.cache_root)
    init_ca(root / "certs")
    for s in [*SITES, IMPOSTOR_KEY, "intruder"]:
        add_site(root / "certs", s)
    c = Consortium(root, cfg)
    try:
        c.superlink()
        for s in SITES:
            c.supernode(s)
        c.supernode("intruder", key_of="intruder")  # a key made by the operator but not in deploy.sites
        c.supernode("impostor", key_of=IMPOSTOR_KEY, claims="site_a")
        yield c
    finally:
        c.close()


def server_config(c: Consortium, rounds: int) -> Path:
    data = yaml.safe_load(c.cfg.to_yaml())
    # generous: every message starts a ClientApp process (torch import) on a loaded 2-core CI machine; a dead
    # SuperNode is reported by the SuperLink after 2 missed heartbeats (<= 60 s), well before this
    data["federation"].update(rounds=rounds, min_sites=2, external_sites=["ext"], round_timeout_s=150,
                              join_timeout_s=120)
    data["deploy"].update(c.deploy())
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
    wait_for(lambda: online(consortium) == len(SITES) + 1, 120, "the 5 registered SuperNodes online", every=3,
             logs=consortium.tail("site_a"))
    listed = nodes(consortium)
    # only the keys of deploy.sites are nodes (the intruder never became one), each under its site's name
    assert sorted(n["name"] for n in listed) == sorted([*SITES, IMPOSTOR_KEY])


def test_dropout_then_superlink_restart_and_resume(consortium) -> None:
    c = consortium
    run_dir = c.root / "runs" / "R"
    cfg_path = server_config(c, 3)
    wait_for(lambda: online(c) == len(SITES) + 1, 120, "5 SuperNodes online", every=3)
    first: dict = {}

    def first_attempt() -> None:
        try:
            first["info"] = submit_run(cfg_path, c.home, run_dir=run_dir, expected_sites=5, timeout=1200)
        except Exception as exc:  # noqa: BLE001 - the SuperLink is killed under it on purpose
            first["error"] = exc

    t0 = time.time()
    t = threading.Thread(target=first_attempt, daemon=True)
    t.start()
    # bounds, not targets: every message starts a ClientApp process per site, slow on a loaded 2-core machine
    wait_for(lambda: completed_rounds(run_dir) >= 1 or "error" in first, 480, "round 1", logs=c.tail("superlink"))
    assert completed_rounds(run_dir) >= 1, f"the run failed before round 1: {first}\n{c.tail('superlink')}"

    # a hospital disappears mid-run: round 2 goes on with the two others (min_sites = 2)
    print(f"\nround 1 done after {time.time() - t0:.0f} s; killing site_c")
    c.kill("site_c")
    wait_for(lambda: completed_rounds(run_dir) >= 2 or "error" in first or "info" in first, 360,
             "round 2 without site_c", logs=c.tail("superlink"))
    assert completed_rounds(run_dir) == 2, f"{first}\n{c.tail('superlink')}"

    # the server goes down during round 3: the operator's `rectalfl server start` is SIGKILLed, and only
    # it; its SuperLink, SuperExec, gateway and ServerApp must not outlive it
    print(f"round 2 done after {time.time() - t0:.0f} s; killing `rectalfl server start`")
    below = c.kill("superlink", tree=False)
    assert len(below) >= 3, below  # superlink, superexec, gateway (+ the ServerApp)
    wait_for(lambda: not any(alive(p) for p in below), 60, "no orphaned SuperLink processes",
             logs=str([(p, Path(f"/proc/{p}/cmdline").read_bytes()[:80]) for p in below if alive(p)]))
    assert completed_rounds(run_dir) == 2

    # restart on the same address and state file; site_c comes back; the others' `site join` reconnect
    c.superlink()
    c.supernode("site_c")
    wait_for(lambda: online(c) == len(SITES) + 1, 180, "all 5 SuperNodes online again", every=3,
             logs=c.tail("site_c") + c.tail("site_a"))
    print(f"restarted, all online after {time.time() - t0:.0f} s; resuming")
    info = submit_run(cfg_path, c.home, run_dir=run_dir, resume=True, expected_sites=5, timeout=900)
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
        # the impostor (site_d's key, calling itself site_a) was refused both times and never trained
        mismatch = ev[ev["kind"] == "identity_mismatch"]
        assert len(mismatch) == 2 and set(mismatch["site"]) == {IMPOSTOR_KEY}
        assert all(d["claimed"] == "site_a" and d["registered"] == IMPOSTOR_KEY for d in mismatch["detail"])
        assert (mismatch["level"] == "error").all()
        assert not len(ev[ev["kind"] == "update_rejected"])
        m = store.metrics(rid, "train")
        assert set(m.loc[m["round"] == 2, "site"]) == {"site_a", "site_b"}
        assert set(m.loc[m["round"] == 3, "site"]) == {"site_a", "site_b", "site_c"}
    assert (run_dir / "models" / "final.npz").is_file()
    assert (run_dir / "checkpoints" / "round_0003.npz").is_file()
    table = pd.read_csv(run_dir / "tables" / "signature_auc.csv")
    assert {"site_a", "site_b", "site_c", "ext"} <= set(table["site"])
    # the pooled AUCs were computed by the sites over the Deployment Engine, securely aggregated
    pooled = table[table["site"] == "pooled (training sites)"]
    assert len(pooled) and pooled["auc"].between(0, 1).all(), table.to_string()


def test_securely_aggregated_updates_on_the_deployment_engine(consortium) -> None:
    """federation.secure_aggregation over real SuperNodes: the train.secagg key exchange, then a round whose
    replies are masked; the server reads only the weighted sum (each site's audit shows what left)."""
    c = consortium
    run_dir = c.root / "runs" / "S"
    path = server_config(c, 1)
    data = yaml.safe_load(path.read_text())
    data["federation"]["secure_aggregation"] = True
    path.write_text(yaml.safe_dump(data))
    wait_for(lambda: online(c) == len(SITES) + 1, 180, "5 SuperNodes online", every=3)
    info = submit_run(path, c.home, run_dir=run_dir, expected_sites=5, timeout=900)
    assert info["status"] == "finished:completed", f"{info}\n{c.tail('superlink')}"
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        rid = store.runs()["run_id"].iloc[0]
        rounds = store.rounds(rid, "train")
        assert rounds["status"].tolist() == ["completed"] and rounds["n_replied"].tolist() == [3]
        ev = store.events(rid)
        assert len(ev[ev["kind"] == "secure_aggregation"]) == 1
    for site in ("site_a", "site_b", "site_c"):
        lines = (Path(c.cfg.cache_root) / site / "audit.jsonl").read_text().splitlines()
        mine = [e for e in map(json.loads, lines) if e.get("run_id") == rid]
        assert [e["message_type"] for e in mine].count("train.secagg") == 2
        assert (Path(c.cfg.cache_root) / site / "secagg" / "updates.json").is_file()
    assert (run_dir / "models" / "final.npz").is_file()


def rectalfl_cmd(c: Consortium, args: list[str], log: Path) -> subprocess.Popen:
    """The operator's terminal: ``rectalfl ARGS`` in its own session (a terminal job), output to ``log``."""
    fh = open(log, "w")  # noqa: SIM115 - the child holds it; closed when the test's temporary folder goes
    return subprocess.Popen([str(Path(sys.executable).parent / "rectalfl"), *args], stdout=fh, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1"},
                            start_new_session=True, cwd=c.root)


def stopped_within(proc: subprocess.Popen, seconds: float) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        code = proc.wait(timeout=seconds + 20)  # the bound is asserted below, with the figure
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running {seconds + 20:.0f} s after the signal") from None
    return code, time.monotonic() - t0


def test_run_and_site_join_leave_cleanly_on_signals(consortium) -> None:
    """Ctrl-C in `rectalfl run` stops following (the run lives on the SuperLink) and prints the commands
    that stop and resume it, which work as printed; SIGTERM to a hospital's `rectalfl site join` (a
    service manager's stop) stops its SuperNode and app gate, leaves nothing behind, and prints the
    command that rejoins, which does."""
    c = consortium
    wait_for(lambda: online(c) >= len(SITES), 180, "the sites online", every=3)
    run_dir = c.root / "runs" / "interrupted"
    log = c.root / "run_sigint.log"
    run = rectalfl_cmd(c, ["run", "--config", str(server_config(c, 2)), "--run-dir", str(run_dir)], log)
    wait_for(lambda: "accepted" in log.read_text() or run.poll() is not None, 180, "the run accepted")
    os.killpg(run.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground job
    code, took = stopped_within(run, 10)
    text = " ".join(log.read_text().split())
    assert code == 130 and took < 10, (code, took, text[-2000:])
    assert "Traceback" not in text and "stopped following" in text, text[-2000:]
    stop_cmd = re.search(r"stop it with `([^`]+)`", text).group(1)
    resume_cmd = re.search(r"continue it with `([^`]+)`", text).group(1)
    assert f"--resume {run_dir}" in resume_cmd
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", "-c", stop_cmd], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (stop_cmd, res.stdout[-1500:], res.stderr[-1500:])

    proc = c.procs["ext"]
    below = descendants(proc.pid)
    assert below, "site join runs flower-supernode and the app gate"
    proc.send_signal(signal.SIGTERM)  # systemd's stop: the process alone
    code, took = stopped_within(proc, 10)
    c.procs.pop("ext")
    text = " ".join(c.logs["ext"].read_text(errors="replace").split())
    assert code == 0 and took < 10, (code, took, text[-2000:])
    assert "Traceback" not in text and "left the consortium (SIGTERM)" in text, text[-2000:]
    wait_for(lambda: not any(alive(p) for p in below), 15, "no SuperNode, gate or ClientApp left behind")
    rejoin = re.search(r"Rejoin with `([^`]+)`", text).group(1)
    assert rejoin.startswith("rectalfl site join ") and "--name ext" in rejoin
    connected = c.logs["ext"].read_text(errors="replace").count("SuperNode ID")
    assert connected >= 1, c.tail("ext")
    with open(c.logs["ext"], "ab") as fh:  # the printed command, as the IT team would paste it
        c.procs["ext"] = subprocess.Popen(["bash", "-c", rejoin], env={**env, "COLUMNS": "200"}, stdout=fh,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: c.logs["ext"].read_text(errors="replace").count("SuperNode ID") > connected, 180,
             "ext connected again through the printed command", every=2, logs=c.tail("ext"))
