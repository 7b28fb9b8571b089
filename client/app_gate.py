"""The site's app gate: a hospital runs only the Flower app versions its own policy approved.

Flower 1.41 can check app signatures on a SuperNode (``--trusted-entities``) only for apps that
Flower Hub signed (the SuperLink must attach a ``valid_license`` verification, which a locally built
``flwr run .`` bundle never has), and those verifications travel from the SuperLink, the very server
a hospital should not have to trust. So ``rectalfl site join`` runs ``flower-supernode --isolation
process`` (the SuperNode starts no app process itself) and this gate in its place:

``superexec`` mode
    Flower's SuperExec loop, restricted: claims ClientApp tasks from the SuperNode's loopback
    runtime API with the SuperExec secret (``AcquireTask`` is HMAC-authenticated; nothing else on
    the machine can claim a task) and starts one ``clientapp`` process per task (the task token goes
    through a pipe, never on a command line). Other task types (agent apps, connectors, models) are
    never claimed.
``warm`` mode (default; ``deploy.site_warm_start``)
    One process, started by the gate, that imports the third-party libraries a ClientApp needs
    (Flower's runtime, NumPy, pandas, SciPy, scikit-learn, PyTorch, MONAI: :data:`PRELOAD`) and then
    waits. For each claimed task the gate hands it the task token and it forks (``os.fork``): the child runs
    ``clientapp`` mode below and exits. A fresh Python spends 2-4 s (statistics) to 8 s (training) of
    CPU importing these at every message; a fork takes milliseconds. What stays the same: every
    message runs in its own new process; the warm process never imports the project's packages,
    never receives a message and never opens site data (it holds modules only, checked at start:
    :func:`preload` refuses to go on if any ``client`` / ``shared`` module was imported), so the
    bundle check below still comes before any of the app's code is unpacked or imported; the child
    gets fresh random seeds (Python's ``random`` reseeds after ``fork``; NumPy's and PyTorch's global
    generators are reseeded by :func:`_child_after_fork`) and dies with the warm process, which dies
    with the gate.
``clientapp`` mode
    Flower's own ``flwr-clientapp`` routine (``run_clientapp``), with one step added before Flower
    installs and imports the app: the SHA-256 of the app bundle's bytes must be one of the allowed
    hashes (``policy.allowed_apps``, or the site's installed rectalfl) and equal the hash the run
    announced. Otherwise no file of the app is unpacked or imported: the task ends with an error
    reply naming the rule, and one line goes to the site's ``audit.jsonl`` (``refused``,
    ``policy_rule: allowed_apps``, the bundle's hash).

This file is run by path (``python -P client/app_gate.py ...``) and imports only the standard
library and Flower, so that the app's own ``client`` / ``shared`` packages are imported from the
approved bundle and from nowhere else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HASH = re.compile(r"^[0-9a-f]{64}$")
ENV_ALLOWED = "RECTALFL_ALLOWED_APPS"
ENV_AUDIT = "RECTALFL_AUDIT_LOG"
ENV_SITE = "RECTALFL_SITE"
RULE = "allowed_apps"


class AppNotApproved(RuntimeError):
    """The app bundle a run sent is not one this site approved; nothing of it was unpacked or imported."""


def check_bundle(content: bytes, allowed: set[str], announced: str | None, site: str) -> str:
    """Return the bundle's SHA-256 if it may run here, else raise :class:`AppNotApproved` naming the rule."""
    digest = hashlib.sha256(content).hexdigest()
    if digest not in allowed:
        raise AppNotApproved(
            f"site {site} refuses app bundle sha256:{digest}: not in its policy.allowed_apps "
            f"(allowed: {', '.join(sorted(h[:12] for h in allowed)) or 'none'}); the site's IT team reviews a new "
            "version and adds its hash (`rectalfl site join --print-app-hash` on the reviewed release)")
    if announced and announced != digest:
        raise AppNotApproved(f"site {site} refuses the run: its app bundle hashes to sha256:{digest} but the run "
                             f"announced {announced}")
    return digest


def audit_refusal(path: Path | None, message: Any, run: Any, digest: str, reason: str) -> None:
    """One ``audit.jsonl`` line for a refused message (fields as ``client.client_app.audit`` writes)."""
    if path is None:
        return
    try:
        bytes_in = int(sum(r.count_bytes() for r in message.content.values()))
    except Exception:  # noqa: BLE001 - a malformed message is still recorded
        bytes_in = 0
    entry = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "run_id": str(message.metadata.run_id),
             "message_type": message.metadata.message_type, "server_round": 0, "bytes_in": bytes_in,
             "bytes_out": 0, "sent": {}, "error": reason, "refused": reason, "policy_rule": RULE,
             "fab_hash": digest, "app": f"{getattr(run, 'fab_id', '')} {getattr(run, 'fab_version', '')}".strip()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- clientapp mode
def clientapp(runtime_api_address: str, parent_pid: int | None, token: str | None = None) -> None:
    """Run one ClientApp task as ``flwr-clientapp`` does, refusing unapproved bundles before install.

    ``token``: the task's token (in warm mode, from the warm process); else read from stdin.
    """
    import flwr.supernode.runtime.run_clientapp as rc

    token = token if token is not None else sys.stdin.readline().strip()
    allowed = {h for h in os.environ.get(ENV_ALLOWED, "").split(",") if HASH.match(h)}
    audit_path = Path(os.environ[ENV_AUDIT]) if os.environ.get(ENV_AUDIT) else None
    site = os.environ.get(ENV_SITE, "this site")
    seen: dict[str, Any] = {}
    pull, install = rc.pull_task_input, rc.install_from_fab

    def pull_and_keep(client: Any) -> Any:
        out = pull(client)
        seen["message"], seen["context"], seen["run"], seen["fab"] = out
        return out

    def checked_install(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        fab = seen.get("fab")
        try:
            digest = check_bundle(content, allowed, getattr(fab, "hash_str", None), site)
        except AppNotApproved as exc:
            reason = str(exc)
            print(f"[rectalfl app gate] REFUSED: {reason}", file=sys.stderr, flush=True)
            if "message" in seen:
                audit_refusal(audit_path, seen["message"], seen.get("run"),
                              hashlib.sha256(content).hexdigest(), reason)
            raise
        print(f"[rectalfl app gate] approved app bundle sha256:{digest[:12]}", file=sys.stderr, flush=True)
        return install(fab_file, *args, **kwargs)

    rc.pull_task_input = pull_and_keep
    rc.install_from_fab = checked_install
    rc.run_clientapp(runtime_api_address=runtime_api_address, token=token, insecure=True, certificates=None,
                     parent_pid=parent_pid, runtime_dependency_install=False)


# --------------------------------------------------------------------------- warm mode
PRELOAD = ("flwr.supernode.runtime.run_clientapp", "flwr.clientapp", "flwr.app", "numpy", "pandas", "yaml",
           "pydantic", "scipy.stats", "scipy.optimize", "sklearn.metrics", "cryptography.hazmat.primitives.asymmetric.x25519",
           "SimpleITK", "torch", "monai.networks.nets", "monai.transforms")
"""Third-party modules the warm process imports once (what a ClientApp of this project imports; a module
that is not installed is skipped)."""
PROJECT_PACKAGES = ("client", "shared", "server", "simulations", "rectalfl")


def preload(modules: tuple[str, ...] = PRELOAD) -> list[str]:
    """Import ``modules`` (skipping missing ones); return those imported. Refuses (``RuntimeError``) if any
    project package ended up imported, or if a thread was started: a fork must copy libraries only."""
    import importlib
    import threading

    done = []
    for name in modules:
        try:
            importlib.import_module(name)
            done.append(name)
        except ImportError:
            continue
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES)
    if leaked:
        raise RuntimeError(f"warm process imported project modules {leaked[:5]}: it must hold third-party libraries only")
    if threading.active_count() != 1:
        raise RuntimeError(f"warm process has {threading.active_count()} threads after preloading: fork is unsafe")
    return done


def _child_after_fork() -> None:
    """In a forked ClientApp: die with the warm process, default signals, fresh generator seeds."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    seed = int.from_bytes(os.urandom(4), "little")
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def warm(runtime_api_address: str, parent_pid: int | None, modules: tuple[str, ...] = PRELOAD) -> None:
    """Preload, then fork one ``clientapp`` per task token read from stdin (one per line) until EOF."""
    t0 = time.time()
    done = preload(modules)
    print(f"[rectalfl app gate] warm process ready in {time.time() - t0:.1f} s ({len(done)} libraries preloaded)",
          file=sys.stderr, flush=True)
    children: set[int] = set()

    def reap() -> None:
        for pid in list(children):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    children.discard(pid)
            except ChildProcessError:
                children.discard(pid)

    def stop(*_: Any) -> None:
        reap()
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for line in sys.stdin:
        reap()
        token = line.strip()
        if not token:
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the ClientApp: a new process holding only the preloaded libraries
            code = 0
            try:
                _child_after_fork()
                sys.stdin = open(os.devnull)  # noqa: SIM115 - the token pipe belongs to the warm process
                clientapp(runtime_api_address, parent_pid, token=token)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - reported like an uncaught error, then the child ends
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.add(pid)
    stop()


# --------------------------------------------------------------------------- superexec mode
def _die_with_parent() -> Any:
    """SIGKILL a ClientApp when this gate dies (Linux ``PR_SET_PDEATHSIG``; as
    ``shared.flower.die_with_parent``, repeated here because this file imports no project package)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def superexec(runtime_api_address: str, secret_file: Path, allowed: list[str], audit_log: Path | None, site: str,
              parent_pid: int | None, poll_s: float = 0.25, warm_start: bool = True) -> None:
    """Claim ClientApp tasks from the SuperNode and start one gated ``clientapp`` process for each.

    ``warm_start``: fork each from the warm process (see the module docstring) instead of starting a
    new Python; if the warm process has died, it is started again.

    The SuperNode's runtime API is asked every ``poll_s`` (a loopback request): every message of a run
    waits for this claim, so 0.25 s (Flower's SuperExec default is 1 s) takes ~0.4 s off each on average.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    bad = [h for h in allowed if not HASH.match(h)]
    if bad or not allowed:
        sys.exit(f"app gate: allowed app hashes must be 64 hex characters, got {bad or 'none'}")
    secret = load_superexec_auth_secret(str(secret_file))
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}))],
        retry_invoker=make_simple_http_retry_invoker())
    children: list[subprocess.Popen] = []
    warm_proc: list[subprocess.Popen] = []

    def stop(*_: Any) -> None:
        for c in [*children, *warm_proc]:
            if c.poll() is None:
                c.terminate()
        client.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    env = dict(os.environ, **{ENV_ALLOWED: ",".join(allowed), ENV_SITE: site})
    if audit_log is not None:
        env[ENV_AUDIT] = str(audit_log)
    print(f"[rectalfl app gate] {site}: ClientApp tasks run only for app bundle(s) "
          f"{', '.join(h[:12] for h in allowed)}", flush=True)
    here = str(Path(__file__).resolve())

    def start_warm() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-P", here, "warm", "--runtime-api-address", runtime_api_address,
                                 "--parent-pid", str(os.getpid())],
                                stdin=subprocess.PIPE, env=env, preexec_fn=_die_with_parent(), text=True)
        warm_proc[:] = [proc]
        return proc

    if warm_start:
        start_warm()
    failures = 0
    while True:
        children[:] = [c for c in children if c.poll() is None]
        try:
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[str(TaskType.CLIENT_APP)]))
        except Exception as exc:  # noqa: BLE001 - a busy or restarting SuperNode: try again later
            failures += 1
            wait = min(30.0, poll_s * 2 ** min(failures, 5))
            print(f"[rectalfl app gate] claiming a task failed ({type(exc).__name__}); retrying in {wait:.0f} s",
                  file=sys.stderr, flush=True)
            time.sleep(wait)
            continue
        failures = 0
        if res.HasField("task") and res.token and warm_start:
            for attempt in (1, 2):  # a warm process that died (even between the check and the write) is restarted
                proc = warm_proc[0] if warm_proc and warm_proc[0].poll() is None else start_warm()
                try:
                    assert proc.stdin is not None
                    proc.stdin.write(f"{res.token}\n")
                    proc.stdin.flush()
                    break
                except (BrokenPipeError, OSError):
                    warm_proc.clear()
                    if attempt == 2:
                        raise
        elif res.HasField("task") and res.token:
            proc = subprocess.Popen([sys.executable, "-P", str(Path(__file__).resolve()), "clientapp",
                                     "--runtime-api-address", runtime_api_address, "--parent-pid", str(os.getpid())],
                                    stdin=subprocess.PIPE, env=env, preexec_fn=_die_with_parent())
            assert proc.stdin is not None
            proc.stdin.write(f"{res.token}\n".encode())
            proc.stdin.close()
            children.append(proc)
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="rectalfl's site app gate (see the module docstring)")
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("superexec")
    s.add_argument("--runtime-api-address", required=True)
    s.add_argument("--secret-file", required=True, type=Path)
    s.add_argument("--allowed", action="append", default=[], help="an allowed app bundle SHA-256 (repeatable)")
    s.add_argument("--audit-log", type=Path, default=None)
    s.add_argument("--site", default="this site")
    s.add_argument("--parent-pid", type=int, default=None)
    s.add_argument("--cold-start", action="store_true", help="a fresh Python per message (no warm process)")
    for mode in ("clientapp", "warm"):
        c = sub.add_parser(mode)
        c.add_argument("--runtime-api-address", required=True)
        c.add_argument("--parent-pid", type=int, default=None)
    a = p.parse_args(argv)
    if a.mode == "superexec":
        superexec(a.runtime_api_address, a.secret_file, a.allowed, a.audit_log, a.site, a.parent_pid,
                  warm_start=not a.cold_start)
    elif a.mode == "warm":
        warm(a.runtime_api_address, a.parent_pid)
    else:
        clientapp(a.runtime_api_address, a.parent_pid)


if __name__ == "__main__":
    main()
