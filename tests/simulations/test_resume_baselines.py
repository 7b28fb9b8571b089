"""Pooled and local baselines: per-epoch checkpoints, `--resume`, and the same fusion/report stages as a
federated run, so the comparison covers Table 3 (issue 13)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from server.store import RunStore
from simulations.runner import record_site_exclusions, run_simulation

pytestmark = pytest.mark.slow

# a small fusion analysis: FDL, CR and CRD on one (C, gamma), few random features, 2-fold CV (a site alone
# has about ten training patients)
FUSION = {"variants": False, "C_grid": [1.0], "gamma_factors": [1.0], "n_components": 16}


def _config(cfg, root: Path, mode: str, rounds: int, fusion: bool = True):
    shutil.copytree(cfg.cache_root, root / "cache")
    return cfg.model_copy(update={
        "cache_root": root / "cache", "runs_root": root / "runs",
        "federation": cfg.federation.model_copy(update={"mode": mode, "rounds": rounds}),
        "split": cfg.split.model_copy(update={"cv_folds": 2}),
        "fusion": cfg.fusion.model_copy(update={**FUSION, "enabled": fusion})})


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "models" / "final.npz") as z:
        return {k: z[k] for k in z.files}


def _record(run_dir: Path):
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        rid = str(store.runs()["run_id"].iloc[0])
        return store.runs(), store.stages(rid), store.events(rid), store.rounds(rid)


@pytest.fixture(scope="module")
def pooled_run(tiny_consortium, tmp_path_factory):
    """A pooled run with the fusion analysis and the report (2 epochs)."""
    root = tmp_path_factory.mktemp("pooled")
    cfg = _config(tiny_consortium, root, "pooled", 2)
    return cfg, run_simulation(cfg, run_dir=root / "runs" / "A", prepare=False)


def test_pooled_run_has_epoch_checkpoints_table3_and_report(pooled_run) -> None:
    cfg, run_dir = pooled_run
    runs, stages, _, rounds = _record(run_dir)
    assert runs["status"].iloc[0] == "completed" and runs["mode"].iloc[0] == "pooled"
    done = stages.set_index("name")["status"]
    for stage in ("train:pooled", "signatures:pooled", "evaluate:pooled", "analysis:pooled", "report"):
        assert done[stage] == "completed", stage
    assert rounds.query("stage == 'train:pooled'")["round"].tolist() == [1, 2]
    assert (run_dir / "checkpoints" / "pooled" / "epoch_0002.npz").is_file()
    perf = pd.read_csv(run_dir / "tables" / "table3_performance.csv")
    assert "FDL" in set(perf["model"])
    assert {"training", "internal_test", "external"} <= set(perf["cohort"])
    assert (run_dir / "report.html").is_file() and (run_dir / "models" / "fusion.npz").is_file()
    # this run's fusion scores, not a previous run's, were evaluated: every site scored FDL anew
    for site in ("site_a", "ext"):
        scores = pd.read_csv(Path(cfg.cache_root) / site / "fusion_scores.csv")
        assert scores["fusion_FDL"].between(0, 1).all()


def test_report_command_on_a_pooled_run(pooled_run, tmp_path) -> None:
    from rectalfl import app

    rd = tmp_path / "copy"
    shutil.copytree(pooled_run[1], rd)
    res = CliRunner().invoke(app, ["report", str(rd)])
    assert res.exit_code == 0, res.output
    assert "--resume" not in res.output


def test_pooled_resume_after_a_crash_is_bit_identical(tiny_consortium, tmp_path) -> None:
    cfg = _config(tiny_consortium, tmp_path, "pooled", 3, fusion=False)
    run_a = run_simulation(cfg, run_dir=tmp_path / "runs" / "A", prepare=False)
    run_b = tmp_path / "B"
    shutil.copytree(run_a, run_b)
    # a crash during epoch 2: the epoch left 'running', its checkpoint and everything after it absent
    with sqlite3.connect(run_b / "run.db") as db:
        db.execute("UPDATE rounds SET status='running', finished_at=NULL WHERE round=2")
        db.execute("DELETE FROM rounds WHERE round=3")
        db.execute("UPDATE runs SET status='running', finished_at=NULL")
    for epoch in (2, 3):
        (run_b / "checkpoints" / "pooled" / f"epoch_{epoch:04d}.npz").unlink()
    for d in ("models", "tables"):
        shutil.rmtree(run_b / d)
    run_simulation(cfg, run_dir=run_b, resume=True, prepare=False)
    a, b = _weights(run_a), _weights(run_b)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    runs, _, events, rounds = _record(run_b)
    assert runs["status"].iloc[0] == "completed" and "resumed" in set(events["kind"])
    assert rounds.query("stage == 'train:pooled'")["status"].tolist() == ["completed"] * 3
    sig_a = pd.read_csv(run_a / "tables" / "signature_auc.csv")
    sig_b = pd.read_csv(run_b / "tables" / "signature_auc.csv")
    pd.testing.assert_frame_equal(sig_a, sig_b)


def test_local_run_has_one_analysis_per_site_and_one_table3(tiny_consortium, tmp_path) -> None:
    cfg = _config(tiny_consortium, tmp_path, "local", 1)
    run_dir = run_simulation(cfg, run_dir=tmp_path / "runs" / "L", prepare=False)
    train_sites = [s.name for s in cfg.synth.sites if not s.external]
    _, stages, _, _ = _record(run_dir)
    for site in train_sites:
        assert (run_dir / f"local-{site}" / "tables" / "table3_performance.csv").is_file()
        assert stages.set_index("name").loc[f"analysis:local-{site}", "status"] == "completed"
    perf = pd.read_csv(run_dir / "tables" / "table3_performance.csv")
    assert {f"local-{s}/FDL" for s in train_sites} <= set(perf["model"])  # CR/CRD too where a site's own
    assert {m.split("/")[0] for m in perf["model"]} == {f"local-{s}" for s in train_sites}  # selection allows
    assert set(perf["cohort"]) == {"training", "internal_test", "external"}
    assert (run_dir / "report.html").is_file()
    sig = pd.read_csv(run_dir / "tables" / "signature_auc.csv")
    assert set(sig["model"]) == {f"local-{s}" for s in train_sites}


def test_exclusions_reach_the_run_record_as_counts(tmp_path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "exclusions.csv").write_text(
        "patient_id,timepoint,sequence,scope,rule,code,file,reason\n"
        "P9,,,patient,patient,nonfinite_voxels,images/P9/pre/t2w.nii.gz,4 voxels are NaN\n"
        "P9,,,patient,patient,empty_mask,masks/P9/post/t2w.nii.gz,empty\n"
        "P4,,,patient,patient,dicom_missing_slices,images/P4/pre/dwi,gap\n")
    with RunStore.open_run_dir(tmp_path / "run") as store:
        store.start_run("r", "t", "name: t\n", "d", "pooled", "none", 1, "simulation")
        record_site_exclusions(store, "r", [{"name": "site_x", "cache_dir": str(cache)}])
        ev = store.events("r").query("kind == 'exclusions'")
    assert len(ev) == 1 and ev["site"].iloc[0] == "site_x"
    msg, detail = ev["message"].iloc[0], ev["detail"].iloc[0]
    assert "2 patient(s)" in msg and "patient rule" in msg and "nonfinite_voxels 1" in msg
    assert detail["patients"] == 2 and detail["by_code"]["dicom_missing_slices"] == 1
    assert "P9" not in msg and "P4" not in msg and "P9" not in str(detail)  # counts only, no patient id
