"""Operator commands: ``rectalfl certs``, ``server start``, ``run`` and ``report`` (the operator's machine).

Each command is a thin layer over Flower's own processes (see :mod:`server.deploy`) and the run
directory, with checks that turn the usual failures into instructions.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from shared.cli import console, fail, load, out

certs_app = typer.Typer(help="Operator: the consortium's CA, the SuperLink certificate and the sites' keys.",
                        no_args_is_help=True)
server_app = typer.Typer(help="Operator: run the closed SuperLink (TLS, SuperNode authentication, Fleet API only "
                              "for the hospitals).", no_args_is_help=True)

DirOpt = Annotated[Path, typer.Option("--dir", "-d", help="Certificate folder.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing files.")]
ServerConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", help="Server config: its deploy.certs_dir replaces --dir, and the running SuperLink "
                           "(deploy.control_address) is updated too.")]


def _certs_target(folder: Path, config: Path | None) -> tuple[Path, Any]:
    """The certificate folder and, with a server config, its deploy section."""
    if config is None:
        return folder, None
    d = load(config).deploy
    return Path(d.certs_dir), d


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
              f"{files['pub']}. List {name} in deploy.sites of the server config; `rectalfl server start` "
              "registers exactly those sites")


@certs_app.command("revoke")
def certs_revoke(
    name: Annotated[str, typer.Argument(help="The site whose key is revoked.")],
    folder: DirOpt = Path("certs"),
    config: ServerConfigOpt = None,
) -> None:
    """Revoke a site's key: unregister its node from the running SuperLink and never register the key again."""
    from server.deploy import revoke
    from shared.certs import CertError

    certs, d = _certs_target(folder, config)
    try:
        done = revoke(certs, name, d.control_address if d is not None else None)
    except CertError as exc:
        fail(str(exc))
    nodes = ", ".join(str(n) for n in done["unregistered"]) or "none online"
    out.print(f"{name}: key {done['fingerprint']} revoked (files moved to {done['moved_to']}); SuperLink "
              f"{done['superlink']}, node(s) unregistered: {nodes}. Remove {name} from deploy.sites, or give it a new "
              f"key with `rectalfl certs rotate-site {name}" + (f" --config {config}`" if config else f" --dir {certs}`"),
              highlight=False)


@certs_app.command("rotate-site")
def certs_rotate_site(
    name: Annotated[str, typer.Argument(help="The site that gets a new key.")],
    folder: DirOpt = Path("certs"),
    config: ServerConfigOpt = None,
) -> None:
    """Give a site a new key pair: the old key is revoked (and unregistered), the new one registered."""
    from server.deploy import register_sites, revoke
    from shared.certs import CertError, add_site

    certs, d = _certs_target(folder, config)
    try:
        if (Path(certs) / "sites" / name / "site.pub").is_file():
            revoke(certs, name, d.control_address if d is not None else None)
        files = add_site(certs, name)
    except CertError as exc:
        fail(str(exc))
    registered = "it is registered at the next `rectalfl server start`"
    if d is not None and name in d.sites:
        try:
            registered = register_sites(certs, d.control_address, d.sites).get(name, registered)
        except Exception as exc:  # noqa: BLE001 - SuperLink not running: the next `server start` registers it
            registered = f"SuperLink not reachable ({type(exc).__name__}); {registered}"
    out.print(f"{name}: new private key {files['key']} (give it to {name}, replacing the old one); {registered}",
              highlight=False)


@certs_app.command("renew-server")
def certs_renew_server(
    folder: DirOpt = Path("certs"),
    host: Annotated[list[str] | None, typer.Option("--host", help="Another host name or IP the sites use "
                                                               "(repeatable); the current ones are kept.")] = None,
    days: Annotated[int, typer.Option(help="Validity in days (capped at the CA's).")] = 825,
) -> None:
    """Re-issue the SuperLink's certificate with the same CA (renewal and/or more host names)."""
    from shared.certs import CertError, renew_server

    try:
        names = renew_server(folder, list(host or []), days=days)
    except CertError as exc:
        fail(str(exc))
    out.print(f"{folder}/server.crt now valid for {', '.join(names)}; sites keep their ca.crt. Restart "
              "`rectalfl server start` to use it.")


@server_app.command("start")
def server_start(
    config: Annotated[Path, typer.Option("--config", "-c", help="Server config (deploy section).")] =
    Path("configs/server.example.yaml"),
) -> None:
    """Start the closed SuperLink, register exactly deploy.sites, and wait (Ctrl-C or SIGTERM stops it).

    flower-superlink listens on deploy.control_address (loopback: runs, node registration and the
    ServerApp's runtime API are for this machine only); hospitals reach only the Fleet gateway on
    deploy.superlink.
    """
    import time

    from server.deploy import register_sites, start_superlink
    from shared.certs import CertError
    from shared.flower import DeployError

    cfg = load(config)
    d = cfg.deploy
    if not d.sites:
        fail(f"deploy.sites in {config} is empty: list the consortium's sites (the names given to `rectalfl certs "
             "add-site`); exactly those keys are registered")
    try:
        procs = start_superlink(d.certs_dir, d.superlink, d.flwr_home, control_address=d.control_address,
                                connection=d.connection, database=d.database)
    except (DeployError, CertError) as exc:
        fail(str(exc))
    try:
        actions = register_sites(d.certs_dir, d.control_address, d.sites)
    except (DeployError, CertError) as exc:
        procs.stop()
        fail(str(exc))
    logs = Path(d.flwr_home) / "logs"
    out.print(f"SuperLink up: hospitals connect to {d.superlink} (Fleet API only; TLS + SuperNode authentication); "
              f"runs, node registration and the runtime API on {d.control_address} (this machine only). Logs in "
              f"{logs}.", highlight=False)
    for site, what in actions.items():
        out.print(f"  {site}: {what}", highlight=False)
    out.print(f"Flower CLI connection '{d.connection}' in {d.flwr_home}/config.toml; submit with "
              f"`rectalfl run --config {config}`. Ctrl-C stops the SuperLink.", highlight=False)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a service manager's stop: same clean shutdown as Ctrl-C
    try:
        while (gone := procs.exited()) is None:
            time.sleep(1.0)
    except KeyboardInterrupt:
        procs.stop()
        raise typer.Exit(0) from None
    procs.stop()
    fail(f"{gone[0]} stopped (exit {gone[1]}); the others were stopped too. Its output:\n{procs.tail(gone[0])}\n"
         f"Flower's log: {logs / 'superlink.log'}", 1)


def run_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="Server config (training recipe + deploy section).")]
    = Path("configs/server.example.yaml"),
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory (default runs/<time>-<name>).")]
    = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue this run directory from its last "
                                                             "completed round.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Give up waiting after this many seconds.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also stream the ServerApp's log here.")] = False,
) -> None:
    """Submit the pipeline to the running SuperLink (`flwr run <app> <connection>`) and follow it to the summary."""
    import time

    from server.deploy import submit_run
    from server.pipeline import new_run_dir
    from server.progress import RunProgress
    from shared.flower import APP_DIR, DeployError, app_hash

    cfg = load(config)
    d = cfg.deploy
    target = (resume or run_dir or new_run_dir(cfg)).resolve()
    if not d.sites:
        fail(f"deploy.sites in {config} is empty: list the consortium's sites (the server waits for them)")
    logs = Path(d.flwr_home).resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"serverapp-{target.name}.log"
    try:
        digest = app_hash(APP_DIR)
    except DeployError as exc:
        fail(str(exc))
    out.print(f"submitting app bundle sha256:{digest} to '{d.connection}' ({d.control_address}); sites must list "
              f"it in policy.allowed_apps or run this same release.\nrun directory {target}\nServerApp log {log_path}",
              highlight=False)
    t0 = time.time()
    progress = RunProgress(target, t0=t0)
    with open(log_path, "a") as log_fh, console.status("submitting") as status:
        def on_poll() -> None:
            lines, line = progress.poll()
            for text in lines:
                out.print(text, highlight=False)
            status.update(line)

        submitted: dict[str, str] = {}

        def accepted(rid: str) -> None:
            submitted["rid"] = str(rid)
            out.print(f"Flower run {rid} accepted; waiting for {len(d.sites)} site(s)", highlight=False)

        try:
            info = submit_run(config, d.flwr_home, connection=d.connection, run_dir=target, resume=resume is not None,
                              expected_sites=len(d.sites), stream=sys.stdout if verbose else log_fh,
                              timeout=timeout, on_poll=on_poll, on_submitted=accepted)
        except DeployError as exc:
            fail(f"{exc}\nServerApp log: {log_path}")
        except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: stop following; the run itself lives on the SuperLink
            status.stop()
            rid = submitted.get("rid")
            name = getattr(exc, "signal_name", "SIGINT")
            if rid is None:
                console.print(f"[yellow]interrupted[/] by {name} before the SuperLink accepted the run: nothing was "
                              f"started; submit again with `rectalfl run --config {config}`", highlight=False)
            else:
                console.print(
                    f"[yellow]stopped following[/] (interrupted by {name}): Flower run {rid} goes on at the "
                    f"SuperLink and writes {target}. Watch it with `rectalfl dashboard --runs {target.parent}`; "
                    f"stop it with `FLWR_HOME={Path(d.flwr_home).resolve()} flwr stop {rid} {d.connection}`; once "
                    f"stopped, continue it with `rectalfl run --config {config} --resume {target}`", highlight=False)
            raise typer.Exit(130) from None
        on_poll()
    status_text = str(info.get("status", "unknown"))
    if status_text == "finished:completed":
        from server.summary import print_summary

        print_summary(target, out, seconds=time.time() - t0)
        raise typer.Exit(0)
    fail(f"run {info.get('run-id')} ended {status_text}: {info.get('status-details', '')}\nthe run record in "
         f"{target} keeps what finished; continue with `rectalfl run --config {config} --resume {target}`"
         f"\nServerApp log: {log_path}", 1)


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
