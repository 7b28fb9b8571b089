"""The operator's side of a real consortium on Flower's Deployment Engine: a closed SuperLink and runs.

Thin, documented layers over Flower's own processes and CLI, so a Flower user recognises each step.
``rectalfl server start`` (:func:`start_superlink`) runs three processes:

* ``flower-superlink`` bound to ``deploy.control_address`` (loopback): TLS (``--ssl-*``), SuperNode
  authentication (``--enable-supernode-auth``), ``--isolation process`` with a SuperExec secret
  (``--superexec-auth-secret-file``), its state in a 0600 SQLite file, its log rotated daily
  (``--log-file``). Flower 1.41 serves the Control API (runs, node registration), the runtime API
  (ServerApp tasks) and the Fleet API on this one port; loopback keeps the first two to the
  operator's machine.
* the operator's SuperExec (:mod:`server.superexec`) with the same secret, which alone may claim
  ServerApp tasks (runtime API) and starts ``flwr-serverapp`` for each run;
* the Fleet gateway (:mod:`server.gateway`) on ``deploy.superlink``, the only address hospitals
  reach: it forwards the Fleet API calls of registered SuperNodes and refuses everything else.

Then exactly the sites of ``deploy.sites`` are registered (Control API ``RegisterNode``, as
``flwr supernode register``), nodes of removed or revoked keys are unregistered, and a connection is
written to ``$FLWR_HOME/config.toml``; runs go through ``flwr run . <connection>``. Hospitals join
with ``flower-supernode`` (:mod:`client.join`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from shared.certs import (
    CertError,
    check_server_files,
    consortium_keys,
    key_fingerprint,
    load_public_key,
    revoke_site,
    revoked_keys,
)
from shared.flower import (
    APP_DIR,
    DeployError,
    die_with_parent,
    flwr_env,
    new_secret,
    private_dir,
    split_address,
    tool,
)

__all__ = ["APP_DIR", "ServerProcesses", "start_superlink", "register_sites", "list_nodes", "revoke", "submit_run",
           "wait_run", "run_status", "write_connection", "flwr", "superlink_command"]

PRIVATE_UMASK = 0o077
"""Everything the SuperLink, the SuperExec and the ServerApp create is readable by the operator only."""


def wait_listening(address: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None,
                   what: str = "flower-superlink") -> None:
    deadline = time.time() + timeout
    host, port = split_address(address)
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text(errors="replace")[-2000:] if log and Path(log).is_file() else ""
            raise DeployError(f"{what} exited with code {proc.returncode}:\n{tail}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"nothing listens on {address} after {timeout:.0f} s ({what})")


def local_view(address: str) -> str:
    """The address this machine uses to reach a server listening on ``address`` (0.0.0.0 -> 127.0.0.1)."""
    host, port = split_address(address)
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "::", "") else address


# --------------------------------------------------------------------------- operator processes
def write_connection(flwr_home: Path, name: str, address: str, ca_file: Path) -> Path:
    """Make ``name`` the default SuperLink connection of the Flower CLI in ``flwr_home``."""
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
                    f'root-certificates = "{Path(ca_file).resolve()}"\n')
    return path


def prepare_database(path: Path) -> Path:
    """Create the SuperLink's SQLite file 0600 before Flower opens it (SQLite gives its journal files
    the database file's permissions), and tighten an existing one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))
    for p in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
        if p.exists():
            os.chmod(p, 0o600)
    return path


def superlink_command(certs_dir: Path, control_address: str, *, secret: Path, database: Path | None = None,
                      log_file: Path | None = None) -> list[str]:
    files = check_server_files(certs_dir)
    host, port = split_address(control_address)
    cmd = [tool("flower-superlink"), "--ssl-ca-certfile", str(files["ca_cert"].resolve()),
           "--ssl-certfile", str(files["server_cert"].resolve()), "--ssl-keyfile", str(files["server_key"].resolve()),
           "--enable-supernode-auth", "--disable-runtime-dependency-installation",
           "--isolation", "process", "--superexec-auth-secret-file", str(Path(secret).resolve()),
           "--host", host, "--port", str(port)]
    if database is not None:
        cmd += ["--database", str(database)]
    if log_file is not None:
        cmd += ["--log-file", str(Path(log_file).resolve()), "--log-rotation-interval-hours", "24",
                "--log-rotation-backup-count", "7"]
    return cmd


@dataclass
class ServerProcesses:
    """The operator's three processes (each dies with the process that started it, see
    :func:`shared.flower.die_with_parent`)."""

    superlink: subprocess.Popen
    superexec: subprocess.Popen | None = None
    gateway: subprocess.Popen | None = None
    logs: dict[str, Path] = field(default_factory=dict)

    def procs(self) -> dict[str, subprocess.Popen]:
        return {k: p for k, p in (("gateway", self.gateway), ("superexec", self.superexec),
                                  ("superlink", self.superlink)) if p is not None}

    @property
    def pid(self) -> int:
        return self.superlink.pid

    def exited(self) -> tuple[str, int] | None:
        """``(name, exit code)`` of the first process that stopped, else None."""
        for name, p in self.procs().items():
            if p.poll() is not None:
                return name, int(p.returncode)
        return None

    def tail(self, name: str, n: int = 2000) -> str:
        path = self.logs.get(name)
        return path.read_text(errors="replace")[-n:] if path and path.is_file() else ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the gateway, the SuperExec and the SuperLink (in that order); SIGKILL after ``timeout``."""
        for p in self.procs().values():
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + timeout
        for p in self.procs().values():
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:  # one file per process lifetime; Flower's own log rotates (--log-file)
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=die_with_parent(), umask=PRIVATE_UMASK)


def start_superlink(certs_dir: Path, address: str, flwr_home: Path, *, control_address: str = "127.0.0.1:9092",
                    connection: str = "rectalfl", database: Path | None = None,
                    timeout: float = 60.0) -> ServerProcesses:
    """Start the closed SuperLink (see the module docstring) and write the CLI connection.

    ``address`` is where hospitals connect (the Fleet gateway); ``control_address`` (loopback) is
    where flower-superlink itself listens. State (registered keys, runs) goes to ``database``
    (default ``<flwr_home>/superlink.db``, 0600) so a restarted SuperLink knows the sites' keys;
    ``:memory:`` keeps it in memory. Logs are under ``<flwr_home>/logs``.
    """
    from shared.config import DeployConfig

    DeployConfig(control_address=control_address)  # loopback check, same message as in a config file
    if split_address(local_view(address))[1] == split_address(control_address)[1] and \
            split_address(local_view(address))[0] in ("127.0.0.1", "localhost"):
        raise DeployError(f"deploy.superlink ({address}) and deploy.control_address ({control_address}) must use "
                          "different ports")
    files = check_server_files(certs_dir)
    home = private_dir(Path(flwr_home))
    logs = private_dir(home / "logs")
    db = home / "superlink.db" if database is None else Path(database)
    db_arg = None if str(db) == ":memory:" else prepare_database(db).resolve()
    secret = new_secret(home / "superexec.secret")
    env = flwr_env(home)
    out = {k: logs / f"{k}.console.log" for k in ("superlink", "superexec", "gateway")}
    link = _spawn(superlink_command(certs_dir, control_address, secret=secret, database=db_arg,
                                    log_file=logs / "superlink.log"), env, out["superlink"])
    procs = ServerProcesses(link, logs=out)
    try:
        wait_listening(control_address, timeout, link, out["superlink"])
        procs.superexec = _spawn([sys.executable, "-m", "server.superexec", "--runtime-api-address", control_address,
                                  "--root-certificates", str(files["ca_cert"].resolve()),
                                  "--superexec-auth-secret-file", str(secret.resolve()),
                                  "--token-dir", str(home / "tokens"), "--parent-pid", str(link.pid)],
                                 env, out["superexec"])
        procs.gateway = _spawn([sys.executable, "-m", "server.gateway", "--listen", address, "--upstream",
                                control_address, "--certs", str(Path(certs_dir).resolve()),
                                "--log", str(logs / "gateway.log")], env, out["gateway"])
        wait_listening(local_view(address), timeout, procs.gateway, out["gateway"], what="the Fleet gateway")
        if (gone := procs.exited()) is not None:
            raise DeployError(f"{gone[0]} exited with code {gone[1]}:\n{procs.tail(gone[0])}")
    except BaseException:
        procs.stop()
        raise
    write_connection(home, connection, control_address, files["ca_cert"])
    return procs


# --------------------------------------------------------------------------- Control API (operator only)
@contextmanager
def control_client(control_address: str, ca_file: Path) -> Iterator[Any]:
    """Flower's Control API client for the operator's own SuperLink (what the ``flwr`` CLI uses)."""
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    client = ControlHttpClient.from_server_address(
        server_address=control_address, insecure=False, root_certificates=Path(ca_file).read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
    try:
        yield client
    finally:
        client.close()


def _fingerprint_or_none(key: bytes) -> str | None:
    try:
        return key_fingerprint(key)
    except CertError:
        return None


def list_nodes(control_address: str, ca_file: Path) -> list[dict[str, Any]]:
    """Every node the SuperLink knows: ``node_id``, ``name`` (as registered), ``status`` and the
    ``fingerprint`` of its registered key (:func:`shared.certs.key_fingerprint`)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    with control_client(control_address, ca_file) as c:
        res = c.ListNodes(ListNodesRequest())
    return [{"node_id": int(n.node_id), "name": n.name, "status": n.status,
             "fingerprint": _fingerprint_or_none(bytes(n.public_key))} for n in res.nodes_info]


def _pem(pub: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return load_public_key(pub).public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def register_sites(certs_dir: Path, control_address: str, sites: Sequence[str]) -> dict[str, str]:
    """Make the SuperLink's members exactly ``sites`` (``deploy.sites``); ``{site: what was done}``.

    Each listed site's key is registered under the site's name (``RegisterNode``, as ``flwr supernode
    register``); a node registered under another name, with a revoked key, or for a site no longer
    listed is unregistered (reported under its registered name). A listed site without a key, or with
    a revoked one, is a :class:`~shared.certs.CertError` naming the fix.
    """
    from flwr.proto.control_pb2 import RegisterNodeRequest, UnregisterNodeRequest

    ca = Path(certs_dir) / "ca.crt"
    keys = consortium_keys(certs_dir, list(sites))
    want = {key_fingerprint(p): s for s, p in keys.items()}
    revoked = revoked_keys(certs_dir)
    out: dict[str, str] = {}
    with control_client(control_address, ca) as c:
        from flwr.proto.control_pb2 import ListNodesRequest

        current = [n for n in c.ListNodes(ListNodesRequest()).nodes_info if n.status != "unregistered"]
        have: dict[str, int] = {}
        for n in current:
            fp = _fingerprint_or_none(bytes(n.public_key))
            site = want.get(fp) if fp else None
            if site is not None and n.name == site:
                have[site] = int(n.node_id)
                out[site] = f"registered (node {n.node_id})"
                continue
            why = ("its key was revoked" if fp in revoked else
                   f"registered as {n.name!r}, its key is {site}'s" if site else "not in deploy.sites")
            c.UnregisterNode(UnregisterNodeRequest(node_id=n.node_id))
            out[n.name or f"node {n.node_id}"] = f"unregistered node {n.node_id}: {why}"
        for site, pub in keys.items():
            if site in have:
                continue
            try:
                res = c.RegisterNode(RegisterNodeRequest(public_key=_pem(pub), name=site))
            except Exception as exc:  # noqa: BLE001 - Flower raises its own error types; the message says what
                raise DeployError(f"registering {site}'s key {pub} failed: {exc}") from None
            out[site] = f"registered now (node {res.node_id})"
    return out


def revoke(certs_dir: Path, name: str, control_address: str | None = None) -> dict[str, Any]:
    """``rectalfl certs revoke NAME``: unregister the site's node(s) from the running SuperLink (if
    reachable), then record its key as revoked (:func:`shared.certs.revoke_site`).

    A revoked key is never registered again (``server start`` refuses it); its SuperNode is refused at
    its next call. Returns what was done.
    """
    from flwr.proto.control_pb2 import UnregisterNodeRequest

    pub = Path(certs_dir) / "sites" / name / "site.pub"
    if not pub.is_file():
        raise CertError(f"no key for site {name} in {Path(certs_dir) / 'sites'} (nothing to revoke)")
    fp = key_fingerprint(pub)
    done: dict[str, Any] = {"unregistered": [], "superlink": "not contacted"}
    if control_address is not None:
        try:
            nodes = list_nodes(control_address, Path(certs_dir) / "ca.crt")
        except Exception as exc:  # noqa: BLE001 - SuperLink down: the next `server start` unregisters it
            done["superlink"] = f"not reachable ({type(exc).__name__}); the next `rectalfl server start` unregisters it"
        else:
            with control_client(control_address, Path(certs_dir) / "ca.crt") as c:
                for n in nodes:
                    if n["fingerprint"] == fp and n["status"] != "unregistered":
                        c.UnregisterNode(UnregisterNodeRequest(node_id=n["node_id"]))
                        done["unregistered"].append(n["node_id"])
            done["superlink"] = "contacted"
    done.update(revoke_site(certs_dir, name))
    return done


# --------------------------------------------------------------------------- runs
def flwr(args: Sequence[str], flwr_home: Path, *, timeout: float = 120.0, check: bool = True,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the Flower CLI with this consortium's FLWR_HOME."""
    res = subprocess.run([tool("flwr"), *args], env=flwr_env(flwr_home), capture_output=True, text=True,
                         timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise DeployError(f"`flwr {' '.join(args)}` failed ({res.returncode}): {(res.stdout + res.stderr)[-1500:]}")
    return res


def submit_run(config_path: Path, flwr_home: Path, *, connection: str = "rectalfl", run_dir: Path | None = None,
               resume: bool = False, expected_sites: int | None = None, stream: IO[str] | None = None,
               timeout: float | None = None, app_dir: Path = APP_DIR,
               on_submitted: Callable[[str], None] | None = None,
               on_poll: Callable[[], None] | None = None) -> dict[str, Any]:
    """``flwr run <app> <connection>`` with the rectalfl run config; waits for the run and returns its status.

    ``flwr run --stream`` exits 0 even when the run fails, so the status comes from ``flwr ls``.
    ``on_submitted(run_id)`` is called once the SuperLink accepted the run, ``on_poll()`` about every
    second while waiting (the progress display).
    """
    conf = [f"config-path='{Path(config_path).resolve()}'", "simulation=false"]
    if run_dir is not None:
        conf.append(f"run-dir='{Path(run_dir).resolve()}'")
    if resume:
        conf.append("resume=true")
    if expected_sites:
        conf.append(f"expected-sites={int(expected_sites)}")
    res = flwr(["run", str(app_dir), connection, "--run-config", " ".join(conf), "--format", "json"], flwr_home,
               timeout=300)
    m = re.search(r'"run-id"\s*:\s*"?(\d+)', res.stdout)
    if not m:
        raise DeployError(f"`flwr run` did not report a run id: {res.stdout[-800:]}")
    run_id = m.group(1)
    if on_submitted is not None:
        on_submitted(run_id)
    return wait_run(run_id, flwr_home, connection=connection, stream=stream, timeout=timeout, on_poll=on_poll)


def wait_run(run_id: str, flwr_home: Path, *, connection: str = "rectalfl", stream: IO[str] | None = None,
             timeout: float | None = None, poll_s: float = 30.0,
             on_poll: Callable[[], None] | None = None) -> dict[str, Any]:
    """Follow ``flwr log RUN --stream`` (which ends when the run finishes) and return ``flwr ls``'s record.

    ``flwr ls`` (a CLI start, ~1 s of CPU) runs when the log stream ends and every ``poll_s`` seconds
    as a fallback, every 5 s once the stream is gone (e.g. the SuperLink went down).
    """
    deadline = None if timeout is None else time.time() + timeout
    logs: subprocess.Popen | None = subprocess.Popen(
        [tool("flwr"), "log", str(run_id), connection, "--stream"], env=flwr_env(flwr_home),
        stdout=stream if stream is not None else subprocess.DEVNULL, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)
    unknown, last, tick = 0, time.time(), 0.0
    try:
        while True:
            ended = logs is not None and logs.poll() is not None
            if ended:
                logs = None
            if on_poll is not None and time.time() - tick >= 1.0:
                tick = time.time()
                on_poll()
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
