"""The operator's SuperExec: starts the ServerApp of each run, and only it can claim those tasks.

``rectalfl server start`` runs ``flower-superlink --isolation process --superexec-auth-secret-file
S`` on a loopback address, so ServerApp tasks wait in the SuperLink's runtime API until a process
holding the secret claims them (Flower checks an HMAC of ``AcquireTask``). This is that process:
Flower's SuperExec loop (``flwr.supercore.superexec.run_superexec``) reduced to what a rectalfl
server needs, with two differences:

* it claims ServerApp tasks only, and hands each ``flwr-serverapp`` its task token in a 0600 file
  (``--token-file``) rather than on a command line other local accounts can read;
* a failed poll (the SuperLink answering 500 when its SQLite state is momentarily locked under
  load, or restarting) is logged and retried with back-off instead of ending the process, which in
  Flower's own SuperExec would also end the ServerApp of a running run (it watches its parent).

Run as ``python -m server.superexec --runtime-api-address 127.0.0.1:PORT --root-certificates
ca.crt --superexec-auth-secret-file S --token-dir DIR --parent-pid PID``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("rectalfl.superexec")


def run(runtime_api_address: str, root_certificates: Path, secret_file: Path, token_dir: Path,
        parent_pid: int | None = None, poll_s: float = 1.0) -> None:
    """Claim ServerApp tasks and start one ``flwr-serverapp`` per task (blocks until SIGTERM)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    from shared.certs import write_file
    from shared.flower import die_with_parent, tool

    secret = load_superexec_auth_secret(str(secret_file))
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    token_dir = Path(token_dir)
    token_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(token_dir, 0o700)
    for stale in token_dir.glob("*.token"):
        stale.unlink(missing_ok=True)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=False, root_certificates=Path(root_certificates).read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}))],
        retry_invoker=make_simple_http_retry_invoker())
    children: dict[subprocess.Popen, Path] = {}

    def reap() -> None:
        for proc, token in list(children.items()):
            if proc.poll() is not None:
                token.unlink(missing_ok=True)
                del children[proc]

    def stop(*_: Any) -> None:
        for proc in children:
            if proc.poll() is None:
                proc.terminate()
        for proc, token in children.items():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            token.unlink(missing_ok=True)
        client.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failures = 0
    while True:
        reap()
        try:
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[str(TaskType.SERVER_APP)]))
        except Exception as exc:  # noqa: BLE001 - a busy or restarting SuperLink: try again later
            failures += 1
            wait = min(30.0, poll_s * 2 ** min(failures, 5))
            logger.warning("claiming a ServerApp task failed (%s: %s); retrying in %.0f s", type(exc).__name__,
                           str(exc).splitlines()[0][:200], wait)
            time.sleep(wait)
            continue
        failures = 0
        if res.HasField("task") and res.token:
            token = token_dir / f"task-{res.task.task_id}.token"
            write_file(token, res.token.encode(), private=True)
            proc = subprocess.Popen([tool("flwr-serverapp"), "--runtime-api-address", runtime_api_address,
                                     "--token-file", str(token), "--root-certificates",
                                     str(Path(root_certificates).resolve()), "--parent-pid", str(os.getpid())],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    preexec_fn=die_with_parent())  # Flower's own parent watch misses unreaped parents
            children[proc] = token
            logger.info("started the ServerApp of run %s (task %s)", res.task.run_id, res.task.task_id)
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--root-certificates", required=True, type=Path)
    p.add_argument("--superexec-auth-secret-file", required=True, type=Path)
    p.add_argument("--token-dir", required=True, type=Path)
    p.add_argument("--parent-pid", type=int, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s | %(message)s")
    run(a.runtime_api_address, a.root_certificates, a.superexec_auth_secret_file, a.token_dir, a.parent_pid)


if __name__ == "__main__":
    main()
