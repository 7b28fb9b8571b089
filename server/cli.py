"""Operator commands: ``rectalfl certs``, ``server start``, ``run`` and ``report`` (the operator's machine).

Each command is a thin layer over Flower's own processes (see :mod:`server.deploy`) and the run
directory, with checks that turn the usual failures into instructions.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from shared.cli import console, fail, load, out

certs_app = typer.Typer(help="Operator: the consortium's CA, the SuperLink certificate and the sites' keys.",
                        no_args_is_help=True)
server_app = typer.Typer(help="Operator: run the SuperLink (TLS + SuperNode authentication).", no_args_is_help=True)

DirOpt = Annotated[Path, typer.Option("--dir", "-d", help="Certificate folder.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing files.")]


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
        fail(str(exc))
    out.print(f"CA: {files['ca_cert']} (send to every site)\nkeep private: {files['ca_key']}, "
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
        fail(str(exc))
    out.print(f"{name}: private key {files['key']} (give to {name} with {folder}/ca.crt), public key "
                     f"{files['pub']} (registered by `rectalfl server start`)")


@server_app.command("start")
def server_start(
    config: Annotated[Path, typer.Option("--config", "-c", help="Server config (deploy section).")] =
    Path("configs/server.example.yaml"),
    log: Annotated[Path | None, typer.Option("--log", help="SuperLink log file (default <flwr_home>/superlink.log).")]
    = None,
) -> None:
    """Start flower-superlink with TLS and SuperNode authentication, register every site key, wait (Ctrl-C stops)."""
    from server.deploy import register_sites, start_superlink
    from shared.certs import CertError
    from shared.flower import DeployError

    cfg = load(config)
    d = cfg.deploy
    log = log or (d.flwr_home / "superlink.log")
    try:
        proc = start_superlink(d.certs_dir, d.superlink, d.flwr_home, log, connection=d.connection,
                               database=d.database)
    except (DeployError, CertError) as exc:
        fail(str(exc))
    try:
        registered = register_sites(d.certs_dir, d.flwr_home, d.connection)
    except DeployError as exc:
        proc.terminate()
        fail(str(exc))
    out.print(f"SuperLink listening on {d.superlink} (TLS, SuperNode authentication), log {log}")
    for site, node in registered.items():
        out.print(f"  registered {site}: node {node}")
    if not registered:
        out.print(f"[yellow]no site keys in {d.certs_dir}/sites yet[/]: `rectalfl certs add-site NAME`, then "
                      "restart this command")
    out.print(f"Flower CLI connection '{d.connection}' in {d.flwr_home}/config.toml; submit with "
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
    from server.deploy import submit_run
    from server.pipeline import new_run_dir
    from shared.certs import site_public_keys
    from shared.flower import DeployError

    cfg = load(config)
    d = cfg.deploy
    target = (resume or run_dir or new_run_dir(cfg)).resolve()
    n_sites = len(site_public_keys(d.certs_dir)) or None
    out.print(f"submitting to '{d.connection}' ({d.superlink}); run directory {target}")
    try:
        info = submit_run(config, d.flwr_home, connection=d.connection, run_dir=target, resume=resume is not None,
                          expected_sites=n_sites, stream=sys.stdout, timeout=timeout)
    except DeployError as exc:
        fail(str(exc))
    status = str(info.get("status", "unknown"))
    if status == "finished:completed":
        from server.summary import print_summary

        print_summary(target, out)
        raise typer.Exit(0)
    fail(f"run {info.get('run-id')} ended {status}: {info.get('status-details', '')}\nthe run record in "
              f"{target} keeps what finished; continue with `rectalfl run --config {config} --resume {target}`", 1)


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (printed at the end of every run).")],
    open_: Annotated[bool, typer.Option("--open/--no-open", help="Open report.html in the default browser.")] = False,
) -> None:
    """(Re)build a run's report: figures/*.png and a self-contained report.html from its tables."""
    from server.report import ReportError, build_report

    warnings: list[str] = []
    try:
        with console.status("rendering figures and report.html"):
            path = build_report(run_dir, warn=warnings.append)
    except ReportError as exc:
        fail(str(exc))
    for line in warnings:
        console.print(f"[yellow]warning:[/] {line}", highlight=False)
    out.print(f"report: {path}  (tables in {run_dir / 'tables'}, figures in {run_dir / 'figures'})")
    if open_:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            console.print(f"[yellow]no browser found[/]: open {path} yourself")
