"""``rectalfl compare``: architectures trained by the same federation, compared by the federated statistics."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from shared.stats import delong_test
from simulations.compare import (
    COHORTS,
    compare,
    compare_backbones,
    compare_tables,
    paired_delong,
    parse_backbones,
    run_config,
)


def test_backbone_list_parsing() -> None:
    assert parse_backbones("densenet_tiny, resnet_tiny") == ["densenet_tiny", "resnet_tiny"]
    assert "swin_t_tiny" in parse_backbones("cpu") and "swin_t" not in parse_backbones("cpu")
    assert "convnext_t" in parse_backbones(["full"])
    with pytest.raises(ValueError, match=r"unknown backbone\(s\) \['densenet12'\]; available: densenet121"):
        parse_backbones("densenet12,resnet_tiny")
    with pytest.raises(ValueError, match="listed twice"):
        parse_backbones("resnet_tiny,resnet_tiny")
    with pytest.raises(ValueError, match="unet"):  # the segmentation network is not a response backbone
        parse_backbones("unet")


def test_each_run_differs_from_the_base_only_in_backbone_and_training_seed() -> None:
    from shared.config import parse_config

    base = parse_config({"name": "c", "seed": 11, "train": {"backbone": "densenet_tiny"},
                         "fusion": {"variants": True}})
    a, b = run_config(base, "swin_t_tiny", 0, rounds=3), run_config(base, "swin_t_tiny", 2)
    assert a.train.backbone == "swin_t_tiny" and a.federation.rounds == 3 and not a.fusion.variants
    assert a.seed == b.seed == 11  # same cohort and splits
    assert a.train.seed is None and b.train.seed == 13
    da, db = a.model_dump(), base.model_dump()
    changed = {k for k in da if da[k] != db[k]}
    assert changed == {"name", "train", "federation", "fusion"}


def _sites(rng: np.random.Generator, n_sites: int = 3) -> dict[str, pd.DataFrame]:
    tables = {}
    for i in range(n_sites):
        n = 40 + 7 * i
        y = rng.integers(0, 2, n)
        tables[f"s{i}"] = pd.DataFrame({"patient_id": [f"p{i}_{j}" for j in range(n)],
                                        "split": rng.choice(["train", "test"], n), "label": y,
                                        # scores on the engine's 1e-4 grid, where it is exact
                                        "FDL@a": np.round(np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.2, n),
                                                                  0, 1), 3),
                                        "FDL@b": np.round(np.clip(0.5 + 0.05 * (y - 0.5) + rng.normal(0, 0.2, n),
                                                                  0, 1), 3)})
    return tables


def test_paired_delong_over_sites_equals_the_pooled_test() -> None:
    # min_count=1: no histogram cell is merged, so on-grid scores give the pooled test exactly
    tables = _sites(np.random.default_rng(0))
    res = paired_delong(tables, [("FDL@a", "FDL@b")], sorted(tables), ["test"], min_count=1)[("FDL@a", "FDL@b")]
    pooled = pd.concat(tables.values()).query("split == 'test'")
    ref = delong_test(pooled["label"].to_numpy(), pooled["FDL@a"].to_numpy(), pooled["FDL@b"].to_numpy())
    assert res["auc_a"] == pytest.approx(ref.auc_a, abs=1e-9)
    assert res["auc_b"] == pytest.approx(ref.auc_b, abs=1e-9)
    assert res["p"] == pytest.approx(ref.p, abs=1e-9)
    assert res["note"] == ""


def test_cohort_tables_take_the_internal_test_best_as_the_reference() -> None:
    tables = _sites(np.random.default_rng(1))
    for t in tables.values():  # site s2 plays the external site
        t["split"] = t["split"] if t is not tables["s2"] else "external"
    rows = []
    for run, auc_int, auc_ext in (("a", 0.80, 0.60), ("b", 0.70, 0.75)):
        for cohort, auc in (("internal_test", auc_int), ("external", auc_ext)):
            rows.append({"backbone": run, "family": run, "seed": 0, "run": run, "cohort": cohort, "parameters": 10,
                         "n_pos": 5, "n_neg": 5, "auc": auc, "auc_lo": auc - 0.1, "auc_hi": auc + 0.1,
                         "accuracy": 0.7, "sensitivity": 0.7, "specificity": 0.7, "f1": 0.7,
                         "seconds_per_round": 1.0, "bytes_per_round": 100.0, "rounds": 2, "run_seconds": 5.0,
                         "note": ""})
    out = compare_tables(pd.DataFrame(rows), tables, {"s0": "train", "s1": "train", "s2": "external"}, 1)
    assert set(out) == set(COHORTS)
    for t in out.values():
        assert set(t["reference"]) == {"a"}  # chosen on the internal test, also for the external table
        b = t.set_index("run").loc["b"]
        assert 0 <= b["p_vs_best"] <= 1 and np.isnan(t.set_index("run").loc["a", "p_vs_best"])
    ext = out["external"].set_index("run")
    pooled = tables["s2"]
    ref = delong_test(pooled["label"].to_numpy(), pooled["FDL@b"].to_numpy(), pooled["FDL@a"].to_numpy())
    assert ext.loc["b", "p_vs_best"] == pytest.approx(ref.p, abs=1e-9)
    assert list(out["external"]["run"]) == ["b", "a"]  # ordered by AUC within the cohort


# --------------------------------------------------------------------------- end to end (slow: two federations)


@pytest.fixture(scope="module")
def compared(tiny_consortium, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    # T2W only (two backbones per run instead of four): what is tested is the comparison, not the fusion inputs
    data = tiny_consortium.data.model_copy(update={"sequences": ["t2w"]})
    cfg = tiny_consortium.model_copy(update={"cache_root": root / "cache", "runs_root": root / "runs", "data": data})
    shutil.copytree(tiny_consortium.cache_root, cfg.cache_root)
    target = compare_backbones(cfg, ["densenet_tiny", "convnext_t_tiny"], rounds=2, compare_dir=root / "cmp",
                               prepare=False)
    return cfg, target


@pytest.mark.slow
def test_compare_trains_each_backbone_in_its_own_run(compared) -> None:
    cfg, target = compared
    spec = json.loads((target / "compare.json").read_text())
    assert [r["run"] for r in spec["runs"]] == ["densenet_tiny-s0", "convnext_t_tiny-s0"]
    for r in spec["runs"]:
        run = target / r["run_dir"]
        meta = json.loads((run / "models" / "final.json").read_text())
        assert meta["network"] == r["backbone"] and meta["rounds"] == 2
        with sqlite3.connect(run / "run.db") as db:
            assert db.execute("select status from runs").fetchone()[0] == "completed"
            assert db.execute("select count(*) from rounds where stage='train' and status='completed'"
                              ).fetchone()[0] == 2


@pytest.mark.slow
def test_tables_carry_each_runs_federated_numbers(compared) -> None:
    cfg, target = compared
    for cohort in COHORTS:
        t = pd.read_csv(target / "tables" / f"compare_{cohort}.csv")
        assert sorted(t["backbone"]) == ["convnext_t_tiny", "densenet_tiny"]
        for r in t.itertuples():
            run = target / "runs" / r.run
            perf = pd.read_csv(run / "tables" / "table3_performance.csv").query("model == 'FDL' and cohort == @cohort")
            assert r.auc == pytest.approx(float(perf["auc"].iloc[0]), nan_ok=True)
            assert r.f1 == pytest.approx(float(perf["f1"].iloc[0]), nan_ok=True)
            with sqlite3.connect(run / "run.db") as db:
                rounds = pd.read_sql("select bytes_down + bytes_up as b, seconds from rounds where stage='train'", db)
            assert r.bytes_per_round == pytest.approx(rounds["b"].mean())
            assert r.seconds_per_round == pytest.approx(rounds["seconds"].median())
            assert r.parameters > 0 and r.run_seconds > 0
        refs = t[t["run"] == t["reference"]]
        assert len(refs) == 1 and np.isnan(refs["p_vs_best"].iloc[0])
        other = t[t["run"] != t["reference"]]
        assert other["p_vs_best"].between(0, 1).all()


@pytest.mark.slow
def test_per_patient_scores_stay_in_the_site_caches(compared) -> None:
    cfg, target = compared
    for site in ("site_a", "ext"):
        snap = Path(cfg.cache_root) / site / "compare" / target.name / "densenet_tiny-s0"
        assert (snap / "signatures.csv").is_file() and (snap / "fusion_scores.csv").is_file()
    # nothing the comparison wrote names a patient
    ids = set()
    for site in ("site_a", "site_b", "site_c", "ext"):
        ids |= set(pd.read_csv(Path(cfg.data_root) / site / "patients.csv", dtype=str)["patient_id"])
    for p in list((target / "tables").glob("*.csv")) + [target / "compare.html", target / "compare.json"]:
        text = p.read_text()
        assert not any(re.search(rf"\b{re.escape(i)}\b", text) for i in ids), p


@pytest.mark.slow
def test_compare_html_is_self_contained(compared) -> None:
    _, target = compared
    text = (target / "compare.html").read_text()
    assert (target / "figures" / "auc_ci.png").is_file()
    assert text.count("data:image/png;base64,") == 1
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", text)
    assert "<link" not in text and "<script" not in text
    for name in ("densenet_tiny", "convnext_t_tiny", "Internal test", "External validation", "reference"):
        assert name in text


@pytest.mark.slow
def test_command_continues_a_finished_comparison(compared) -> None:
    cfg, target = compared
    cfg_path = target.parent / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml())
    app = typer.Typer()
    app.command("compare")(compare)
    app.command("noop")(lambda: None)  # a group, as the rectalfl command registers it
    res = CliRunner().invoke(app, ["compare", "--config", str(cfg_path), "--backbones",
                                   "densenet_tiny,convnext_t_tiny", "--rounds", "2", "--out", str(target), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout[res.stdout.index("{"):])
    assert set(info["tables"]) == set(COHORTS)
    runs = json.loads((target / "compare.json").read_text())["runs"]
    assert all(r["reused"] for r in runs)
    assert all(r["seconds"] > 0 for r in runs)  # the first invocation's timings are kept
    assert (pd.read_csv(target / "tables" / "compare_external.csv")["run_seconds"] > 0).all()
    bad = CliRunner().invoke(app, ["compare", "--config", str(cfg_path), "--backbones", "densenet12"])
    assert bad.exit_code == 2 and "available" in bad.output
