"""CLI for a real consortium: ``rectalfl certs``, ``server start``, ``run`` and ``site join``.

Registered on the main app by :mod:`shared.cli`. Each command is a thin layer over Flower's own
processes (see :mod:`server.deploy`), with checks that turn the usual failures into instructions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

certs_app = typer.Typer(help="Operator: the consortium's CA, the SuperLink certificate and the sites' keys.",
                        no_args_is_help=True)
server_app = typer.Typer(help="Operator: run the SuperLink (TLS + SuperNode authentication).", no_args_is_help=True)

DirOpt = Annotated[Path, typer.Option("--dir", "-d", help="Certificate folder.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing files.")]


def _cli():
    from shared import cli

    return cli


@certs_app.command("init")
def certs_init(
    folder: DirOpt = Path("certs"),
    host: Annotated[list[str] | None, typer.Option("--host", help="Host name or IP the sites use to reach the "
                                                               "SuperLink (repeatable; localhost is always included).")] = None,
    force: ForceOpt = False,
) -> None:
    """Create the consortium CA and the SuperLink's TLS certificate."""
    from shared.certs import CertError, init_ca

    try:
        files = init_ca(folder, list(host or []), force=force)
    except CertError as exc:
        _cli()._fail(str(exc))
    _cli().out.print(f"CA: {files['ca_cert']} (send to every site)\nkeep private: {files['ca_key']}, "
                     f"{files['server_key']}\nnext: rectalfl certs add-site NAME --dir {folder}")


@certs_app.command("add-site")
def certs_add_site(
    name: Annotated[str, typer.Argument(help="The hospital's site name (as in its site config).")],
    folder: DirOpt = Path("certs"),
    force: ForceOpt = False,
) -> None:
    """Create a hospital's SuperNode key pair (give sites/NAME/site.key and ca.crt to that hospital only)."""
    from shared.certs import CertError, add_site

    try:
        files = add_site(folder, name, force=force)
    except CertError as exc:
        _cli()._fail(str(exc))
    _cli().out.print(f"{name}: private key {files['key']} (give to {name} with {folder}/ca.crt), public key "
                     f"{files['pub']} (registered by `rectalfl server start`)")


@server_app.command("start")
def server_start(
    config: Annotated[Path, typer.Option("--config", "-c", help="Server config (deploy section).")] =
    Path("configs/server.example.yaml"),
    log: Annotated[Path | None, typer.Option("--log", help="SuperLink log file (default <flwr_home>/superlink.log).")]
    = None,
) -> None:
    """Start flower-superlink with TLS and SuperNode authentication, register every site key, wait (Ctrl-C stops)."""
    from server.deploy import DeployError, register_sites, start_superlink
    from shared.certs import CertError

    cli = _cli()
    cfg = cli._load(config)
    d = cfg.deploy
    log = log or (d.flwr_home / "superlink.log")
    try:
        proc = start_superlink(d.certs_dir, d.superlink, d.flwr_home, log, connection=d.connection,
                               database=d.database)
    except (DeployError, CertError) as exc:
        cli._fail(str(exc))
    try:
        registered = register_sites(d.certs_dir, d.flwr_home, d.connection)
    except DeployError as exc:
        proc.terminate()
        cli._fail(str(exc))
    cli.out.print(f"SuperLink listening on {d.superlink} (TLS, SuperNode authentication), log {log}")
    for site, node in registered.items():
        cli.out.print(f"  registered {site}: node {node}")
    if not registered:
        cli.out.print(f"[yellow]no site keys in {d.certs_dir}/sites yet[/]: `rectalfl certs add-site NAME`, then "
                      "restart this command")
    cli.out.print(f"Flower CLI connection '{d.connection}' in {d.flwr_home}/config.toml; submit with "
                  f"`rectalfl run --config {config}`. Ctrl-C stops the SuperLink.")
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait(timeout=30)
    raise typer.Exit(0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else 1)


def run_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="Server config (training recipe + deploy section).")]
    = Path("configs/server.example.yaml"),
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory (default runs/<time>-<name>).")]
    = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue this run directory from its last "
                                                             "completed round.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Give up waiting after this many seconds.")] = None,
) -> None:
    """Submit the pipeline to the running SuperLink (`flwr run <app> <connection>`) and wait for it."""
    from server.deploy import DeployError, submit_run
    from server.pipeline import new_run_dir
    from shared.certs import site_public_keys

    cli = _cli()
    cfg = cli._load(config)
    d = cfg.deploy
    target = (resume or run_dir or new_run_dir(cfg)).resolve()
    n_sites = len(site_public_keys(d.certs_dir)) or None
    cli.out.print(f"submitting to '{d.connection}' ({d.superlink}); run directory {target}")
    try:
        info = submit_run(config, d.flwr_home, connection=d.connection, run_dir=target, resume=resume is not None,
                          expected_sites=n_sites, stream=sys.stdout, timeout=timeout)
    except DeployError as exc:
        cli._fail(str(exc))
    status = str(info.get("status", "unknown"))
    if status == "finished:completed":
        from server.simulate import print_summary

        print_summary(target, cli.out)
        raise typer.Exit(0)
    cli._fail(f"run {info.get('run-id')} ended {status}: {info.get('status-details', '')}\nthe run record in "
              f"{target} keeps what finished; continue with `rectalfl run --config {config} --resume {target}`", 1)


def site_join(
    config: Annotated[Path, typer.Option("--config", "-c", help="Site config (data_root, cache_root, deploy).")] =
    Path("configs/site.example.yaml"),
    server: Annotated[str | None, typer.Option("--server", help="SuperLink HOST:PORT (default deploy.superlink).")]
    = None,
    root_cert: Annotated[Path | None, typer.Option("--root-cert", help="The consortium's ca.crt.")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="This site's site.key.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Site name (default deploy.site_name or the data "
                                                           "folder's name).")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Site data folder (default data_root).")] = None,
    cache: Annotated[Path | None, typer.Option("--cache", help="Site cache folder (default cache_root).")] = None,
    node_port: Annotated[int | None, typer.Option("--node-port", help="Local port of this SuperNode (unique per "
                                                                     "SuperNode on one machine).")] = None,
    skip_check: Annotated[bool, typer.Option("--skip-check", help="Do not re-check the data.")] = False,
) -> None:
    """Check the site's data, preprocess if needed, then connect this hospital to the consortium (flower-supernode)."""
    from client.preprocess import preprocess_site
    from server.deploy import DeployError, check_reachable, check_tls, supernode_command
    from shared.cohort import CohortError, check_site

    cli = _cli()
    overrides = {k: str(v) for k, v in {"data_root": data, "cache_root": cache}.items() if v is not None}
    if node_port is not None:
        overrides["deploy.node_port"] = str(node_port)
    cfg = cli._load(config, overrides)
    d = cfg.deploy
    superlink = server or d.superlink
    ca, site_key = root_cert or d.root_certificates, key or d.site_key
    if ca is None or site_key is None:
        cli._fail("need the consortium's ca.crt and this site's site.key: --root-cert and --key, or "
                  "deploy.root_certificates and deploy.site_key in the site config")
    if not Path(site_key).is_file():
        cli._fail(f"site key {site_key} not found; the operator creates it with `rectalfl certs add-site NAME`")
    site_dir, cache_dir = Path(cfg.data_root), Path(cfg.cache_root)
    site = name or d.site_name or site_dir.resolve().name
    if not skip_check:
        with cli.progress_bar(f"checking {site}") as cb:
            try:
                report = check_site(site_dir, cfg, progress=cb, read_pixels=False)
            except CohortError as exc:
                cli._fail(str(exc))
        if not report.ok:
            cli._print_report(report)
            cli._fail(f"{site_dir} is not usable yet; fix the errors above (`rectalfl site check {site_dir}`)", 1)
        cli.out.print(f"{site}: {report.n_usable_patients} usable patient(s)")
    with cli.progress_bar(f"preprocessing {site} (only what is missing)") as cb:
        try:
            preprocess_site(site_dir, cache_dir, cfg, progress=cb)
        except CohortError as exc:
            cli._fail(str(exc))
    try:
        check_reachable(superlink)
        check_tls(superlink, Path(ca))
    except DeployError as exc:
        cli._fail(str(exc))
    cmd = supernode_command(superlink, Path(ca), Path(site_key), site=site, data_dir=site_dir, cache_dir=cache_dir,
                            device=None if cfg.train.device == "auto" else cfg.train.device, node_port=d.node_port)
    cli.out.print(f"joining {superlink} as {site} (data stays in {site_dir}; audit log {cache_dir}/audit.jsonl). "
                  "Ctrl-C leaves the consortium.")
    run_supervised(cmd, Path(site_key))


def run_supervised(cmd: list[str], site_key: Path, *, retry_s: float = 10.0, max_quick_failures: int = 5) -> None:
    """Run flower-supernode in the foreground and keep this site in the consortium.

    Flower's SuperNode stops when it loses its SuperLink (e.g. the server restarted); this restarts it
    after ``retry_s`` seconds. A refused or unreadable key stops for good, with what to do; so do
    ``max_quick_failures`` consecutive exits before ever connecting. Ctrl-C leaves.
    """
    from server.deploy import BAD_KEY, REFUSED, explain_supernode_exit, flwr_env

    cli = _cli()

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # `kill` (or a service manager) leaves cleanly, SuperNode included
    quick = 0
    while True:
        t0 = time.time()
        # own process group: its helper processes (flower-superexec) go with it
        proc = subprocess.Popen(cmd, env=flwr_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        tail: list[str] = []
        state = {"connected": False}

        def pump(stream=proc.stdout, tail=tail, state=state) -> None:
            for line in stream:
                sys.stdout.write(line)
                sys.stdout.flush()
                state["connected"] = state["connected"] or "SuperNode ID" in line
                tail.append(line)
                del tail[:-60]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            _killpg(proc, signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _killpg(proc, signal.SIGKILL)
            raise typer.Exit(0) from None
        reader.join(timeout=3)
        _killpg(proc, signal.SIGTERM)
        connected = state["connected"]
        text = "".join(tail)
        if BAD_KEY.search(text) or REFUSED.search(text):
            cli._fail(explain_supernode_exit(code, text, site_key), 1)
        quick = 0 if connected or time.time() - t0 > 60 else quick + 1
        if quick >= max_quick_failures:
            cli._fail(explain_supernode_exit(code, text, site_key), 1)
        cli.console.print(f"[yellow]the SuperNode stopped (exit {code}); reconnecting in {retry_s:.0f} s[/] "
                          "(Ctrl-C to leave)")
        time.sleep(retry_s)


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def register(app: typer.Typer, site_app: typer.Typer) -> None:
    """Add the deployment commands to the main CLI."""
    app.add_typer(certs_app, name="certs")
    app.add_typer(server_app, name="server")
    app.command("run")(run_command)
    site_app.command("join")(site_join)
