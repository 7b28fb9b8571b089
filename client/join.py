"""Joining a consortium from a hospital (``rectalfl site join``): checks, then the SuperNode and the app gate.

Runs on the hospital's machine. Before anything starts, the checks turn the usual failures into
what to do: an unreachable server, a certificate the consortium CA does not vouch for, a key the
SuperLink refuses. Then two processes run, both under ``rectalfl site join``'s supervision::

    flower-supernode --superlink HOST:PORT --root-certificates ca.crt \\
        --auth-supernode-private-key site.key --node-config "site-name=... data-dir=... cache-dir=..." \\
        --isolation process --superexec-auth-secret-file <flwr_home>/superexec.secret \\
        --host 127.0.0.1 --port NODE_PORT
    python -P client/app_gate.py superexec ...   # claims ClientApp tasks; approved app bundles only

with ``FLWR_HOME`` in the site's own folder (``deploy.site_flwr_home``, default ``<cache>/flower``).
"""

from __future__ import annotations

import re
import socket
import ssl
import sys
from pathlib import Path

from shared.flower import APP_DIR, DeployError, app_hash, split_address, tool


def check_reachable(address: str, timeout: float = 5.0) -> None:
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise DeployError(f"cannot reach the SuperLink at {address} ({exc.strerror or exc}); check the address in "
                          "deploy.superlink, that the operator's `rectalfl server start` is running and that the "
                          "firewall lets this machine connect to that port") from None


def check_tls(address: str, ca_file: Path, timeout: float = 5.0) -> None:
    """Open a TLS connection to ``address`` trusting only ``ca_file``; clear error if that fails."""
    host, port = split_address(address)
    if not Path(ca_file).is_file():
        raise DeployError(f"root certificate {ca_file} not found; ask the operator for the consortium's ca.crt")
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    except ssl.SSLError as exc:
        raise DeployError(f"{ca_file} is not a PEM certificate ({exc}); ask the operator for ca.crt again") from None
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, ctx.wrap_socket(raw, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as exc:
        raise DeployError(f"the SuperLink at {address} presented a certificate that {ca_file} does not vouch for "
                          f"({exc.verify_message}); check that you have this consortium's ca.crt and that the "
                          "operator issued server.crt for this host name (`rectalfl certs init --host ...`)") from None
    except ssl.SSLError as exc:
        raise DeployError(f"TLS handshake with {address} failed ({exc}); is the SuperLink running with TLS?") from None
    except OSError:
        check_reachable(address, timeout)
        raise




def supernode_command(superlink: str, ca_file: Path, key_file: Path, *, site: str, data_dir: Path, cache_dir: Path,
                      secret_file: Path, device: str | None = None, node_port: int = 9094,
                      site_config: Path | None = None, max_retries: int | None = None,
                      busy_poll_s: float | None = 0.2) -> list[str]:
    """The flower-supernode command line.

    With ``busy_poll_s`` (the default) Flower's SuperNode runs through :mod:`client.supernode_poll`:
    the same entry point and arguments, but while a run is busy an empty pull is repeated after
    ``busy_poll_s`` instead of Flower's fixed 3 s (back to 3 s when idle). ``None``: plain
    ``flower-supernode``.

    ``--isolation process``: the SuperNode starts no app process itself; the site's app gate
    (:mod:`client.app_gate`, :func:`gate_command`) claims ClientApp tasks from its runtime API on
    127.0.0.1:``node_port``, where claiming a task needs the SuperExec secret in ``secret_file``.
    Without ``max_retries`` it keeps reconnecting (e.g. while the SuperLink restarts), as a hospital's
    node should.
    """
    node_config = (f"site-name='{site}' data-dir='{Path(data_dir).resolve()}' cache-dir='{Path(cache_dir).resolve()}' "
                   f"site-key='{Path(key_file).resolve()}'")  # the site's own key: its secure-aggregation identity
    if site_config is not None:
        node_config += f" site-config='{Path(site_config).resolve()}'"
    if device:
        node_config += f" device='{device}'"
    launcher = ([sys.executable, "-P", str(Path(__file__).with_name("supernode_poll.py").resolve()),
                 "--busy-poll", str(busy_poll_s)] if busy_poll_s is not None else [tool("flower-supernode")])
    return [*launcher, "--superlink", superlink, "--root-certificates", str(Path(ca_file).resolve()),
            "--auth-supernode-private-key", str(Path(key_file).resolve()), "--node-config", node_config,
            "--isolation", "process", "--superexec-auth-secret-file", str(Path(secret_file).resolve()),
            "--host", "127.0.0.1", "--port", str(node_port),
            *(["--max-retries", str(max_retries)] if max_retries is not None else [])]


def gate_command(node_port: int, secret_file: Path, allowed: list[str], *, site: str, audit_log: Path,
                 parent_pid: int | None = None, warm_start: bool = True) -> list[str]:
    """The site's app gate in SuperExec mode (see :mod:`client.app_gate`), run by path with ``python -P``
    so it imports nothing of the project (the app's code comes from the approved bundle only)."""
    cmd = [sys.executable, "-P", str(Path(__file__).with_name("app_gate.py").resolve()), "superexec",
           "--runtime-api-address", f"127.0.0.1:{node_port}", "--secret-file", str(Path(secret_file).resolve()),
           "--site", site, "--audit-log", str(Path(audit_log).resolve())]
    for h in allowed:
        cmd += ["--allowed", h]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    if not warm_start:
        cmd.append("--cold-start")
    return cmd


APP_HASH = re.compile(r"^[0-9a-f]{64}$")


def allowed_apps(configured: list[str]) -> tuple[list[str], str]:
    """The app bundle hashes this site runs, and where they come from.

    ``policy.allowed_apps`` when set (each a SHA-256 in hex, as ``rectalfl site join --print-app-hash``
    prints); otherwise the hash of the rectalfl installed here, i.e. the site runs exactly the code it
    installed and reviewed.
    """
    if configured:
        bad = [h for h in configured if not APP_HASH.match(h.strip().lower().removeprefix("sha256:"))]
        if bad:
            raise DeployError(f"policy.allowed_apps: {bad[0]!r} is not an app hash (64 hex characters, as printed by "
                              "`rectalfl site join --print-app-hash` on the release you reviewed)")
        return [h.strip().lower().removeprefix("sha256:") for h in configured], "policy.allowed_apps"
    return [app_hash(APP_DIR)], f"the rectalfl installed in {APP_DIR}"


REFUSED = re.compile(r"Exit Code: 305|Failed to activate SuperNode|code: 2004")
BAD_KEY = re.compile(r"Exit Code: 302|Unable to parse the private key")


def explain_supernode_exit(code: int, output: str, key_file: Path, site: str | None = None) -> str:
    """A message for a SuperNode that stopped, from its exit code and log."""
    if BAD_KEY.search(output):
        return (f"{key_file} is not a SuperNode key (EC private key in OpenSSH format); use the site.key the "
                "operator made with `rectalfl certs add-site`")
    if REFUSED.search(output):
        who = site or "NAME"
        return (f"the SuperLink refused this site's key ({key_file}): it is not registered, or it was revoked. The "
                f"operator lists {who} in deploy.sites of the server config, creates its key if needed "
                f"(`rectalfl certs add-site {who}`; a revoked key: `rectalfl certs rotate-site {who}`) and restarts "
                "its `rectalfl server start`, which registers exactly the listed sites")
    return f"flower-supernode stopped with exit code {code}:\n{output[-1500:]}"
