"""What makes a site answer a Deployment Engine run quickly, without Flower processes (fast): the app
gate's warm process (one fork per message, from a process holding libraries only) and the SuperNode's
adaptive waits (``client.supernode_poll``)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

GATE = Path(__file__).resolve().parents[2] / "client" / "app_gate.py"
POLL = Path(__file__).resolve().parents[2] / "client" / "supernode_poll.py"


def _run_warm(tmp_path: Path, tokens: list[str], modules: tuple[str, ...] = ("numpy",)) -> subprocess.CompletedProcess:
    """The gate's warm mode as the gate runs it (by path, ``python -P``), its ``clientapp`` replaced by a probe."""
    probe = textwrap.dedent(f"""
        import json, os, runpy, sys
        gate = runpy.run_path({str(GATE)!r}, run_name="gate")
        warm = gate["warm"]

        def probe(address, parent_pid, token=None):
            import numpy, threading
            with open(os.path.join({str(tmp_path)!r}, token + ".json"), "w") as fh:
                json.dump({{"pid": os.getpid(), "ppid": os.getppid(), "address": address, "token": token,
                           "draw": float(numpy.random.random()), "threads": threading.active_count(),
                           "project": sorted(m for m in sys.modules if m.split(".")[0] in ("client", "shared"))}}, fh)
            if token == "fails":
                raise SystemExit(3)

        warm.__globals__["clientapp"] = probe
        print("warm pid", os.getpid(), flush=True)
        warm("127.0.0.1:1", None, modules={modules!r})
        """)
    proc = subprocess.Popen([sys.executable, "-P", "-c", probe], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write("".join(t + "\n" for t in tokens))
    proc.stdin.flush()
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tmp_path.glob("*.json"))) < len([t for t in tokens if t]):
        time.sleep(0.1)
    out, err = proc.communicate(timeout=60)  # EOF: the gate is gone, the warm process ends
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_warm_process_forks_one_fresh_process_per_task(tmp_path):
    res = _run_warm(tmp_path, ["task1", "task2", "", "fails", "task3"])
    assert res.returncode == 0, res.stderr
    warm_pid = int(res.stdout.split("warm pid")[1].split()[0])
    assert "warm process ready" in res.stderr
    got = {t: json.loads((tmp_path / f"{t}.json").read_text()) for t in ("task1", "task2", "fails", "task3")}
    pids = {g["pid"] for g in got.values()}
    assert len(pids) == 4 and warm_pid not in pids  # a new process per message, never the warm one
    assert {g["ppid"] for g in got.values()} == {warm_pid}
    assert all(g["address"] == "127.0.0.1:1" and g["project"] == [] for g in got.values())
    assert len({g["draw"] for g in got.values()}) == 4  # generators reseeded: no two children draw alike
    assert not list(tmp_path.glob(".json"))  # the empty line started nothing


def test_preload_refuses_project_modules_and_skips_missing_libraries(tmp_path):
    code = textwrap.dedent(f"""
        import runpy
        gate = runpy.run_path({str(GATE)!r}, run_name="gate")
        print(gate["preload"](("numpy", "no_such_library_xyz")))
        try:
            gate["preload"](("numpy", "shared.config"))
        except RuntimeError as exc:
            print("REFUSED", exc)
        """)
    res = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr
    assert "['numpy']" in res.stdout
    assert "REFUSED warm process imported project modules ['shared'" in res.stdout


def test_default_preload_is_libraries_only_and_thread_free():
    """The real list, in a clean interpreter: no project module, one thread (fork copies no lock held by another)."""
    code = textwrap.dedent(f"""
        import runpy, threading
        gate = runpy.run_path({str(GATE)!r}, run_name="gate")
        done = gate["preload"]()
        print(len(done), threading.active_count())
        """)
    res = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    n, threads = map(int, res.stdout.split())
    assert n >= 10 and threads == 1


def test_supernode_poll_is_run_by_path_and_imports_only_flower():
    tree = ast.parse(POLL.read_text())
    roots = {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    roots |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert roots <= {"__future__", "sys", "time", "typing", "flwr"}, roots


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_adaptive_waits_are_short_while_busy_and_back_to_flowers_when_idle():
    from client.supernode_poll import IDLE_S, AdaptiveWaits

    c = FakeClock()
    w = AdaptiveWaits(busy_poll_s=0.2, busy_for_s=10.0, reply_poll_s=0.05, clock=c, sleep=c.sleep)
    w.sleep(IDLE_S)  # idle from the start: Flower's own wait
    assert c.slept[-1] == IDLE_S
    w.pulled(True)
    for _ in range(5):
        w.pulled(False)
        w.sleep(IDLE_S)
    assert c.slept[-5:] == [0.2] * 5  # busy: asks again after 0.2 s
    w.sleep(0.5)
    assert c.slept[-1] == 0.05  # the reply poll
    w.sleep(1.25)
    assert c.slept[-1] == 1.25  # any other wait unchanged
    c.now += 11  # busy_for_s passed without a message
    waits = []
    for _ in range(8):
        w.sleep(IDLE_S)
        waits.append(c.slept[-1])
    assert waits[0] == pytest.approx(0.3) and waits == sorted(waits) and waits[-1] == IDLE_S  # backs off to 3 s
    w.pulled(True)
    w.sleep(IDLE_S)
    assert c.slept[-1] == 0.2  # a new message: short again


def test_install_patches_only_a_loop_it_knows():
    import time

    from client.supernode_poll import AdaptiveWaits, install

    calls = []
    known = types.SimpleNamespace(time=time, _pull_and_store_message=lambda *a, **k: calls.append(a) or 7)
    c = FakeClock()
    w = AdaptiveWaits(clock=c, sleep=c.sleep)
    assert install(w, known)
    assert known.time is w and known._pull_and_store_message("x") == 7 and calls == [("x",)]
    assert w.last_message == c.now  # a pulled message (a run id) was noted
    assert not install(w, types.SimpleNamespace(time=time))  # another Flower's loop: left alone
    assert not install(w, types.SimpleNamespace(time=object(), _pull_and_store_message=print))


def test_the_real_flower_loop_is_the_one_supernode_poll_knows():
    """Guards an upgrade of Flower: the names the launcher replaces exist and are used as expected."""
    import inspect
    import time

    import flwr.supernode.start_client_internal as sci

    src = inspect.getsource(sci)
    assert sci.time is time and callable(sci._pull_and_store_message)
    assert "time.sleep(3)" in src and "time.sleep(0.5)" in src and "run_id = _pull_and_store_message(" in src


def test_site_join_commands_use_the_launcher_and_warm_gate_unless_told_not_to(tmp_path):
    from client.join import gate_command, supernode_command

    kw = dict(site="site_a", data_dir=tmp_path, cache_dir=tmp_path, secret_file=tmp_path / "s")
    fast = supernode_command("h:1", tmp_path / "ca", tmp_path / "k", **kw)
    assert fast[:3] == [sys.executable, "-P", str(POLL)] and fast[3:5] == ["--busy-poll", "0.2"]
    plain = supernode_command("h:1", tmp_path / "ca", tmp_path / "k", busy_poll_s=None, **kw)
    assert plain[0].endswith("flower-supernode") and plain[1:] == fast[5:]  # same Flower arguments
    gate = gate_command(9, tmp_path / "s", ["a" * 64], site="site_a", audit_log=tmp_path / "a")
    assert "--cold-start" not in gate
    assert gate_command(9, tmp_path / "s", ["a" * 64], site="site_a", audit_log=tmp_path / "a",
                        warm_start=False)[-1] == "--cold-start"


def test_site_speed_settings_are_validated():
    from shared.config import parse_config

    cfg = parse_config({"deploy": {"site_busy_poll_s": None, "site_warm_start": False}})
    assert cfg.deploy.site_busy_poll_s is None and cfg.deploy.site_warm_start is False
    with pytest.raises(Exception, match="site_busy_poll_s"):
        parse_config({"deploy": {"site_busy_poll_s": 10}})


def test_site_threads_reach_the_app_gate_environment():
    from client.cli import thread_env
    from shared.config import parse_config

    env = {"PATH": "/bin"}
    assert thread_env(env, None) == env
    assert thread_env(env, 2) == {"PATH": "/bin", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                                  "OPENBLAS_NUM_THREADS": "2"}
    assert parse_config({"deploy": {"site_threads": 1}}).deploy.site_threads == 1
    with pytest.raises(Exception, match="site_threads"):
        parse_config({"deploy": {"site_threads": 0}})
