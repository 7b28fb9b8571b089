"""Federated vs pooled vs local training on the demo cohort, with round timing and bytes on the wire.

Run from the repository root (prepares the demo cohort if needed)::

    python -m simulations.benchmarks.bench_federation                      # 3 seeds, every strategy
    python -m simulations.benchmarks.bench_federation --seeds 1 --strategies fedavg fedavgm --out bench_fed.csv

Prints
(a) AUC on each training site's test split, the external site and the pooled test splits, for
    pooled, each local-only model and each federated strategy (``--strategies``: FedAvg, FedProx,
    FedAdam, FedAvgM), mean over seeds (``train.seed`` varies; cohort and splits stay fixed), averaged
    over all backbones and over the post-treatment backbones;
(b) per-round wall time of the federated runs split into the slowest site's local compute and the
    rest (Flower, Ray, serialisation, aggregation, checkpoint, run record);
(c) bytes sent to and from each site per round;
and last, for the post-treatment backbones, the best federated strategy against pooled training and
the best single site: ``federated/pooled external AUC: <ratio>`` (the goal is >= 0.97 on the external
site and on the pooled test split, and >= the best single site + 0.03).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd

from server.store import RunStore
from shared.config import load_config
from simulations.runner import prepare_sites, run_simulation

SITE_STATE_SUFFIX = "+site-state"


def _one(cfg, mode: str, strategy: str, seed: int, runs_root: Path,
         local_steps: int | None = None) -> tuple[pd.DataFrame, Path, float]:
    c = cfg.model_copy(deep=True)
    c.federation.mode = mode
    c.federation.strategy = strategy.removesuffix(SITE_STATE_SUFFIX)
    if strategy.endswith(SITE_STATE_SUFFIX):  # the site keeps its BN statistics and momentum; steps, not epochs
        c.federation.norm_stats = "local"
        c.train.keep_optimizer_state = True
        c.train.local_steps = local_steps
    c.train.seed = seed
    c.fusion.enabled = False  # the table is the signatures' AUCs: the fusion analysis would only add minutes
    c.runs_root = runs_root
    t0 = time.perf_counter()
    run_dir = run_simulation(c, prepare=False)
    seconds = time.perf_counter() - t0
    table = pd.read_csv(run_dir / "tables" / "signature_auc.csv")
    if "model" not in table:
        table.insert(0, "model", strategy)
    elif strategy.endswith(SITE_STATE_SUFFIX):
        table["model"] = strategy
    table["seed"] = seed
    return table, run_dir, seconds


def round_profile(run_dir: Path) -> pd.DataFrame:
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        rid = store.runs()["run_id"].iloc[0]
        rounds = store.rounds(rid, stage="train")
        m = store.metrics(rid, stage="train", key="fit-seconds")
    slowest = m.groupby("round")["value"].max().rename("slowest_client_s")
    df = rounds.set_index("round")[["seconds", "n_sent", "n_replied", "bytes_down", "bytes_up"]].join(slowest)
    df["overhead_s"] = df["seconds"] - df["slowest_client_s"]
    df["down_per_site_MB"] = df["bytes_down"] / df["n_sent"] / 1e6
    df["up_per_site_MB"] = df["bytes_up"] / df["n_replied"] / 1e6
    return df


def _verdict(by: pd.DataFrame) -> str:
    """The goal's figures from the post-treatment table (rows: model, columns: site incl. pooled/external)."""
    ext = next((c for c in ("pooled (external sites)", "external") if c in by.columns), None)
    pooled_col = "pooled (training sites)" if "pooled (training sites)" in by.columns else None
    if ext is None or pooled_col is None or "pooled" not in by.index:
        return "federated/pooled external AUC: n/a (no pooled row or no external/pooled column)"
    fed = by[[not str(m).startswith(("pooled", "local")) for m in by.index]]
    local = by[[str(m).startswith("local") for m in by.index]]
    if fed.empty:
        return "federated/pooled external AUC: n/a (no federated run)"
    ratios = pd.DataFrame({"external/pooled": fed[ext] / by.loc["pooled", ext],
                           "pooled-test/pooled": fed[pooled_col] / by.loc["pooled", pooled_col]})
    best = ratios.min(axis=1).idxmax()  # the strategy whose worse ratio is best: both cohorts count
    lines = ["federated / pooled training, per strategy:", ratios.round(3).to_string(),
             f"best federated strategy (the higher of the two ratios' minimum): {best} (external "
             f"{fed.loc[best, ext]:.3f}, pooled test {fed.loc[best, pooled_col]:.3f}); pooled training "
             f"{by.loc['pooled', ext]:.3f} / {by.loc['pooled', pooled_col]:.3f}"]
    if not local.empty:
        lines.append(f"best single site alone: {local[ext].max():.3f} external, {local[pooled_col].max():.3f} pooled test")
    lines.append(f"federated/pooled pooled-test AUC: {fed.loc[best, pooled_col] / by.loc['pooled', pooled_col]:.3f}")
    lines.append(f"federated/pooled external AUC: {fed.loc[best, ext] / by.loc['pooled', ext]:.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per model (1..N)")
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "fedprox", "fedadam", "fedavgm"],
                    choices=["fedavg", "fedprox", "fedadam", "fedavgm"])
    ap.add_argument("--site-state", action="store_true",
                    help="also each strategy with federation.norm_stats local, train.keep_optimizer_state and "
                         "train.local_steps (model '<strategy>+site-state')")
    ap.add_argument("--local-steps", type=int, default=10, help="train.local_steps of the --site-state runs")
    ap.add_argument("--rounds", type=int, default=None, help="override federation.rounds")
    ap.add_argument("--out", default=None, help="write the full per-backbone table to this CSV")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config)
    if args.rounds:
        cfg.federation.rounds = args.rounds
    prepare_sites(cfg)
    tables, profiles, walls = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, args.seeds + 1):
            fed = [*args.strategies, *((st + SITE_STATE_SUFFIX for st in args.strategies) if args.site_state else ())]
            for mode, strategy in [("pooled", "fedavg"), ("local", "fedavg"), *(("federated", st) for st in fed)]:
                t, run_dir, secs = _one(cfg, mode, strategy, seed, Path(tmp), args.local_steps)
                tables.append(t)
                walls.append({"model": t["model"].iloc[0] if mode != "local" else "local (all)", "seed": seed,
                              "wall_s": secs})
                if mode == "federated":
                    p = round_profile(run_dir)
                    p["strategy"], p["seed"] = strategy, seed
                    profiles.append(p.reset_index())
                print(f"seed {seed} {mode}/{strategy}: {secs:.0f} s", flush=True)
    full = pd.concat(tables, ignore_index=True)
    full["model"] = full["model"].replace({"pooled": "pooled"})
    if args.out:
        full.to_csv(args.out, index=False)
    evald = full[full["split"].isin(["test", "external"])]
    pd.set_option("display.width", 200)
    for label, sub in [("all 6 backbones", evald), ("post-treatment backbones",
                                                    evald[evald["backbone"].str.startswith("post_")])]:
        piv = sub.pivot_table(index="model", columns="site", values="auc", aggfunc="mean")
        print(f"\n(a) mean AUC over {label} and {args.seeds} seed(s)")
        print(piv.round(3).to_string())
    post = evald[evald["backbone"].str.startswith("post_")]
    by = post.pivot_table(index="model", columns="site", values="auc", aggfunc="mean")
    print(f"\n{_verdict(by)}")
    prof = pd.concat(profiles, ignore_index=True)
    print("\n(b) federated round wall time, mean per round (s)")
    print(prof.groupby("strategy")[["seconds", "slowest_client_s", "overhead_s"]].mean().round(2).to_string())
    print("\n(c) bytes per site per round (MB)")
    print(prof.groupby("strategy")[["down_per_site_MB", "up_per_site_MB"]].mean().round(3).to_string())
    print("\nwhole runs (s)")
    print(pd.DataFrame(walls).groupby("model")["wall_s"].mean().round(0).to_string())


if __name__ == "__main__":
    main()
