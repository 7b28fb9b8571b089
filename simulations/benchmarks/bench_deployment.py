"""The same run on the Deployment Engine and on the simulation engine: where a real consortium's time goes.

Run from the repository root (about 10 minutes on 2 cores with the demo cohort)::

    python -m simulations.benchmarks.bench_deployment                       # demo cohort, 3 rounds
    python -m simulations.benchmarks.bench_deployment --patients 20 --rounds 2   # a small try
    python -m simulations.benchmarks.bench_deployment --flower-defaults     # Flower's own waits and cold starts

In a fresh work folder (``--workdir``, default a temporary one) it makes the synthetic cohort of
``configs/demo.yaml`` (``--patients`` per site overrides its sizes) and preprocesses it once; runs the
pipeline of ``configs/consortium.local.yaml`` on the simulation engine (``rectalfl simulate``); then
starts a loopback consortium exactly as the README's quickstart does - ``rectalfl certs``, ``rectalfl
server start`` (SuperLink with TLS and SuperNode authentication, the Fleet gateway), one ``rectalfl
site join`` per hospital (SuperNode + app gate), ``rectalfl run`` - and runs the same pipeline on it.

Printed, for both engines, from each run's own record (``run.db``, ``progress.json``): seconds per
training round (mean over rounds), seconds per statistics exchange (one message to every answering
site and their replies; the evaluation and fusion stages), the fusion-analysis stage, and the whole
run; then ``deployment/simulation training round: <ratio>``. ``--flower-defaults`` runs the sites
with Flower's own SuperNode waits and a fresh Python per message (``deploy.site_busy_poll_s: null``,
``deploy.site_warm_start: false``), to show what those two settings buy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SITES = ["site_a", "site_b", "site_c", "external"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rectalfl(*args: str, cwd: Path, log: Path | None = None, check: bool = True, timeout: float = 3600) -> float:
    """Run ``rectalfl ARGS`` to completion; return its wall seconds."""
    exe = str(Path(sys.executable).parent / "rectalfl")
    t0 = time.perf_counter()
    with open(log or os.devnull, "ab") as fh:
        rc = subprocess.run([exe, *args], cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            timeout=timeout, env={**os.environ, "COLUMNS": "200"}).returncode
    if check and rc != 0:
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        raise SystemExit(f"rectalfl {' '.join(args)} failed (exit {rc})\n{tail}")
    return time.perf_counter() - t0


def _ts(s: str | None) -> float | None:
    return datetime.fromisoformat(s).timestamp() if s else None


def run_figures(run_dir: Path) -> dict[str, float]:
    """Seconds per training round / statistics exchange / fusion stage / whole run, from the run record."""
    con = sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True)
    try:
        created, finished = con.execute("SELECT created_at, finished_at FROM runs").fetchone()
        stages = {name: (_ts(a), _ts(b)) for name, a, b in
                  con.execute("SELECT name, started_at, finished_at FROM stages")}
        rounds = [r[0] for r in con.execute(
            "SELECT seconds FROM rounds WHERE stage = 'train' AND status = 'completed' ORDER BY round")]
    finally:
        con.close()
    progress = json.loads((run_dir / "progress.json").read_text()).get("stages", {})

    def dur(name: str) -> float:
        a, b = stages.get(name, (None, None))
        return (b - a) if a is not None and b is not None else float("nan")

    stats_s = sum(dur(s) for s in ("evaluate", "analysis") if s in stages)
    exchanges = sum(int(progress.get(s, {}).get("exchanges", 0)) for s in ("evaluate", "analysis"))
    return {"train_round_s": sum(rounds) / len(rounds) if rounds else float("nan"),
            "train_rounds": len(rounds), "first_round_s": rounds[0] if rounds else float("nan"),
            "stats_exchange_s": stats_s / exchanges if exchanges else float("nan"), "stats_exchanges": exchanges,
            "fusion_s": dur("analysis"), "run_s": (_ts(finished) or 0) - (_ts(created) or 0)}


ROLES = (("flower-superlink", "SuperLink"), ("server.gateway", "Fleet gateway"), ("flwr-serverapp", "ServerApp (+ its SuperExec)"),
         ("supernode_poll.py", "SuperNodes"), ("flower-supernode", "SuperNodes"), ("app_gate.py warm", "ClientApps (warm + forks)"),
         ("app_gate.py clientapp", "ClientApps (warm + forks)"), ("app_gate.py superexec", "app gates"),
         ("site join", "site join"), ("server.superexec", "ServerApp (+ its SuperExec)"), ("server start", "server start"))


def cpu_by_role(roots: list[int]) -> dict[str, float]:
    """CPU seconds (user + system, including reaped children) of every process below ``roots``, by role."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu, cmd = {}, {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()
            p = int(stat.parent.name)
            parent[p] = int(f[1])
            cpu[p] = sum(int(x) for x in f[11:15]) / tick  # utime stime cutime cstime
            cmd[p] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    out: dict[str, float] = {}
    todo, seen = list(roots), set()
    while todo:
        p = todo.pop()
        if p in seen or p not in cpu:
            continue
        seen.add(p)
        kids = [c for c, pp in parent.items() if pp == p]
        todo += kids
        role = next((r for key, r in ROLES if key in cmd[p]), "other")
        # cutime/cstime: children a process reaped (the forked ClientApps, in their warm process)
        out[role] = out.get(role, 0.0) + cpu[p]
    return out


def newest_run(runs_root: Path) -> Path:
    runs = sorted((p for p in runs_root.iterdir() if (p / "run.db").is_file()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"no run directory under {runs_root}")
    return runs[-1]


def configs(work: Path, patients: int | None, rounds: int | None, flower_defaults: bool) -> tuple[Path, Path]:
    """The simulation config (demo synth + the consortium's pipeline) and the deployment config, in ``work``."""
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cons = yaml.safe_load((ROOT / "configs" / "consortium.local.yaml").read_text())
    if patients:
        for s in demo["synth"]["sites"]:
            s["patients"] = patients
    if rounds:
        cons["federation"]["rounds"] = rounds
    common = {k: v for k, v in cons.items() if k not in ("deploy", "data_root", "cache_root", "runs_root")}
    sim = {**common, "name": "bench-simulation", "synth": demo["synth"], "data_root": str(work / "data" / "synthetic"),
           "cache_root": str(work / "data" / "cache"), "runs_root": str(work / "runs_simulation"),
           "policy": {k: v for k, v in cons["policy"].items() if k != "roster"}}
    deploy = dict(cons["deploy"], superlink=f"127.0.0.1:{free_port()}", control_address=f"127.0.0.1:{free_port()}",
                  certs_dir=str(work / "certs"), root_certificates=str(work / "certs" / "ca.crt"),
                  flwr_home=str(work / ".flwr"))
    if flower_defaults:
        deploy.update(site_busy_poll_s=None, site_warm_start=False)
    dep = {**common, "name": "bench-deployment", "data_root": str(work / "data" / "synthetic" / "site_a"),
           "cache_root": str(work / "data" / "cache" / "site_a"), "runs_root": str(work / "runs_deployment"),
           "policy": dict(cons["policy"], roster=str(work / "certs")), "deploy": deploy}
    (work / "simulation.yaml").write_text(yaml.safe_dump(sim))
    (work / "deployment.yaml").write_text(yaml.safe_dump(dep))
    return work / "simulation.yaml", work / "deployment.yaml"


def deployment_run(work: Path, cfg_path: Path, log_dir: Path) -> Path:
    from server.deploy import list_nodes

    cfg = yaml.safe_load(cfg_path.read_text())
    shutil.rmtree(work / ".flwr", ignore_errors=True)  # a fresh SuperLink state for every run measured
    if not (work / "certs" / "ca.crt").is_file():  # (kept from an earlier run in the same work folder)
        rectalfl("certs", "init", "--dir", str(work / "certs"), cwd=work, log=log_dir / "certs.log")
        for s in SITES:
            rectalfl("certs", "add-site", s, "--dir", str(work / "certs"), cwd=work, log=log_dir / "certs.log")
    exe = str(Path(sys.executable).parent / "rectalfl")
    procs: list[subprocess.Popen] = []

    def spawn(args: list[str], log: Path) -> subprocess.Popen:
        fh = open(log, "ab")  # noqa: SIM115 - kept open while the process runs
        p = subprocess.Popen([exe, *args], cwd=work, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env={**os.environ, "COLUMNS": "200"})
        procs.append(p)
        return p

    try:
        server_log = log_dir / "server_start.log"
        server = spawn(["server", "start", "--config", str(cfg_path)], server_log)
        deadline = time.time() + 180
        while "SuperLink up" not in server_log.read_text(errors="replace"):
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"rectalfl server start did not come up:\n{server_log.read_text()[-3000:]}")
            time.sleep(0.5)
        for s in SITES:
            spawn(["site", "join", "--config", str(cfg_path), "--name", s, "--data", str(work / "data" / "synthetic" / s),
                   "--cache", str(work / "data" / "cache" / s), "--key", str(work / "certs" / "sites" / s / "site.key"),
                   "--node-port", str(free_port()), "--skip-check"], log_dir / f"site_join_{s}.log")
        ca = work / "certs" / "ca.crt"
        deadline = time.time() + 300
        while sum(n.get("status") == "online" for n in _nodes(list_nodes, cfg["deploy"]["control_address"], ca)) < 4:
            if time.time() > deadline:
                raise SystemExit("the four sites did not come online in 300 s; see " + str(log_dir))
            time.sleep(1)
        time.sleep(3)  # let the app gates' warm processes finish importing (as in a real consortium at rest)
        before = cpu_by_role([p.pid for p in procs])
        t = rectalfl("run", "--config", str(cfg_path), cwd=work, log=log_dir / "run.log")
        print(f"deployment engine: `rectalfl run` to the summary {t:.0f} s", flush=True)
        after = cpu_by_role([p.pid for p in procs])
        print("CPU seconds during the run, by process (2 cores = 2 CPU seconds per second): " + ", ".join(
            f"{role} {after[role] - before.get(role, 0.0):.0f}" for role in sorted(after, key=lambda r: -after[r])),
            flush=True)
        return newest_run(Path(cfg["runs_root"]))
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _nodes(list_nodes, control: str, ca: Path) -> list[dict]:
    try:
        return list_nodes(control, ca)
    except Exception:  # noqa: BLE001 - the SuperLink is still starting
        return []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None,
                   help="work folder (default: a new temporary one); a cohort already made there is reused")
    p.add_argument("--patients", type=int, default=None, help="patients per site (default: the demo's sizes)")
    p.add_argument("--rounds", type=int, default=None, help="training rounds (default: the consortium config's)")
    p.add_argument("--flower-defaults", action="store_true",
                   help="sites with Flower's own 3 s SuperNode wait and a fresh Python per message")
    p.add_argument("--skip-simulation", action="store_true")
    a = p.parse_args(argv)
    work = (a.workdir or Path(tempfile.mkdtemp(prefix="bench_deployment_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    print(f"work folder {work} (logs in {logs})", flush=True)
    sim_cfg, dep_cfg = configs(work, a.patients, a.rounds, a.flower_defaults)
    if (work / "data" / "cache" / "external" / "manifest.csv").is_file():
        print("reusing the cohort already made in this work folder", flush=True)
    else:
        t = rectalfl("simulate", "--prepare-only", "--config", str(sim_cfg), cwd=work, log=logs / "prepare.log")
        print(f"cohort made and preprocessed in {t:.0f} s", flush=True)
    figures: dict[str, dict[str, float]] = {}
    if not a.skip_simulation:
        t = rectalfl("simulate", "--config", str(sim_cfg), cwd=work, log=logs / "simulate.log")
        print(f"simulation engine: `rectalfl simulate` {t:.0f} s", flush=True)
        figures["simulation"] = run_figures(newest_run(work / "runs_simulation"))
    figures["deployment"] = run_figures(deployment_run(work, dep_cfg, logs))
    cols = [("train_round_s", "s/training round"), ("first_round_s", "first round s"),
            ("stats_exchange_s", "s/statistics exchange"), ("stats_exchanges", "exchanges"),
            ("fusion_s", "fusion stage s"), ("run_s", "whole run s")]
    print()
    print(f"{'engine':<12}" + "".join(f"{h:>23}" for _, h in cols))
    for eng, f in figures.items():
        print(f"{eng:<12}" + "".join(f"{f[k]:>23.2f}" if isinstance(f[k], float) else f"{f[k]:>23}" for k, _ in cols))
    if "simulation" in figures:
        for key, what in (("stats_exchange_s", "statistics exchange"), ("fusion_s", "fusion stage"),
                          ("train_round_s", "training round")):
            ratio = figures["deployment"][key] / figures["simulation"][key]
            print(f"deployment/simulation {what}: {ratio:.2f}")
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
