"""Federated fusion SVM vs scikit-learn's SVC on the same pooled signatures (issue 5's yardstick).

Reads the signature tables the demo run left in each simulated site's cache (run the demo or
``rectalfl simulate --config configs/demo.yaml`` first), then for each seed fits FDL, CR and CRD
both ways on the training cohort (training sites' train/val splits) and prints the AUC on the
internal test cohort and on the external site, and the hyper-parameters each chose::

    python -m simulations.benchmarks.bench_fusion --config configs/demo.yaml --seeds 0 1 2

The seed changes the random Fourier features, the sites' fold assignment and the reference's CV
split; the deep-learning signatures stay those of the run. CR/CRD use the predictors the
federated selection picks (``tables/table2_odds_ratios.csv`` of a run, or ``--predictors``).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import pandas as pd


def load_tables(cfg) -> dict[str, pd.DataFrame]:
    from client.site_table import build_site_table, encode_clinical
    from shared.cohort import load_patients

    out = {}
    for s in cfg.synth.sites:
        sig = Path(cfg.cache_root) / s.name / "signatures.csv"
        if not sig.is_file():
            raise SystemExit(f"{sig} not found: run the demo (or rectalfl simulate) with this config first")
        table = build_site_table(pd.read_csv(sig, dtype={"patient_id": str}),
                                 encode_clinical(load_patients(Path(cfg.data_root) / s.name, cfg)), None)
        out[s.name] = table.assign(site=s.name, external=s.external)
    return out


def main(argv: list[str] | None = None) -> None:
    from sklearn.metrics import roc_auc_score

    from shared.config import load_config
    from shared.fusion import FederatedSVC, PooledSVC

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--predictors", nargs="*", default=["post_ld", "post_mwt"])
    ap.add_argument("--n-components", type=int, default=None)
    ap.add_argument("--loss", choices=["squared_hinge", "huber_hinge"], default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = load_config(args.config)
    f = cfg.fusion
    tables = load_tables(cfg)
    train = pd.concat([t for t in tables.values() if not t["external"].iloc[0]], ignore_index=True)
    ext = pd.concat([t for t in tables.values() if t["external"].iloc[0]], ignore_index=True)
    fit_rows, test = train[train["split"].isin(["train", "val"])], train[train["split"] == "test"]
    sig = [f"{tp}_{s}" for s in cfg.data.sequences for tp in cfg.data.timepoints]
    models = {"FDL": sig, "CR": list(args.predictors), "CRD": sig + list(args.predictors)}
    rows = []
    for seed in args.seeds:
        for name, cols in models.items():
            t0 = time.perf_counter()
            fed = FederatedSVC(f.C_grid, f.gamma_factors, args.n_components or f.n_components, cfg.split.cv_folds,
                               seed, cfg.privacy.min_cell_count, args.loss or f.loss, f.huber_h).fit(
                fit_rows[cols].to_numpy(float), fit_rows["label"].to_numpy(int), fit_rows["site"].to_numpy())
            secs = time.perf_counter() - t0
            ref = PooledSVC(f.C_grid, f.gamma_factors, cfg.split.cv_folds, seed).fit(
                fit_rows[cols].to_numpy(float), fit_rows["label"].to_numpy(int))
            row = {"seed": seed, "model": name}
            for cohort, d in (("test", test), ("external", ext)):
                X, y = d[cols].to_numpy(float), d["label"].to_numpy(int)
                row[f"fed_{cohort}"] = roc_auc_score(y, fed.predict_proba(X)[:, 1])
                row[f"ref_{cohort}"] = roc_auc_score(y, ref.predict_proba(X)[:, 1])
            row.update(diff_test=row["fed_test"] - row["ref_test"], fed_C=fed.C_, ref_C=ref.C_,
                       fed_gamma=round(fed.gamma_, 4), ref_gamma=round(ref.gamma_, 4), rounds=fed.n_rounds_,
                       mb_per_site=max(fed.bytes_sent_.values()) / 1e6, seconds=round(secs, 2))
            rows.append(row)
    df = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(f"training cohort {len(fit_rows)} patients, internal test {len(test)}, external {len(ext)}")
    print(df.round(3).to_string(index=False))
    print("\nmean |fed - ref| internal-test AUC per model:")
    print(df.groupby("model")["diff_test"].apply(lambda s: s.abs().mean()).round(3).to_string())


if __name__ == "__main__":
    main()
