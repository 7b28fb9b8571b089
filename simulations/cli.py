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


def synth(
    config: ConfigOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: data_root).")] = None,
    workers: WorkersOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing, different cohort.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate the synthetic multi-centre cohort (one folder per site, in the site data contract)."""
    from simulations.synth import generate_cohort

    cfg = load(config)
    target = out_dir or cfg.data_root
    with progress_bar("synthesising patients", not as_json) as cb:
        try:
            summary = generate_cohort(cfg.synth, target, seed=cfg.seed, workers=workers or cfg.preprocess.workers,
                                      progress=cb, overwrite=overwrite)
        except (ValueError, OSError) as exc:
            fail(str(exc))
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
    from simulations.synth import generate_cohort, load_cohort_manifest

    cfg = load(config)
    t0 = time.perf_counter()
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
            manifest = preprocess_site(site_dir, Path(cfg.cache_root) / s["name"], cfg, workers=workers, progress=cb)
        print_manifest_summary(manifest, Path(cfg.cache_root) / s["name"], time.perf_counter() - t0)
    console.rule("[bold]3/3 federation (Flower simulation engine, one virtual SuperNode per site)")
    from simulations.runner import run_simulation

    run_simulation(cfg, console=out, workers=workers, prepare=False)
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s")


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
    from simulations.runner import prepare_sites, run_simulation

    overrides = {k: v for k, v in {"federation.mode": mode, "federation.strategy": strategy,
                                   "federation.rounds": rounds}.items() if v is not None}
    cfg = load(config, overrides)
    if prepare_only:
        with progress_bar("preparing sites") as cb:
            prepare_sites(cfg, workers=workers, progress=cb)
        out.print(f"cohort in {cfg.data_root}, caches in {cfg.cache_root}")
        return
    try:
        run_simulation(cfg, run_dir=resume or run_dir, resume=resume is not None, console=out, workers=workers)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    except RuntimeError as exc:
        fail(f"{exc}\nthe run record keeps what finished; continue with --resume RUN_DIR")
