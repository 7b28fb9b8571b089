"""What differential privacy costs: AUC and time of FedAvg with DP-SGD at several epsilons, on the demo cohort.

Run from the repository root (prepares the demo cohort if needed)::

    python -m simulations.benchmarks.bench_dp                     # demo config, 3 seeds, eps 1, 3, 8 and no DP
    python -m simulations.benchmarks.bench_dp --seeds 1 --rounds 3 --out bench_dp.csv   # a reduced run
    python -m simulations.benchmarks.bench_dp --fit-timing 5 --timing-only              # DP cost of a local round

Every configuration is a real federation (``simulations.runner.run_simulation``: Flower's simulation
engine, the ClientApp, the pipeline), FedAvg, on the demo consortium; only ``train.seed`` varies
between seeds (cohort and splits stay fixed; the DP noise comes from each site's own secret). With
DP, ``privacy.target_epsilon`` is the epsilon each site reaches after the planned rounds (each site
calibrates its noise to it, at delta = 1 / (10 n_train)).

Prints one row per setting (no DP, epsilon 8, 3, 1), mean +- SD over seeds:

- the epsilon the sites reported (largest over sites; ``tables/privacy_ledger.csv``);
- AUC of each post-treatment signature on the external site and pooled over the training sites'
  test splits (``tables/signature_auc.csv``);
- AUC of FDL (fusion of the signatures) on the external and internal-test cohorts
  (``tables/table3_performance.csv``; ``n/a`` when the fusion stage did not produce it);
- the smallest noise multiplier the sites calibrated;
- seconds per training round from round 2 on (the run record's rounds; round 1 also starts the
  site processes and imports, shown apart), and the slowest site's local training time per round.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from server.store import RunStore
from shared.config import RectalFLConfig, load_config
from simulations.runner import prepare_sites, run_simulation

logger = logging.getLogger(__name__)

POOLED_TEST = "pooled (training sites)"


def setting_config(base: RectalFLConfig, epsilon: float | None, seed: int, runs_root: Path) -> RectalFLConfig:
    """The demo config for one cell: FedAvg, ``train.seed``, DP at ``target_epsilon`` (None: no DP)."""
    c = base.model_copy(deep=True)
    c.federation.mode = "federated"
    c.federation.strategy = "fedavg"
    c.train.seed = seed
    c.runs_root = runs_root
    c.name = f"dp-{'none' if epsilon is None else f'eps{epsilon:g}'}-s{seed}"
    data = c.model_dump(mode="json")
    data["privacy"].update({"dp": epsilon is not None, "target_epsilon": epsilon, "noise_multiplier": None})
    from shared.config import parse_config

    return parse_config(data, source="bench_dp")


def read_run(run_dir: Path) -> dict[str, float]:
    """The numbers of one run (NaN where a table or row is absent)."""
    out: dict[str, float] = {}
    sig = pd.read_csv(run_dir / "tables" / "signature_auc.csv")
    ext = sig[sig["split"] == "external"]
    ext = ext[ext["site"].str.startswith("pooled")] if ext["site"].str.startswith("pooled").any() else ext
    for key in sorted(k for k in sig["backbone"].unique() if str(k).startswith("post_")):
        e = ext[ext["backbone"] == key]["auc"]
        t = sig[(sig["backbone"] == key) & (sig["site"] == POOLED_TEST)]["auc"]
        out[f"{key} ext"] = float(e.iloc[0]) if len(e) else np.nan
        out[f"{key} test"] = float(t.iloc[0]) if len(t) else np.nan
    perf = run_dir / "tables" / "table3_performance.csv"
    fdl = pd.read_csv(perf) if perf.is_file() else pd.DataFrame(columns=["model", "cohort", "auc"])
    for cohort, label in (("external", "FDL ext"), ("internal_test", "FDL test")):
        v = fdl[(fdl["model"] == "FDL") & (fdl["cohort"] == cohort)]["auc"]
        out[label] = float(v.iloc[0]) if len(v) else np.nan
    ledger = run_dir / "tables" / "privacy_ledger.csv"
    led = pd.read_csv(ledger) if ledger.is_file() else pd.DataFrame(columns=["epsilon", "noise_multiplier"])
    out["epsilon"] = float(led["epsilon"].max()) if len(led) else np.nan
    out["noise"] = float(led["noise_multiplier"].min()) if len(led) else np.nan
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        rid = store.runs()["run_id"].iloc[0]
        rounds = store.rounds(rid, stage="train")
        fit = store.metrics(rid, stage="train", key="fit-seconds")
    later = rounds[rounds["round"] > 1] if (rounds["round"] > 1).any() else rounds
    out["s/round"] = float(later["seconds"].mean())  # round 1 also starts the site processes: apart
    out["round 1 s"] = float(rounds.loc[rounds["round"] == 1, "seconds"].iloc[0]) if len(rounds) else np.nan
    slowest = fit.groupby("round")["value"].max() if len(fit) else pd.Series(dtype=float)
    out["site fit s/round"] = float(slowest[slowest.index > 1].mean()) if (slowest.index > 1).any() else \
        float(slowest.mean()) if len(slowest) else np.nan
    return out


def fit_timing(base: RectalFLConfig, site: str, repeats: int) -> pd.DataFrame:
    """Seconds of one site's local round (every backbone), without and with DP, interleaved in one process.

    The federated rounds' times depend on whatever else the machine runs; alternating the two
    here puts both under the same conditions. DP: noise multiplier 1, the site's own ledger under a
    throw-away run id (removed afterwards).
    """
    import uuid

    from client.algorithm import SiteAlgorithm
    from client.privacy_ledger import PrivacyLedger
    from server.pipeline import simulation_sites
    from shared.config import parse_config
    from shared.models import initial_states

    sites, _ = simulation_sites(base)
    s = next(x for x in sites if x["name"] == site)
    rows = []
    for dp in (False, True):
        data = base.model_dump(mode="json")
        data["privacy"].update({"dp": dp, "noise_multiplier": 1.0 if dp else None, "target_epsilon": None})
        cfg = parse_config(data, source="bench_dp")
        algo = SiteAlgorithm(site, Path(s["data_dir"]), Path(s["cache_dir"]), cfg)
        states = initial_states(cfg)
        run = f"bench-timing-{uuid.uuid4().hex[:8]}"
        algo.fit(states, 0, run_id=run)  # warm-up: caches, imports, the per-sample engine probe
        rows.append((dp, algo, states, run))
    out = []
    for i in range(repeats):
        for dp, algo, states, run in rows:
            t0 = time.perf_counter()
            algo.fit(states, i + 1, run_id=run)
            out.append({"dp": dp, "seconds": time.perf_counter() - t0})
    for dp, algo, _, run in rows:
        if dp:
            PrivacyLedger.file_for(algo.cache_dir, run).unlink(missing_ok=True)
    return pd.DataFrame(out)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean +- SD over seeds per setting, as text cells, in the order: no DP, then decreasing epsilon."""
    cols = [c for c in rows.columns if c not in ("setting", "seed", "run_dir", "wall_s")]
    order = sorted(rows["setting"].unique(), key=lambda s: (s != "no DP", -float(s.split()[-1]) if s != "no DP" else 0))
    out = []
    for s in order:
        g = rows[rows["setting"] == s]
        rec = {"setting": s, "seeds": len(g)}
        for c in cols:
            v = g[c].astype(float).dropna()
            rec[c] = "n/a" if v.empty else (f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} +- {v.std():.3f}")
        out.append(rec)
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml", help="base config (default: the demo)")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds 1..N (default 3)")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0])
    ap.add_argument("--rounds", type=int, default=None, help="federation.rounds (default: the config's)")
    ap.add_argument("--local-epochs", type=int, default=None, help="train.local_epochs (default: the config's)")
    ap.add_argument("--no-fusion", action="store_true", help="skip the fusion stage (no FDL numbers; faster)")
    ap.add_argument("--data-root", type=Path, default=None, help="cohort folder (default: the config's)")
    ap.add_argument("--cache-root", type=Path, default=None, help="site caches (default: the config's)")
    ap.add_argument("--runs-root", type=Path, default=Path("runs/bench_dp"))
    ap.add_argument("--out", type=Path, default=None, help="also write every run's numbers to this CSV")
    ap.add_argument("--fit-timing", type=int, default=0, metavar="N",
                    help="also time N local rounds of site_a without and with DP, interleaved in this process")
    ap.add_argument("--timing-only", action="store_true", help="only the --fit-timing measurement")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    base = load_config(args.config)
    upd: dict = {}
    if args.data_root:
        upd["data_root"] = args.data_root
    if args.cache_root:
        upd["cache_root"] = args.cache_root
    base = base.model_copy(update=upd)
    if args.rounds:
        base.federation.rounds = args.rounds
    if args.local_epochs:
        base.train.local_epochs = args.local_epochs
    base.fusion.enabled = not args.no_fusion
    base.fusion.variants = False  # FDL, CR, CRD only
    base.fusion.pooled_reference = False
    prepare_sites(base)
    if args.fit_timing:
        t = fit_timing(base, base.synth.sites[0].name, args.fit_timing)
        g = t.groupby("dp")["seconds"]
        print(f"local round of {base.synth.sites[0].name} (every backbone, {base.train.local_epochs} epoch(s)), "
              f"{args.fit_timing} repeats interleaved: without DP {g.mean()[False]:.2f} +- {g.std()[False]:.2f} s, "
              f"with DP {g.mean()[True]:.2f} +- {g.std()[True]:.2f} s (x{g.mean()[True] / g.mean()[False]:.2f})",
              flush=True)
        if args.timing_only:
            return 0
    settings: list[float | None] = [None, *sorted(args.epsilons, reverse=True)]
    rows = []
    for seed in range(1, args.seeds + 1):
        for eps in settings:
            cfg = setting_config(base, eps, seed, args.runs_root)
            t0 = time.perf_counter()
            run_dir = run_simulation(cfg, prepare=False)
            rec = {"setting": "no DP" if eps is None else f"epsilon {eps:g}", "seed": seed, **read_run(run_dir),
                   "wall_s": time.perf_counter() - t0, "run_dir": str(run_dir)}
            rows.append(rec)
            print(f"done: {rec['setting']} seed {seed} in {rec['wall_s']:.0f} s ({run_dir})", file=sys.stderr,
                  flush=True)
    table = pd.DataFrame(rows)
    if args.out:
        table.to_csv(args.out, index=False)
    print(f"\nFedAvg on {args.config}: {len(base.synth.sites)} sites, {base.federation.rounds} rounds x "
          f"{base.train.local_epochs} local epochs, backbone {base.train.backbone}, batch {base.train.batch_size}, "
          f"{args.seeds} seed(s); DP: target epsilon per site after all rounds, delta 1/(10 n_train), clip "
          f"{base.privacy.max_grad_norm:g}, accountant {base.privacy.accountant}")
    with pd.option_context("display.width", 250, "display.max_columns", 50):
        print(summarise(table).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
