"""The operator's side of a real consortium on Flower's Deployment Engine: the SuperLink and runs.

Thin, documented layers over Flower's own processes and CLI, so a Flower user recognises each step:

* operator: ``flower-superlink`` with TLS (``--ssl-*``) and SuperNode authentication
  (``--enable-supernode-auth``), every site key registered with ``flwr supernode register``, and a
  connection in ``$FLWR_HOME/config.toml``; runs go through ``flwr run . <connection>``;
* hospitals join with ``flower-supernode`` (:mod:`client.join`).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from shared.certs import check_server_files, site_public_keys
from shared.flower import DeployError, flwr_env, split_address, tool

APP_DIR = Path(__file__).resolve().parents[1]
"""The Flower app (pyproject.toml with [tool.flwr.app]) that `flwr run` ships to the federation."""


def wait_listening(address: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    host, port = split_address(address)
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text(errors="replace")[-2000:] if log and Path(log).is_file() else ""
            raise DeployError(f"flower-superlink exited with code {proc.returncode}:\n{tail}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"nothing listens on {address} after {timeout:.0f} s")


# --------------------------------------------------------------------------- operator
def write_connection(flwr_home: Path, name: str, address: str, ca_file: Path) -> Path:
    """Make ``name`` the default SuperLink connection of the Flower CLI in ``flwr_home``."""
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
                    f'root-certificates = "{Path(ca_file).resolve()}"\n')
    return path


def superlink_command(certs_dir: Path, address: str, database: Path | None = None) -> list[str]:
    files = check_server_files(certs_dir)
    host, port = split_address(address)
    cmd = [tool("flower-superlink"), "--ssl-ca-certfile", str(files["ca_cert"].resolve()),
           "--ssl-certfile", str(files["server_cert"].resolve()), "--ssl-keyfile", str(files["server_key"].resolve()),
           "--enable-supernode-auth", "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def start_superlink(certs_dir: Path, address: str, flwr_home: Path, log: Path, *, connection: str = "rectalfl",
                    database: Path | None = None, timeout: float = 60.0) -> subprocess.Popen:
    """Start flower-superlink in the background (output to ``log``) and write the CLI connection.

    Its state (registered site keys, runs) goes to ``database`` (default ``<flwr_home>/superlink.db``)
    so a restarted SuperLink knows the sites' keys; ``:memory:`` keeps it in memory.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    Path(flwr_home).mkdir(parents=True, exist_ok=True)
    db = Path(flwr_home) / "superlink.db" if database is None else Path(database)
    db_arg = None if str(db) == ":memory:" else db.resolve()
    fh = open(log, "ab")  # noqa: SIM115 - the child keeps writing after we return
    proc = subprocess.Popen(superlink_command(certs_dir, address, db_arg), stdout=fh, stderr=subprocess.STDOUT,
                            env=flwr_env(flwr_home), start_new_session=True)
    host, port = split_address(address)
    local = f"127.0.0.1:{port}" if host in ("0.0.0.0", "::", "") else address  # the operator's CLI runs here
    wait_listening(local, timeout, proc, log)
    write_connection(flwr_home, connection, local, Path(certs_dir) / "ca.crt")
    return proc


def flwr(args: Sequence[str], flwr_home: Path, *, timeout: float = 120.0, check: bool = True,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the Flower CLI with this consortium's FLWR_HOME."""
    res = subprocess.run([tool("flwr"), *args], env=flwr_env(flwr_home), capture_output=True, text=True,
                         timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise DeployError(f"`flwr {' '.join(args)}` failed ({res.returncode}): {(res.stdout + res.stderr)[-1500:]}")
    return res


def register_sites(certs_dir: Path, flwr_home: Path, connection: str = "rectalfl",
                   sites: Sequence[str] | None = None) -> dict[str, str]:
    """Register every site public key (or ``sites``) with the SuperLink; ``{site: node id or reason}``."""
    keys = site_public_keys(certs_dir)
    if sites is not None:
        unknown = sorted(set(sites) - set(keys))
        if unknown:
            raise DeployError(f"no key for site(s) {unknown} in {certs_dir}/sites; run `rectalfl certs add-site NAME`")
        keys = {s: keys[s] for s in sites}
    out = {}
    for site, pub in keys.items():
        res = flwr(["supernode", "register", str(pub), connection, "--name", site, "--format", "json"], flwr_home,
                   check=False)
        text = res.stdout + res.stderr
        m = re.search(r'"node-id"\s*:\s*"?(\d+)', text) or re.search(r"SuperNode (\d+) registered", text)
        if res.returncode == 0 and m:
            out[site] = m.group(1)
        elif "already" in text.lower():
            out[site] = "already registered"
        else:
            raise DeployError(f"registering {site}'s key failed: {text[-800:]}")
    return out


def submit_run(config_path: Path, flwr_home: Path, *, connection: str = "rectalfl", run_dir: Path | None = None,
               resume: bool = False, expected_sites: int | None = None, stream: IO[str] | None = None,
               timeout: float | None = None) -> dict[str, Any]:
    """``flwr run <app> <connection>`` with the rectalfl run config; waits for the run and returns its status.

    ``flwr run --stream`` exits 0 even when the run fails, so the status comes from ``flwr ls``.
    """
    conf = [f"config-path='{Path(config_path).resolve()}'", "simulation=false"]
    if run_dir is not None:
        conf.append(f"run-dir='{Path(run_dir).resolve()}'")
    if resume:
        conf.append("resume=true")
    if expected_sites:
        conf.append(f"expected-sites={int(expected_sites)}")
    res = flwr(["run", str(APP_DIR), connection, "--run-config", " ".join(conf), "--format", "json"], flwr_home,
               timeout=300)
    m = re.search(r'"run-id"\s*:\s*"?(\d+)', res.stdout)
    if not m:
        raise DeployError(f"`flwr run` did not report a run id: {res.stdout[-800:]}")
    run_id = m.group(1)
    return wait_run(run_id, flwr_home, connection=connection, stream=stream, timeout=timeout)


def wait_run(run_id: str, flwr_home: Path, *, connection: str = "rectalfl", stream: IO[str] | None = None,
             timeout: float | None = None, poll_s: float = 30.0) -> dict[str, Any]:
    """Follow ``flwr log RUN --stream`` (which ends when the run finishes) and return ``flwr ls``'s record.

    ``flwr ls`` (a CLI start, ~1 s of CPU) runs when the log stream ends and every ``poll_s`` seconds
    as a fallback, every 5 s once the stream is gone (e.g. the SuperLink went down).
    """
    deadline = None if timeout is None else time.time() + timeout
    logs: subprocess.Popen | None = subprocess.Popen(
        [tool("flwr"), "log", str(run_id), connection, "--stream"], env=flwr_env(flwr_home),
        stdout=stream if stream is not None else subprocess.DEVNULL, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)
    unknown, last = 0, time.time()
    try:
        while True:
            ended = logs is not None and logs.poll() is not None
            if ended:
                logs = None
            if ended or time.time() - last >= (poll_s if logs is not None else 5.0):
                last = time.time()
                info = run_status(run_id, flwr_home, connection)
                if str(info.get("status", "")).startswith("finished"):
                    return info
                unknown = unknown + 1 if info.get("status") == "unknown" else 0
                if unknown >= 5:
                    raise DeployError(f"run {run_id} is no longer known to the SuperLink (was it restarted?); the "
                                      "run directory keeps every completed round: continue with `rectalfl run "
                                      "--resume RUN_DIR`")
            if deadline is not None and time.time() > deadline:
                raise DeployError(f"run {run_id} not finished after {timeout:.0f} s")
            time.sleep(0.5)
    finally:
        if logs is not None:
            logs.terminate()
            try:
                logs.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logs.kill()


def run_status(run_id: str, flwr_home: Path, connection: str = "rectalfl") -> dict[str, Any]:
    res = flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], flwr_home, check=False)
    try:
        data = json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        return {"run-id": run_id, "status": "unknown", "detail": (res.stdout + res.stderr)[-500:]}
    runs = data.get("runs", [])
    return dict(runs[0]) if runs else {"run-id": run_id, "status": "unknown"}


