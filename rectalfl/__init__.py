"""The ``rectalfl`` command: one small composition of each side's own command group.

- hospital (``client.cli``): ``site check``, ``site preprocess``, ``site join``, ``site audit``;
- operator (``server.cli``, ``server.dashboard.cli``): ``certs``, ``server start``, ``run``, ``report``,
  ``dashboard``;
- simulation (``simulations.cli``): ``synth``, ``simulate``, ``demo``;
- both (``shared.cli``): ``config validate``, ``config show``.

Nothing else lives here: a reader who wants what a hospital runs opens ``client/``, what the
operator runs ``server/``.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from client.cli import site_app
from server.cli import certs_app, report, run_command, server_app
from server.dashboard.cli import dashboard
from shared.cli import config_app, console, setup_logging
from simulations.cli import demo, simulate, synth

app = typer.Typer(
    name="rectalfl",
    help="Federated multi-centre MRI models of rectal cancer response to neoadjuvant therapy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    setup_logging(verbose)


app.add_typer(site_app, name="site")
app.add_typer(config_app, name="config")
app.command()(synth)
app.command()(demo)
app.command()(simulate)
app.command()(report)
app.add_typer(certs_app, name="certs")
app.add_typer(server_app, name="server")
app.command("run")(run_command)
app.command("dashboard")(dashboard)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished work is kept; re-run the same command to resume")
        sys.exit(130)
