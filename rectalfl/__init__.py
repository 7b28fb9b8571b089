"""The ``rectalfl`` command: one small composition of each side's own command group.

- hospital (``client.cli``): ``site check``, ``site preprocess``, ``site join``, ``site audit``,
  ``site explain``;
- operator (``server.cli``, ``server.dashboard.cli``): ``certs``, ``server start``, ``run``, ``report``,
  ``dashboard``;
- simulation (``simulations.cli``, ``simulations.compare``): ``synth``, ``simulate``, ``demo``, ``compare``;
- both (``shared.cli``): ``config validate``, ``config show``.

Nothing else lives here: a reader who wants what a hospital runs opens ``client/``, what the
operator runs ``server/``.
"""

from __future__ import annotations

import os

# Before anything imports Flower (it reads these when imported): no telemetry, no update checks, no
# runtime installs, in this process and every process it starts (Ray workers, flwr, SuperLink, SuperNode).
for _key, _value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                     ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")):
    os.environ[_key] = _value

import logging  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Annotated  # noqa: E402

import typer  # noqa: E402

from client.cli import site_app  # noqa: E402
from server.cli import certs_app, report, run_command, server_app  # noqa: E402
from server.dashboard.cli import dashboard  # noqa: E402
from shared.cli import config_app, console, setup_logging  # noqa: E402
from shared.interrupt import Interrupted, raise_on_signals  # noqa: E402
from simulations.cli import demo, simulate, synth  # noqa: E402
from simulations.compare import compare  # noqa: E402

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
app.command()(compare)
app.command()(report)
app.add_typer(certs_app, name="certs")
app.add_typer(server_app, name="server")
app.command("run")(run_command)
app.command("dashboard")(dashboard)


def main() -> None:
    """Console-script entry point.

    SIGINT (Ctrl-C) and SIGTERM raise :class:`shared.interrupt.Interrupted`; each long command
    catches it where it knows what was done and how to continue, and this is the net for the rest.
    The exit code is 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
    """
    raise_on_signals()
    code: int | str | None = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt as exc:
        name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        again = shlex.join(["rectalfl", *sys.argv[1:]])
        console.print(f"[yellow]interrupted[/] by {name}: finished work is kept", highlight=False)
        console.print(f"continue with: {again}", highlight=False, soft_wrap=True)
        code = 143 if name == "SIGTERM" else 130
    _exit(code)


def _exit(code: int | str | None) -> None:
    """Exit. After an interruption (130, 143), or with threads a library left behind, at once: the
    run record and the message are written, and the interpreter's own shutdown (joining library
    threads, closing Ray's connections) would add seconds or hang."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not others and code not in (130, 143):
        sys.exit(code)
    if isinstance(code, str):
        console.print(code)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))
