"""``rectalfl dashboard``: the operator's web dashboard (a typer command the top-level CLI registers).

Register with ``app.command("dashboard")(server.dashboard.cli.dashboard)``, or add the one-command
typer app :data:`app`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from server.dashboard.security import TokenError, load_or_create_token

__all__ = ["app", "dashboard"]

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


@app.command("dashboard")
def dashboard(
    runs: Annotated[Path, typer.Option("--runs", help="The runs folder (each sub-folder with a run.db is a run).")] = Path(
        "runs"),
    host: Annotated[str, typer.Option("--host", help="Address to bind; the default serves this machine only.")] = (
        "127.0.0.1"),
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8050,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="File holding the access token (created, mode 0600, if missing). "
                             "Default: ~/.config/rectalfl/dashboard.token.")] = None,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="TLS certificate (PEM), e.g. the consortium's "
                                                                     "server.crt.")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="TLS private key (PEM).")] = None,
    allow_plain_http: Annotated[bool, typer.Option(
        "--allow-plain-http", help="Allow a non-loopback --host without TLS (the token then crosses the network "
                                   "in clear text).")] = False,
    poll: Annotated[float, typer.Option("--poll", min=0.1, help="Seconds between looks at a running run.")] = 1.0,
) -> None:
    """Serve the operator dashboard: runs, rounds, sites, events and results, live while a run goes.

    Every page and API call needs the access token; the login link is printed at start.
    """
    from server.dashboard.app import create_app
    from server.dashboard.serve import is_loopback, serve

    if not runs.is_dir():
        raise _fail(f"runs folder {runs} does not exist; point --runs at the folder your runs write to "
                    "(runs_root in the config, default runs/)")
    if (tls_cert is None) != (tls_key is None):
        raise _fail("TLS needs both --tls-cert and --tls-key")
    if not is_loopback(host) and tls_cert is None and not allow_plain_http:
        raise _fail(f"--host {host} serves other machines: give --tls-cert/--tls-key (e.g. the consortium's "
                    "certs/server.crt and certs/server.key), or --allow-plain-http to accept the token "
                    "travelling unencrypted")
    try:
        token, path, created = load_or_create_token(token_file)
    except TokenError as exc:
        raise _fail(str(exc)) from None
    scheme = "https" if tls_cert else "http"
    shown = "localhost" if is_loopback(host) else host
    typer.echo(f"rectalfl dashboard: serving {runs.resolve()} (read-only) on {scheme}://{shown}:{port}/")
    typer.echo(f"access token {'created in' if created else 'read from'} {path} (mode 0600)")
    typer.echo(f"open this login link (it sets a session cookie): {scheme}://{shown}:{port}/?token={token}")
    typer.echo("scripts: send 'Authorization: Bearer <token>'. Stop with Ctrl-C.")
    try:
        serve(create_app(runs, token, poll_interval=poll, secure_cookie=tls_cert is not None), host=host, port=port,
              tls_cert=tls_cert, tls_key=tls_key)
    except (OSError, ValueError) as exc:
        raise _fail(f"cannot serve on {host}:{port}: {exc}") from None
