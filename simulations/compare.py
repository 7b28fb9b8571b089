"""``rectalfl compare``: the backbone zoo on one simulated consortium (simulation only: it runs both sides).

Every architecture is trained by the same federation, on the same sites, splits and seeds: one
:func:`simulations.runner.run_simulation` per (architecture, seed), with the config overridden
only in ``train.backbone`` (and ``train.seed`` for seed ``i > 0``: ``train.seed + i``; the run's
``seed``, hence the cohort and the splits, never changes). Each run is a complete run directory
(run record, final models, tables, report) under one compare directory::

    <runs_root>/compare-<time>-<name>/
      compare.json                 what was compared (backbones, seeds, overrides) and each run's timing
      runs/<backbone>-s<i>/        one full run directory per architecture and seed
      tables/compare_internal_test.csv, tables/compare_external.csv   one table per cohort
      tables/compare_summary.csv   mean and SD over seeds (with --seeds > 1)
      tables/compare_signatures.csv  each backbone's per-sequence signature AUCs (pooled test / external)
      figures/auc_ci.png, compare.html

What a row holds and where it comes from:

* ``auc, auc_lo, auc_hi`` (DeLong 95% CI), ``accuracy, sensitivity, specificity, f1``: the fusion
  deep-learning model (FDL, every signature of that architecture) in the run's
  ``tables/table3_performance.csv``, i.e. the federated statistics engine of the run itself;
* ``parameters``: of one backbone network (a run trains one per sequence x timepoint);
* ``seconds_per_round`` (median over the training rounds), ``bytes_per_round`` (mean, down + up, all
  sites): the run record's ``rounds`` table;
* ``p_vs_best``: the paired DeLong test against the architecture with the best internal-test AUC
  (of the same seed), on the same patients. Each simulated site keeps a copy of every run's
  per-patient scores in its own cache (``<cache>/compare/<compare-id>/<run>/``) and the test runs as
  site-computed ROC query (:class:`shared.stats.ROCSite`, two paired scores) over those site
  tables: the server side sees only the query's release, as in a deployment. The one function that touches that API is :func:`paired_delong`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shared.cli import JsonOpt, WorkersOpt, console, fail, load, out
from shared.config import ConfigError, RectalFLConfig, parse_config

if TYPE_CHECKING:  # numpy and pandas load when a comparison runs, so the `rectalfl` command starts fast
    import pandas as pd

logger = logging.getLogger(__name__)

COHORTS = ("internal_test", "external")
COHORT_SPLITS = {"internal_test": ["test"], "external": ["external"]}
MODEL = "FDL"
"""The per-architecture model compared: the fusion of all of its deep-learning signatures."""
SNAPSHOT_FILES = ("signatures.csv", "fusion_scores.csv")
TABLE_COLUMNS = ["backbone", "family", "seed", "run", "parameters", "n_pos", "n_neg", "auc", "auc_lo", "auc_hi",
                 "accuracy", "sensitivity", "specificity", "f1", "reference", "p_vs_best", "diff_vs_best",
                 "seconds_per_round", "bytes_per_round", "rounds", "run_seconds", "note"]


@dataclass
class RunInfo:
    """One architecture x seed of a comparison."""

    backbone: str
    seed_index: int
    run_dir: Path
    seconds: float = float("nan")
    reused: bool = False

    @property
    def label(self) -> str:
        return f"{self.backbone}-s{self.seed_index}"


# --------------------------------------------------------------------------- choosing what to compare


def parse_backbones(text: str | Sequence[str]) -> list[str]:
    """``"a,b,c"`` (or a list) -> registry names; ``cpu`` / ``full`` stand for every CPU-sized / full-size network.

    Raises
    ------
    ValueError
        For an unknown name (listing the valid ones), a duplicate, or an empty list.
    """
    from shared.models import available_models, cpu_models, full_size_models

    parts = [text] if isinstance(text, str) else list(text)
    items = [piece.strip() for part in parts for piece in part.split(",")]
    names: list[str] = []
    for item in filter(None, items):
        names += {"cpu": cpu_models(), "full": full_size_models()}.get(item, [item])
    valid = available_models("classification")
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown backbone(s) {unknown}; available: {', '.join(valid)} (or 'cpu', 'full')")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"backbone(s) listed twice: {dupes}")
    if not names:
        raise ValueError("no backbone given; e.g. --backbones densenet_tiny,resnet_tiny")
    return names


def run_config(cfg: RectalFLConfig, backbone: str, seed_index: int, *, rounds: int | None = None,
               variants: bool = False) -> RectalFLConfig:
    """The base config with only what differs between the compared runs changed (validated again)."""
    from shared.models import training_seed

    data = cfg.model_dump(mode="json")
    data["name"] = f"{cfg.name}-{backbone}-s{seed_index}"
    data["train"]["backbone"] = backbone
    if seed_index:
        data["train"]["seed"] = training_seed(cfg) + seed_index
    data["fusion"]["enabled"] = True  # the compared model is the fusion of the signatures
    data["fusion"]["variants"] = bool(variants and cfg.fusion.variants)
    if rounds is not None:
        data["federation"]["rounds"] = rounds
    return parse_config(data, f"compare override ({backbone}, seed {seed_index})")


# --------------------------------------------------------------------------- site-side copies of the scores


def snapshot_dir(cache_dir: Path, compare_id: str, label: str) -> Path:
    return Path(cache_dir) / "compare" / compare_id / label


def snapshot_site_tables(sites: list[dict], compare_id: str, label: str) -> None:
    """Each simulated site copies this run's per-patient scores inside its own cache (they stay there)."""
    for s in sites:
        cache = Path(s["cache_dir"])
        dst = snapshot_dir(cache, compare_id, label)
        dst.mkdir(parents=True, exist_ok=True)
        for name in SNAPSHOT_FILES:
            if (cache / name).is_file():
                shutil.copy2(cache / name, dst / name)


def _snapshots_complete(sites: list[dict], compare_id: str, label: str) -> bool:
    return all((snapshot_dir(Path(s["cache_dir"]), compare_id, label) / "signatures.csv").is_file() for s in sites)


def site_score_table(cache_dir: Path, compare_id: str, labels: Sequence[str]) -> pd.DataFrame:
    """One site's table for the cross-architecture tests: ``patient_id, split, label`` and one
    ``FDL@<run>`` column per run (that run's fusion score of each patient). Read on site, never sent."""
    import pandas as pd

    base: pd.DataFrame | None = None
    for label in labels:
        d = snapshot_dir(cache_dir, compare_id, label)
        sig = pd.read_csv(d / "signatures.csv", dtype={"patient_id": str})
        if base is None:
            base = sig[["patient_id", "split", "label"]].copy()
        col = f"fusion_{MODEL}"
        scores = (pd.read_csv(d / "fusion_scores.csv", dtype={"patient_id": str})
                  if (d / "fusion_scores.csv").is_file() else pd.DataFrame(columns=["patient_id", col]))
        s = scores.set_index("patient_id")[col] if col in scores else pd.Series(dtype=float)
        base[f"{MODEL}@{label}"] = base["patient_id"].map(s).astype(float)
    return base if base is not None else pd.DataFrame(columns=["patient_id", "split", "label"])


def paired_delong(tables: Mapping[str, pd.DataFrame], pairs: Sequence[tuple[str, str]], sites: Sequence[str],
                  splits: Sequence[str], min_count: int) -> dict[tuple[str, str], dict[str, Any]]:
    """Paired DeLong tests of score columns over the sites' own tables, as site-computed queries.

    Each pair is one :class:`shared.stats.ROCSite` query over the pair's complete cases, run by the
    simulated sites in this process (:func:`shared.stats.sitecomputed.run_plain`: what every site
    computes after secure aggregation); only the disclosure-checked release is read here.

    Parameters
    ----------
    tables : mapping site -> DataFrame
        Each site's table (``split``, ``label`` and the score columns); stays with the site.
    pairs : sequence of (column_a, column_b)
    sites, splits : the cohort (which sites, which of their splits)
    min_count : int
        Disclosure floor ``k`` of the release.

    Returns
    -------
    dict (column_a, column_b) -> {"auc_a", "auc_b", "diff", "p", "note"}
    """
    import numpy as np

    from shared.stats import ROCSite
    from shared.stats.sitecomputed import CohortData, run_plain

    out_: dict[tuple[str, str], dict[str, Any]] = {}
    for a, b in pairs:
        row: dict[str, Any] = {"auc_a": np.nan, "auc_b": np.nan, "diff": np.nan, "p": np.nan, "note": ""}
        data = {}
        for site in sites:
            t = tables[site]
            t = t[t["split"].isin(list(splits))].dropna(subset=[a, b, "label"])
            data[site] = CohortData(t["label"].to_numpy(int), t[[a, b]].to_numpy(float), (a, b))
        try:
            rel = run_plain(ROCSite([a, b]), data, min_count).result
            r = rel.delong(a, b)
            row.update(auc_a=float(rel.aucs[a].auc), auc_b=float(rel.aucs[b].auc),
                       diff=float(rel.aucs[a].auc - rel.aucs[b].auc), p=float(r.p))
        except ValueError as exc:  # withheld (a count below k) or no usable rows
            row["note"] = str(exc)
        out_[(a, b)] = row
    return out_


# --------------------------------------------------------------------------- reading a finished run


def run_rows(info: RunInfo, slice_size: int) -> list[dict[str, Any]]:
    """The FDL row of each cohort of one run, with its parameters, per-round cost and timing."""
    import numpy as np
    import pandas as pd

    from server.store import RunStore
    from shared.models import build_model, count_parameters, model_spec

    perf_path = info.run_dir / "tables" / "table3_performance.csv"
    perf = pd.read_csv(perf_path) if perf_path.is_file() else pd.DataFrame(columns=["model", "cohort"])
    with RunStore.open_run_dir(info.run_dir, readonly=True) as store:
        rid = str(store.runs()["run_id"].iloc[0])
        rounds = store.rounds(rid, "train")
    rounds = rounds[rounds["status"] == "completed"]
    per_round_bytes = (rounds["bytes_down"].astype(float) + rounds["bytes_up"].astype(float))
    spec = model_spec(info.backbone)
    base = {"backbone": info.backbone, "family": spec.family, "seed": info.seed_index, "run": info.label,
            "parameters": count_parameters(build_model(info.backbone, slice_size)),
            # median: the first round also pays the simulated sites' process start-up
            "seconds_per_round": float(rounds["seconds"].median()) if len(rounds) else np.nan,
            "bytes_per_round": float(per_round_bytes.mean()) if len(rounds) else np.nan,
            "rounds": len(rounds), "run_seconds": info.seconds}
    rows = []
    for cohort in COHORTS:
        row = dict(base, cohort=cohort, n_pos=0, n_neg=0, auc=np.nan, auc_lo=np.nan, auc_hi=np.nan, accuracy=np.nan,
                   sensitivity=np.nan, specificity=np.nan, f1=np.nan, note="")
        hit = perf[(perf["model"] == MODEL) & (perf["cohort"] == cohort)]
        if len(hit):
            r = hit.iloc[0]
            row.update({k: r[k] for k in ("n_pos", "n_neg", "auc", "auc_lo", "auc_hi", "accuracy", "sensitivity",
                                          "specificity", "f1") if k in r})
            row["note"] = "" if pd.isna(r.get("note", "")) else str(r.get("note", ""))
        else:
            row["note"] = f"no {MODEL} row for {cohort} in {perf_path.name}"
        rows.append(row)
    return rows


def signature_rows(info: RunInfo) -> pd.DataFrame:
    """Pooled per-sequence signature AUCs of one run (``tables/signature_auc.csv``)."""
    import pandas as pd

    path = info.run_dir / "tables" / "signature_auc.csv"
    if not path.is_file():
        return pd.DataFrame()
    t = pd.read_csv(path)
    t = t[t["site"].astype(str).str.startswith("pooled") | t["split"].eq("external")]
    t = t.assign(architecture=info.backbone, seed=info.seed_index)
    return t[["architecture", "seed", "backbone", "site", "split", "n_pos", "n_neg", "auc", "lo", "hi", "note"]]


# --------------------------------------------------------------------------- the comparison


def _best(frame: pd.DataFrame) -> str | None:
    ok = frame.dropna(subset=["auc"])
    return None if ok.empty else str(ok.sort_values(["auc", "backbone"], ascending=[False, True]).iloc[0]["run"])


def compare_tables(rows: pd.DataFrame, site_tables: Mapping[str, pd.DataFrame], roles: Mapping[str, str],
                   min_count: int) -> dict[str, pd.DataFrame]:
    """One table per cohort, each row with its paired DeLong test against the seed's best architecture.

    The reference is the architecture with the best internal-test AUC of the same seed (so the
    external cohort never chooses its own reference).
    """
    import numpy as np

    train_sites = sorted(s for s, r in roles.items() if r == "train")
    ext_sites = sorted(s for s, r in roles.items() if r == "external")
    cohort_sites = {"internal_test": train_sites, "external": ext_sites}
    tables: dict[str, pd.DataFrame] = {}
    refs = {seed: _best(g[g["cohort"] == "internal_test"]) for seed, g in rows.groupby("seed")}
    for cohort in COHORTS:
        t = rows[rows["cohort"] == cohort].copy()
        t["reference"], t["p_vs_best"], t["diff_vs_best"] = "", np.nan, np.nan
        sites = cohort_sites[cohort]
        for seed, g in t.groupby("seed"):
            ref = refs.get(seed)
            if ref is None or not sites:
                continue
            others = [r for r in g["run"] if r != ref]
            pairs = [(f"{MODEL}@{r}", f"{MODEL}@{ref}") for r in others]
            res = paired_delong({s: site_tables[s] for s in sites}, pairs, sites, COHORT_SPLITS[cohort],
                                min_count) if pairs else {}
            for r, pair in zip(others, pairs, strict=True):
                i = t.index[t["run"] == r][0]
                t.loc[i, ["p_vs_best", "diff_vs_best"]] = res[pair]["p"], res[pair]["diff"]
                if res[pair]["note"]:
                    t.loc[i, "note"] = "; ".join(filter(None, [t.loc[i, "note"], f"DeLong: {res[pair]['note']}"]))
            t.loc[g.index, "reference"] = ref
        tables[cohort] = t.sort_values(["seed", "auc", "backbone"], ascending=[True, False, True],
                                       na_position="last")[TABLE_COLUMNS].reset_index(drop=True)
    return tables


def summary_over_seeds(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean and SD over seeds of each architecture's numbers, per cohort."""
    import pandas as pd

    parts = []
    for cohort, t in tables.items():
        g = t.groupby(["backbone", "family"], sort=False)
        s = g.agg(seeds=("seed", "nunique"), parameters=("parameters", "first"), auc_mean=("auc", "mean"),
                  auc_sd=("auc", "std"), accuracy_mean=("accuracy", "mean"), f1_mean=("f1", "mean"),
                  seconds_per_round=("seconds_per_round", "mean"), bytes_per_round=("bytes_per_round", "mean"),
                  p_vs_best_max=("p_vs_best", "max")).reset_index()
        s.insert(0, "cohort", cohort)
        parts.append(s)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def new_compare_dir(cfg: RectalFLConfig) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.runs_root) / f"compare-{stamp}-{cfg.name}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def compare_backbones(cfg: RectalFLConfig, backbones: Sequence[str], *, seeds: int = 1,
                      compare_dir: Path | None = None, rounds: int | None = None, variants: bool = False,
                      workers: int | None = None, prepare: bool = True,
                      progress: Callable[[str], None] | None = None) -> Path:
    """Train every architecture on the simulated consortium and write the comparison; returns its directory.

    Parameters
    ----------
    cfg : RectalFLConfig
        The base config (``federation.mode`` must be ``federated``).
    backbones : sequence of str
        Registry names (see :func:`parse_backbones`).
    seeds : int
        Training seeds per architecture (``train.seed + i``); the cohort and splits stay the same.
    compare_dir : Path, optional
        Default ``<runs_root>/compare-<time>-<name>``. An existing one is continued: finished runs
        are kept, unfinished ones resumed from their last round.
    rounds : int, optional
        Override ``federation.rounds`` for every run.
    variants : bool
        Also fit the single-sequence fusion variants in every run (off: only FDL/CR/CRD are needed).
    """
    from server.pipeline import simulation_sites
    from simulations.runner import prepare_sites, run_simulation

    say = progress or (lambda s: logger.info(s))
    names = parse_backbones(backbones)
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    if cfg.federation.mode != "federated":
        raise ValueError(f"compare trains by federation; federation.mode is {cfg.federation.mode!r} "
                         "(set it to federated)")
    compare_dir = Path(compare_dir or new_compare_dir(cfg)).resolve()
    compare_id = compare_dir.name
    (compare_dir / "runs").mkdir(parents=True, exist_ok=True)
    configs = {(b, i): run_config(cfg, b, i, rounds=rounds, variants=variants) for i in range(seeds) for b in names}
    if prepare:
        say("preparing the consortium (cohort + each site's preprocessing)")
        prepare_sites(cfg, workers=workers)
    sites, external = simulation_sites(cfg)
    roles = {s["name"]: ("external" if s["name"] in external else "train") for s in sites}
    spec = {"compare_id": compare_id, "base_config": cfg.name, "config_digest": cfg.digest(), "backbones": names,
            "seeds": seeds, "rounds": rounds or cfg.federation.rounds, "model": MODEL,
            "slice_size": cfg.preprocess.slice_size, "sites": roles, "runs": []}
    previous = _previous_seconds(compare_dir)  # read before compare.json is rewritten below
    infos: list[RunInfo] = []
    for (b, i), rcfg in configs.items():
        info = RunInfo(b, i, compare_dir / "runs" / f"{b}-s{i}")
        done = _run_completed(info.run_dir) and _snapshots_complete(sites, compare_id, info.label)
        if done:
            info.reused = True
            info.seconds = previous.get(info.label) or _recorded_duration(info.run_dir)
            say(f"{info.label}: already finished, kept")
        else:
            resume = (info.run_dir / "run.db").is_file() and (info.run_dir / "config.yaml").is_file()
            say(f"{info.label}: {'resuming' if resume else 'training'} ({len(infos) + 1}/{len(configs)})")
            t0 = time.perf_counter()
            run_simulation(rcfg, run_dir=info.run_dir, resume=resume, workers=workers, prepare=False)
            info.seconds = time.perf_counter() - t0
            snapshot_site_tables(sites, compare_id, info.label)
        infos.append(info)
        spec["runs"].append({"run": info.label, "backbone": b, "seed_index": i, "train_seed": rcfg.train.seed,
                             "seconds": round(info.seconds, 2) if info.seconds == info.seconds else None,
                             "reused": info.reused,
                             "run_dir": f"runs/{info.run_dir.name}"})
        (compare_dir / "compare.json").write_text(json.dumps(spec, indent=2))
    write_comparison(compare_dir, infos, sites, roles, cfg)
    return compare_dir


def _run_completed(run_dir: Path) -> bool:
    if not (run_dir / "run.db").is_file():
        return False
    from server.store import RunStore

    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        runs = store.runs()
    return bool(len(runs)) and runs["status"].iloc[0] == "completed"


def _previous_seconds(compare_dir: Path) -> dict[str, float]:
    """Wall time of each run measured by an earlier invocation (``compare.json``), by run label."""
    p = compare_dir / "compare.json"
    if not p.is_file():
        return {}
    return {r["run"]: float(r["seconds"]) for r in json.loads(p.read_text()).get("runs", [])
            if r.get("seconds") is not None}


def _recorded_duration(run_dir: Path) -> float:
    """The run record's own start-to-finish time (without the simulation engine's start-up)."""
    import pandas as pd

    from server.store import RunStore

    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        r = store.runs().iloc[0]
    t = pd.to_datetime([r["created_at"], r["finished_at"]], utc=True)
    return float((t[1] - t[0]).total_seconds())


def write_comparison(compare_dir: Path, infos: Sequence[RunInfo], sites: list[dict], roles: Mapping[str, str],
                     cfg: RectalFLConfig) -> dict[str, pd.DataFrame]:
    """Tables (per cohort, summary, signatures) and ``compare.html`` from the finished runs."""
    import pandas as pd

    from simulations.compare_report import build_compare_report

    rows = pd.DataFrame([r for info in infos for r in run_rows(info, cfg.preprocess.slice_size)])
    labels = [i.label for i in infos]
    site_tables = {s["name"]: site_score_table(Path(s["cache_dir"]), compare_dir.name, labels) for s in sites}
    tables = compare_tables(rows, site_tables, roles, cfg.privacy.min_cell_count)
    tdir = compare_dir / "tables"
    tdir.mkdir(parents=True, exist_ok=True)
    for cohort, t in tables.items():
        t.to_csv(tdir / f"compare_{cohort}.csv", index=False)
    if len({i.seed_index for i in infos}) > 1:
        summary_over_seeds(tables).to_csv(tdir / "compare_summary.csv", index=False)
    sig = [signature_rows(i) for i in infos]
    sig = [s for s in sig if len(s)]
    if sig:
        pd.concat(sig, ignore_index=True).to_csv(tdir / "compare_signatures.csv", index=False)
    build_compare_report(compare_dir)
    return tables


# --------------------------------------------------------------------------- command


def compare(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config of the consortium.")] = Path(
        "configs/demo.yaml"),
    backbones: Annotated[str, typer.Option("--backbones", "-b", help="Comma-separated registry names; 'cpu' / "
                                                                     "'full' = every CPU-sized / full-size one.")
                         ] = "densenet_tiny,resnet_tiny",
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Training seeds per architecture.")] = 1,
    rounds: Annotated[int | None, typer.Option(help="Override federation.rounds for every run.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Compare directory (default runs/compare-<time>-"
                                                               "<name>); an existing one is continued.")] = None,
    variants: Annotated[bool, typer.Option("--variants/--no-variants", help="Also fit the single-sequence fusion "
                                                                            "variants in every run.")] = False,
    workers: WorkersOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train each architecture by federation on the same simulated sites, splits and seeds, and compare them."""
    import numpy as np
    import pandas as pd

    try:
        names = parse_backbones(backbones)
        cfg = load(config)
        target = compare_backbones(cfg, names, seeds=seeds, compare_dir=out_dir, rounds=rounds, variants=variants,
                                   workers=workers, progress=lambda s: console.print(f"[bold]compare[/] {s}"))
    except (ValueError, KeyError, ConfigError, FileExistsError, FileNotFoundError) as exc:
        fail(str(exc))
    except RuntimeError as exc:
        fail(f"{exc}\nfinished runs are kept; continue with --out COMPARE_DIR")
    tables = {c: pd.read_csv(target / "tables" / f"compare_{c}.csv") for c in COHORTS
              if (target / "tables" / f"compare_{c}.csv").is_file()}
    if as_json:
        out.print_json(json.dumps({"compare_dir": str(target), "report": str(target / "compare.html"),
                                   "tables": {c: t.to_dict(orient="records") for c, t in tables.items()}},
                                  default=lambda v: None if isinstance(v, float) and np.isnan(v) else str(v)))
        return
    _print_tables(tables)
    out.print(f"comparison in {target}; report: {target / 'compare.html'}")


def _print_tables(tables: Mapping[str, pd.DataFrame]) -> None:
    import numpy as np
    from rich.table import Table

    def f(v: Any, d: int = 3) -> str:
        return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{d}f}"

    for cohort, t in tables.items():
        table = Table(title=f"{MODEL} per architecture: {cohort.replace('_', ' ')}", title_justify="left")
        for col in ("backbone", "seed", "params", "AUC (95% CI)", "acc", "sens", "spec", "F1", "p vs best",
                    "s/round", "MB/round"):
            table.add_column(col, justify="left" if col == "backbone" else "right")
        for r in t.itertuples():
            auc = f"{f(r.auc)} ({f(r.auc_lo)}-{f(r.auc_hi)})" if not np.isnan(r.auc) else "n/a"
            table.add_row(r.backbone, str(r.seed), f"{int(r.parameters):,}", auc, f(r.accuracy), f(r.sensitivity),
                          f(r.specificity), f(r.f1), "ref" if r.run == r.reference else f(r.p_vs_best),
                          f(r.seconds_per_round, 1), f(r.bytes_per_round / 1e6, 2))
        out.print(table)
