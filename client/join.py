"""Joining a consortium from a hospital (``rectalfl site join``): checks, then flower-supernode.

Runs on the hospital's machine. Before anything starts, the checks turn the usual failures into
what to do: an unreachable server, a certificate the consortium CA does not vouch for, a key the
SuperLink refuses. The SuperNode runs as::

    flower-supernode --superlink HOST:PORT --root-certificates ca.crt \\
        --auth-supernode-private-key site.key --node-config "site-name=... data-dir=... cache-dir=..."
"""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path

from shared.flower import DeployError, split_address, tool


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
                      device: str | None = None, node_port: int = 9094, max_retries: int | None = None) -> list[str]:
    """The flower-supernode command line; without ``max_retries`` it keeps reconnecting (e.g. while the
    SuperLink restarts), as a hospital's node should."""
    node_config = f"site-name='{site}' data-dir='{Path(data_dir).resolve()}' cache-dir='{Path(cache_dir).resolve()}'"
    if device:
        node_config += f" device='{device}'"
    return [tool("flower-supernode"), "--superlink", superlink, "--root-certificates", str(Path(ca_file).resolve()),
            "--auth-supernode-private-key", str(Path(key_file).resolve()), "--node-config", node_config,
            "--host", "127.0.0.1", "--port", str(node_port),
            *(["--max-retries", str(max_retries)] if max_retries is not None else [])]


REFUSED = re.compile(r"Exit Code: 305|Failed to activate SuperNode|code: 2004")
BAD_KEY = re.compile(r"Exit Code: 302|Unable to parse the private key")


def explain_supernode_exit(code: int, output: str, key_file: Path) -> str:
    """A message for a SuperNode that stopped, from its exit code and log."""
    if BAD_KEY.search(output):
        return (f"{key_file} is not a SuperNode key (EC private key in OpenSSH format); use the site.key the "
                "operator made with `rectalfl certs add-site`")
    if REFUSED.search(output):
        return ("the SuperLink refused this site's key: it is not registered. Ask the operator to run "
                "`rectalfl certs add-site NAME` (if not done), then restart `rectalfl server start` or register the "
                "key with `flwr supernode register certs/sites/NAME/site.pub`")
    return f"flower-supernode stopped with exit code {code}:\n{output[-1500:]}"
