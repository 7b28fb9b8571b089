"""Building blocks of the ``rectalfl`` command line (typer + rich), shared by every side's commands.

The commands themselves belong to the side that runs them: site commands in :mod:`client.cli`
(hospital), operator commands in :mod:`server.cli`, ``synth``/``simulate``/``demo`` in
:mod:`simulations.cli`; the top-level :mod:`rectalfl` package composes them into one command.
This module holds what they share (consoles, the error exit, config loading, progress bars,
logging) and the ``config`` group, which needs only the schema. Each command is a thin shell over
plain functions, so everything it does is testable without it. Human output goes to the terminal
with progress bars; ``--json`` prints one JSON document on stdout for machines instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from shared.config import ConfigError, RectalFLConfig, load_config

config_app = typer.Typer(help="Validate and show configuration files.", no_args_is_help=True)

console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (see configs/). Defaults to the schema defaults.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", "-j", min=1, help="Parallel worker processes.")]


NOISY = ("flwr", "ray", "matplotlib", "PIL", "alembic", "filelock", "urllib3")


class _QuietLibraries(logging.Filter):
    """Third-party chatter (Flower's DEBUG lines, alembic plugins) only from WARNING up, unless --verbose."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose or record.levelno >= logging.WARNING:
            return True
        return record.name.split(".")[0] not in NOISY and "DEPRECATED" not in record.getMessage()


def setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    handler.addFilter(_QuietLibraries(verbose))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[handler], force=True)


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def load(config: Path | None, overrides: dict[str, Any] | None = None) -> RectalFLConfig:
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        fail(str(exc))
        raise  # unreachable, keeps type checkers calm


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable[[int, int, str], None]]:
    """Yield a ``progress(done, total, label)`` callback drawing a rich progress bar."""
    if not enabled:
        yield lambda done, total, label: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[label]}", style="dim"),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=None, label="")

        def update(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, label=label)

        yield update


# --------------------------------------------------------------------------- config


@config_app.command("validate")
def config_validate(paths: Annotated[list[Path], typer.Argument(help="YAML files to validate.")]) -> None:
    """Validate config files against the schema; exit 2 on the first invalid one."""
    for p in paths:
        cfg = load(p)
        console.print(f"[green]ok[/] {p} (digest {cfg.digest()})")


@config_app.command("show")
def config_show(config: ConfigOpt = None) -> None:
    """Print the fully resolved config (defaults filled in) as YAML."""
    out.print(load(config).to_yaml(), end="", highlight=False)
