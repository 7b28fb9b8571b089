"""Simulation commands: ``rectalfl synth``, ``simulate`` and ``demo`` (a whole consortium on one machine).

They run both sides in one place (the synthetic hospitals, their site-side steps and the server),
which only a simulation may do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from client.cli import print_manifest_summary, print_report
from shared.cli import ConfigOpt, JsonOpt, WorkersOpt, console, fail, load, out, progress_bar
from shared.config import ConfigError, RectalFLConfig, load_config
from shared.interrupt import Interrupted


def stop_interrupted(exc: KeyboardInterrupt, done: str, again: str) -> None:
    """Say what a stopped command finished and the exact command that continues; exit 130 (SIGINT) or 143."""
    name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
    console.print(f"[yellow]interrupted[/] by {name}: {done}", highlight=False)
    console.print(f"continue with: [bold]{again}[/]", highlight=False, soft_wrap=True)  # one line to copy
    raise typer.Exit(143 if name == "SIGTERM" else 130)


def run_progress(run_dir: Path) -> str:
    """What a run has finished, from its run record (stages completed, rounds/epochs per training stage)."""
    from server.store import RunStore, StoreError

    try:
        with RunStore.open_run_dir(run_dir, readonly=True) as store:
            runs = store.runs()
            if not len(runs):
                return f"nothing recorded yet in {run_dir}"
            rid = str(runs["run_id"].iloc[0])
            stages = store.stages(rid)
            rounds = store.rounds(rid)
    except StoreError:
        return f"nothing recorded yet in {run_dir}"
    done = list(dict.fromkeys(str(n) for n in stages.loc[stages["status"] == "completed", "name"]))
    parts = [f"completed stages: {', '.join(done) if done else 'none'}"]
    if len(rounds):
        ok = rounds[rounds["status"] == "completed"].groupby("stage")["round"].max()
        for stage, last in ok.items():
            unit = "epoch" if ":" in str(stage) else "round"
            parts.append(f"{stage}: {unit}s 1-{int(last)} checkpointed")
    return "; ".join(parts) + f" (run record {run_dir / 'run.db'})"


def _load_with(config: Path | None, overrides: dict[str, Any], names: dict[str, str]) -> RectalFLConfig:
    try:
        return load_config(config, overrides, override_names=names)
    except ConfigError as exc:
        fail(str(exc))
        raise


def _again(*parts: Any) -> str:
    import shlex

    return shlex.join(["rectalfl", *(str(p) for p in parts if p is not None)])


def synth(
    config: ConfigOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: data_root).")] = None,
    workers: WorkersOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing, different cohort.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate the synthetic multi-centre cohort (one folder per site, in the site data contract)."""
    import sys

    from simulations.synth import generate_cohort

    cfg = load(config)
    target = out_dir or cfg.data_root
    done = {"n": 0, "total": 0}
    try:
        with progress_bar("synthesising patients", not as_json) as cb:
            def progress(n: int, total: int, label: str) -> None:
                done.update(n=n, total=total)
                cb(n, total, label)
            try:
                summary = generate_cohort(cfg.synth, target, seed=cfg.seed,
                                          workers=workers or cfg.preprocess.workers, progress=progress,
                                          overwrite=overwrite)
            except (ValueError, OSError) as exc:
                fail(str(exc))
    except KeyboardInterrupt as exc:
        stop_interrupted(exc, f"{done['n']} of {done['total']} patients were written to {target}, which is marked "
                              "incomplete; the cohort is generated again from the start",
                         _again(*sys.argv[1:]))
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


def demo(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config.")] = Path("configs/demo.yaml"),
    workers: WorkersOpt = None,
) -> None:
    """The demo end to end: synthesise the cohort, check and preprocess every site, then run the federation."""
    from client.preprocess import preprocess_site
    from shared.cohort import check_site
    from simulations.runner import resolve_run_dir, run_simulation
    from simulations.synth import generate_cohort, load_cohort_manifest

    cfg = load(config)
    again = _again("demo", "--config", config, *(("--workers", workers) if workers else ()))
    t0 = time.perf_counter()
    _, run_dir = resolve_run_dir(cfg, None, resume=False)
    try:
        console.rule("[bold]1/3 synthetic multi-centre cohort")
        with progress_bar("synthesising patients") as cb:
            try:
                generate_cohort(cfg.synth, cfg.data_root, seed=cfg.seed, workers=workers or cfg.preprocess.workers,
                                progress=cb)
            except FileExistsError as exc:
                fail(f"{exc}\nto replace it: rectalfl synth --config {config} --overwrite "
                     f"(or point data_root elsewhere)")
        sites = load_cohort_manifest(cfg.data_root)["sites"]
        console.rule("[bold]2/3 site checks and preprocessing (each site on its own)")
        for s in sites:
            site_dir = Path(cfg.data_root) / s["name"]
            with progress_bar(f"checking {s['name']}") as cb:
                report = check_site(site_dir, cfg, progress=cb)
            print_report(report)
            with progress_bar(f"preprocessing {s['name']}") as cb:
                manifest = preprocess_site(site_dir, Path(cfg.cache_root) / s["name"], cfg, workers=workers,
                                           progress=cb, check=report)
            print_manifest_summary(manifest, Path(cfg.cache_root) / s["name"], time.perf_counter() - t0)
    except KeyboardInterrupt as exc:
        stop_interrupted(exc, f"the cohort in {cfg.data_root} and the caches in {cfg.cache_root} keep every "
                              "finished patient and volume; a re-run reuses them", again)
    console.rule("[bold]3/3 federation (Flower simulation engine, one virtual SuperNode per site)")
    console.print(f"run directory: {run_dir}")
    try:
        run_simulation(cfg, run_dir=run_dir, console=out, workers=workers, prepare=False)
    except KeyboardInterrupt as exc:
        if not (run_dir / "config.yaml").is_file():
            stop_interrupted(exc, "the cohort and the caches are complete; the federation had not started", again)
        stop_interrupted(exc, run_progress(run_dir), _again("simulate", "--resume", run_dir))
    except RuntimeError as exc:
        fail(f"{exc}\nthe run record keeps what finished; continue with: {_again('simulate', '--resume', run_dir)}",
             1)
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s")


def simulate(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default configs/demo.yaml).")]
    = None,
    mode: Annotated[str | None, typer.Option(help="Override federation.mode: federated, pooled or local.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Override federation.strategy: fedavg, fedprox, fedadam, fedavgm.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Override federation.rounds.")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Where to write the run (default runs/<time>-<name>)"
                                                 "; must not exist or be empty.")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue this run directory (any mode) from its "
                                                "last completed round or epoch, with its own saved config.")] = None,
    workers: WorkersOpt = None,
    prepare_only: Annotated[bool, typer.Option("--prepare-only", help="Only generate the cohort and preprocess "
                                                "every site (e.g. before `flwr run .`).")] = False,
) -> None:
    """Run the whole consortium on this machine: cohort, per-site preprocessing, then the Flower federation."""
    import sys

    from simulations.runner import prepare_sites, resolve_run_dir, run_simulation

    given = {"--mode": mode, "--strategy": strategy, "--rounds": rounds, "--run-dir": run_dir}
    if resume is not None:
        clash = [k for k, v in {**given, "--config": config, "--prepare-only": prepare_only or None}.items()
                 if v is not None]
        if clash:
            fail(f"--resume continues {resume} with the run's own saved config ({resume / 'config.yaml'}); "
                 f"{', '.join(clash)} cannot change it: leave {'it' if len(clash) == 1 else 'them'} out, or start a "
                 "new run")
        cfg = RectalFLConfig()
    else:
        keys = {"--mode": "federation.mode", "--strategy": "federation.strategy", "--rounds": "federation.rounds"}
        overrides = {keys[k]: v for k, v in given.items() if k in keys and v is not None}
        cfg = _load_with(config or Path("configs/demo.yaml"), overrides, {keys[k]: k for k in keys})
    if prepare_only:
        try:
            with progress_bar("preparing sites") as cb:
                prepare_sites(cfg, workers=workers, progress=cb)
        except KeyboardInterrupt as exc:
            stop_interrupted(exc, f"the cohort in {cfg.data_root} and the caches in {cfg.cache_root} keep every "
                                  "finished patient and volume", _again(*sys.argv[1:]))
        out.print(f"cohort in {cfg.data_root}, caches in {cfg.cache_root}")
        return
    try:
        cfg, target = resolve_run_dir(cfg, resume or run_dir, resume=resume is not None)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    console.print(f"run directory: {target}{' (resuming)' if resume else ''}")
    cont = _again("simulate", "--resume", target)
    try:
        run_simulation(cfg, run_dir=target, resume=resume is not None, console=out, workers=workers)
    except KeyboardInterrupt as exc:
        if not (target / "config.yaml").is_file():
            stop_interrupted(exc, f"the cohort in {cfg.data_root} and the caches in {cfg.cache_root} keep every "
                                  "finished patient and volume; the run had not started", _again(*sys.argv[1:]))
        stop_interrupted(exc, run_progress(target), cont)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    except RuntimeError as exc:
        if (target / "run.db").is_file():
            fail(f"{exc}\nthe run record keeps what finished; continue with: {cont}", 1)
        fail(str(exc), 1)
