"""The ``rectalfl`` command line (typer + rich).

Each command is a thin shell over plain functions (``simulations.synth``, ``shared.cohort``,
``client.preprocess``, ``server.simulate``) so everything it does is testable without it.
Human output goes to the terminal with progress bars; ``--json`` prints one JSON document on
stdout for machines instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
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
from rich.table import Table

from shared.config import ConfigError, RectalFLConfig, load_config

app = typer.Typer(
    name="rectalfl",
    help="Federated multi-centre MRI models of rectal cancer response to neoadjuvant therapy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
site_app = typer.Typer(help="Hospital side: check and preprocess a site's data (nothing leaves the site).",
                       no_args_is_help=True)
config_app = typer.Typer(help="Validate and show configuration files.", no_args_is_help=True)
app.add_typer(site_app, name="site")
app.add_typer(config_app, name="config")

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


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    handler.addFilter(_QuietLibraries(verbose))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[handler], force=True)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    _setup_logging(verbose)


def _fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _load(config: Path | None, overrides: dict[str, Any] | None = None) -> RectalFLConfig:
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
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
        cfg = _load(p)
        console.print(f"[green]ok[/] {p} (digest {cfg.digest()})")


@config_app.command("show")
def config_show(config: ConfigOpt = None) -> None:
    """Print the fully resolved config (defaults filled in) as YAML."""
    out.print(_load(config).to_yaml(), end="", highlight=False)


# --------------------------------------------------------------------------- synth


@app.command()
def synth(
    config: ConfigOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: data_root).")] = None,
    workers: WorkersOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing, different cohort.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate the synthetic multi-centre cohort (one folder per site, in the site data contract)."""
    from simulations.synth import generate_cohort

    cfg = _load(config)
    target = out_dir or cfg.data_root
    with progress_bar("synthesising patients", not as_json) as cb:
        try:
            summary = generate_cohort(cfg.synth, target, seed=cfg.seed, workers=workers or cfg.preprocess.workers,
                                      progress=cb, overwrite=overwrite)
        except (ValueError, OSError) as exc:
            _fail(str(exc))
    info = _as_dict(summary)
    if as_json:
        out.print_json(json.dumps(info, default=str))
        return
    table = Table(title=f"synthetic cohort in {target}")
    for col in ("site", "role", "patients", "good responders"):
        table.add_column(col)
    for s in _summary_sites(info):
        table.add_row(s["name"], "external" if s.get("external") else "training", str(s.get("patients", "")),
                      f"{s.get('prevalence', float('nan')):.0%}" if s.get("prevalence") is not None else "")
    out.print(table)


def _as_dict(obj: Any) -> dict[str, Any]:
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)  # type: ignore[arg-type]
    if isinstance(obj, dict):
        return obj
    return dict(vars(obj))


def _summary_sites(info: dict[str, Any]) -> list[dict[str, Any]]:
    if "sites" in info and isinstance(info["sites"], list) and info["sites"] and isinstance(info["sites"][0], dict):
        return info["sites"]
    names = info.get("site_names") or info.get("sites") or []
    ext = info.get("external") or {}
    counts = info.get("patients") or {}
    prev = info.get("prevalences") or info.get("prevalence") or {}
    rows = []
    for i, n in enumerate(names):
        def pick(d: Any, i: int = i, n: str = n) -> Any:
            if isinstance(d, dict):
                return d.get(n)
            if isinstance(d, list | tuple) and i < len(d):
                return d[i]
            return None
        rows.append({"name": n, "external": pick(ext), "patients": pick(counts), "prevalence": pick(prev)})
    return rows


# --------------------------------------------------------------------------- site


@site_app.command("check")
def site_check(
    site_dir: Annotated[Path, typer.Argument(help="The site folder (patients.csv, images/, masks/).")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    fast: Annotated[bool, typer.Option("--fast", help="Check headers and geometry only; skip pixel checks.")] = False,
    show_all: Annotated[bool, typer.Option("--all", help="List every warning instead of grouping them.")] = False,
) -> None:
    """Check a site's data against the contract. Exit 0 when usable (warnings allowed), 1 otherwise."""
    from shared.cohort import CohortError, check_site

    cfg = _load(config)
    with progress_bar(f"checking {site_dir.name}", not as_json) as cb:
        try:
            report = check_site(site_dir, cfg, progress=cb, read_pixels=not fast)
        except CohortError as exc:
            _fail(str(exc))
    if as_json:
        out.print_json(json.dumps(report.to_dict(), default=str))
    else:
        _print_report(report, show_all=show_all)
    raise typer.Exit(0 if report.ok else 1)


def _print_report(report: Any, *, show_all: bool = False, limit: int = 15) -> None:
    """Errors first, one line each with what to do; warnings grouped by code unless ``show_all``."""
    errors = sorted(report.errors, key=lambda i: (i.patient_id or "", i.code))
    for i in errors[: None if show_all else limit]:
        out.print(f"[red]error[/] [bold]{i.code}[/] {i.message}\n      [dim]fix:[/] {i.fix}", highlight=False)
    if len(errors) > limit and not show_all:
        out.print(f"... {len(errors) - limit} more error(s): --all shows every one, --json for machines")
    warnings = report.warnings
    if show_all:
        for i in warnings:
            out.print(f"[yellow]warning[/] [bold]{i.code}[/] {i.message}\n      [dim]fix:[/] {i.fix}", highlight=False)
    elif warnings:
        table = Table(title=f"{len(warnings)} warning(s) by kind (--all lists each)", title_justify="left")
        for col in ("code", "count", "example"):
            table.add_column(col, overflow="fold")
        by_code: dict[str, list[Any]] = {}
        for w in warnings:
            by_code.setdefault(w.code, []).append(w)
        for code, items in sorted(by_code.items()):
            table.add_row(f"[yellow]{code}[/]", str(len(items)), items[0].message)
        out.print(table)
    verdict = "[green]usable[/]" if report.ok else "[red]NOT usable[/] (fix the errors above, or they exclude those cases)"
    out.print(
        f"{report.site_dir}: {report.n_patients} patients, {report.n_usable_patients} usable, "
        f"{report.volumes_checked} volumes checked -> {verdict}"
    )


@site_app.command("preprocess")
def site_preprocess(
    site_dir: Annotated[Path, typer.Argument(help="The site folder.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Cache folder for the preprocessed slices (stays on site).")],
    config: ConfigOpt = None,
    workers: WorkersOpt = None,
    force: Annotated[bool, typer.Option(help="Recompute volumes already in the cache.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """N4, normalise, discretise, and extract each volume's largest-tumour slice into a resumable cache."""
    from client.preprocess import preprocess_site
    from shared.cohort import CohortError

    cfg = _load(config)
    t0 = time.perf_counter()
    with progress_bar(f"preprocessing {site_dir.name}", not as_json) as cb:
        try:
            manifest = preprocess_site(site_dir, out_dir, cfg, workers=workers, progress=cb, force=force)
        except CohortError as exc:
            _fail(str(exc))
    seconds = time.perf_counter() - t0
    counts = manifest["status"].value_counts().to_dict()
    if as_json:
        out.print_json(json.dumps({"cache_dir": str(out_dir), "volumes": len(manifest), "status": counts,
                                   "seconds": round(seconds, 2),
                                   "errors": manifest.loc[manifest["status"] == "error", ["patient_id", "timepoint",
                                                                                        "sequence", "error"]]
                                   .to_dict(orient="records")}, default=str))
    else:
        _print_manifest_summary(manifest, out_dir, seconds)
    raise typer.Exit(0 if counts.get("ok", 0) > 0 else 1)


def _print_manifest_summary(manifest: Any, out_dir: Path, seconds: float) -> None:
    table = Table(title=f"preprocessed volumes in {out_dir} ({seconds:.1f} s)")
    table.add_column("timepoint")
    table.add_column("sequence")
    for status in ("ok", "no_mask", "error"):
        table.add_column(status, justify="right")
    for (tp, seq), g in manifest.groupby(["timepoint", "sequence"], sort=True):
        vc = g["status"].value_counts()
        table.add_row(str(tp), str(seq), *(str(int(vc.get(s, 0))) for s in ("ok", "no_mask", "error")))
    out.print(table)
    bad = manifest[manifest["status"] == "error"]
    for _, row in bad.head(20).iterrows():
        out.print(f"[red]error[/] {row['patient_id']} {row['timepoint']}/{row['sequence']}: {row['error']}")
    if len(bad) > 20:
        out.print(f"... and {len(bad) - 20} more errors: see {out_dir / 'manifest.csv'}")


# --------------------------------------------------------------------------- demo


@app.command()
def demo(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config.")] = Path("configs/demo.yaml"),
    workers: WorkersOpt = None,
) -> None:
    """The demo end to end: synthesise the cohort, check and preprocess every site, then run the federation."""
    from client.preprocess import preprocess_site
    from shared.cohort import check_site
    from simulations.synth import generate_cohort, load_cohort_manifest

    cfg = _load(config)
    t0 = time.perf_counter()
    console.rule("[bold]1/3 synthetic multi-centre cohort")
    with progress_bar("synthesising patients") as cb:
        try:
            generate_cohort(cfg.synth, cfg.data_root, seed=cfg.seed, workers=workers or cfg.preprocess.workers,
                            progress=cb)
        except FileExistsError as exc:
            _fail(f"{exc}\nto replace it: rectalfl synth --config {config} --overwrite "
                  f"(or point data_root elsewhere)")
    sites = load_cohort_manifest(cfg.data_root)["sites"]
    console.rule("[bold]2/3 site checks and preprocessing (each site on its own)")
    for s in sites:
        site_dir = Path(cfg.data_root) / s["name"]
        with progress_bar(f"checking {s['name']}") as cb:
            report = check_site(site_dir, cfg, progress=cb)
        _print_report(report)
        with progress_bar(f"preprocessing {s['name']}") as cb:
            manifest = preprocess_site(site_dir, Path(cfg.cache_root) / s["name"], cfg, workers=workers, progress=cb)
        _print_manifest_summary(manifest, Path(cfg.cache_root) / s["name"], time.perf_counter() - t0)
    console.rule("[bold]3/3 federation (Flower simulation engine, one virtual SuperNode per site)")
    from server.simulate import run_simulation

    run_simulation(cfg, console=out, workers=workers, prepare=False)
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s")


@app.command()
def simulate(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config.")] = Path("configs/demo.yaml"),
    mode: Annotated[str | None, typer.Option(help="Override federation.mode: federated, pooled or local.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Override federation.strategy: fedavg, fedprox, fedadam.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Override federation.rounds.")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Where to write the run (default runs/<time>-<name>).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue this run directory from its last completed round.")] = None,
    workers: WorkersOpt = None,
    prepare_only: Annotated[bool, typer.Option("--prepare-only", help="Only generate the cohort and preprocess "
                                                "every site (e.g. before `flwr run .`).")] = False,
) -> None:
    """Run the whole consortium on this machine: cohort, per-site preprocessing, then the Flower federation."""
    from server.simulate import prepare_sites, run_simulation

    overrides = {k: v for k, v in {"federation.mode": mode, "federation.strategy": strategy,
                                   "federation.rounds": rounds}.items() if v is not None}
    cfg = _load(config, overrides)
    if prepare_only:
        with progress_bar("preparing sites") as cb:
            prepare_sites(cfg, workers=workers, progress=cb)
        out.print(f"cohort in {cfg.data_root}, caches in {cfg.cache_root}")
        return
    try:
        run_simulation(cfg, run_dir=resume or run_dir, resume=resume is not None, console=out, workers=workers)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    except RuntimeError as exc:
        _fail(f"{exc}\nthe run record keeps what finished; continue with --resume RUN_DIR")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (printed at the end of every run).")],
    open_: Annotated[bool, typer.Option("--open/--no-open", help="Open report.html in the default browser.")] = False,
) -> None:
    """(Re)build a run's report: figures/*.png and a self-contained report.html from its tables."""
    from server.report import ReportError, build_report

    try:
        with console.status("rendering figures and report.html"):
            path = build_report(run_dir)
    except ReportError as exc:
        _fail(str(exc))
    out.print(f"report: {path}  (tables in {run_dir / 'tables'}, figures in {run_dir / 'figures'})")
    if open_:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            console.print(f"[yellow]no browser found[/]: open {path} yourself")


def _register_deploy() -> None:
    from shared.cli_deploy import register

    register(app, site_app)


_register_deploy()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished work is kept; re-run the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
