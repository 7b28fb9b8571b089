"""End to end on Flower's simulation engine: a real federation of 3 training sites + 1 external site.

Slow (each federation starts Ray), marked ``slow``; CI runs them.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.algorithm import SiteAlgorithm
from client.train import initial_states, mean_loss, models_from_states
from server.pipeline import simulation_sites
from server.store import RunStore
from shared.models import signature_keys
from shared.records import unflatten_states
from simulations.runner import run_simulation
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def _copy_consortium(cfg, root: Path, **overrides: object):
    """The session's consortium with its own cache and runs folder (and config ``overrides``, dotted)."""
    new = tiny_config(Path(cfg.data_root).parent, **overrides)
    new = new.model_copy(update={"cache_root": root / "cache", "runs_root": root / "runs"})
    shutil.copytree(cfg.cache_root, new.cache_root)
    return new


def _final_states(run_dir: Path, like):
    with np.load(run_dir / "models" / "final.npz") as z:
        return unflatten_states({k: z[k] for k in z.files}, like)


@pytest.fixture(scope="module")
def fed_run(tiny_consortium, tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    # FDL, CR and CRD only: the variants are the same fitting code (tests/simulations/fusion cover them)
    cfg = _copy_consortium(tiny_consortium, root, **{"fusion.variants": False})
    run_dir = run_simulation(cfg, run_dir=root / "runs" / "A", prepare=False)
    return cfg, run_dir


def test_run_record_is_complete(fed_run) -> None:
    cfg, run_dir = fed_run
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        runs = store.runs()
        assert runs["status"].tolist() == ["completed"]
        rid = runs["run_id"].iloc[0]
        rounds = store.rounds(rid)
        assert rounds["round"].tolist() == [1, 2] and set(rounds["status"]) == {"completed"}
        assert (rounds["n_replied"] == 3).all() and (rounds["bytes_up"] > 0).all()
        stages = store.stages(rid)
        assert {"discover", "train", "signatures", "evaluate"} <= set(stages["name"])
        joined = store.events(rid).query("kind == 'site_joined'")["site"].tolist()
        assert sorted(joined) == ["ext", "site_a", "site_b", "site_c"]
    assert (run_dir / "checkpoints" / "round_0002.npz").is_file()
    meta = json.loads((run_dir / "models" / "final.json").read_text())
    assert meta["network"] == "densenet_tiny" and meta["slice_size"] == 32 and meta["config_digest"] == cfg.digest()


def test_weights_changed_and_training_loss_fell(fed_run) -> None:
    cfg, run_dir = fed_run
    init = initial_states(cfg)
    final = _final_states(run_dir, init)
    changed = [k for k in init for n, t in init[k].items() if t.is_floating_point() and not np.allclose(t, final[k][n])]
    assert set(changed) == set(init), "every backbone's weights must have moved"
    sites, _ = simulation_sites(cfg)
    before, after = [], []
    for s in sites[:3]:
        algo = SiteAlgorithm(s["name"], Path(s["data_dir"]), Path(s["cache_dir"]), cfg)
        m0, m1 = models_from_states(cfg, init), models_from_states(cfg, final)
        for key in algo.keys:
            data = algo.data[key].subset(["train"])
            before.append(mean_loss(m0[key], data))
            after.append(mean_loss(m1[key], data))
    assert np.mean(after) < np.mean(before)


def test_external_site_received_no_training_message(fed_run) -> None:
    cfg, run_dir = fed_run
    audit = [json.loads(x) for x in (Path(cfg.cache_root) / "ext" / "audit.jsonl").read_text().splitlines()]
    kinds = {a["message_type"] for a in audit}
    assert "train" not in kinds
    assert {"query.describe", "evaluate.signatures", "evaluate.stats"} <= kinds
    train_audit = (Path(cfg.cache_root) / "site_a" / "audit.jsonl").read_text()
    assert train_audit.count('"message_type": "train"') == 2


def test_signature_auc_table_covers_every_backbone_and_cohort(fed_run) -> None:
    cfg, run_dir = fed_run
    table = pd.read_csv(run_dir / "tables" / "signature_auc.csv")
    assert set(table["backbone"]) == {"pre_t2w", "pre_dwi", "post_t2w", "post_dwi"}
    assert {"site_a", "site_b", "site_c", "ext", "pooled (training sites)"} <= set(table["site"])
    ok = table.dropna(subset=["auc"])
    assert len(ok) == len(table)
    assert ((ok["auc"] >= 0) & (ok["auc"] <= 1) & (ok["lo"] <= ok["auc"]) & (ok["auc"] <= ok["hi"])).all()
    pooled = table[table["site"] == "pooled (training sites)"]
    per_site = table[table["site"].isin(["site_a", "site_b", "site_c"])]
    assert pooled["n_pos"].sum() == per_site["n_pos"].sum()  # pooled counts are the union of sites


def test_resume_after_a_crash_gives_the_same_final_weights(fed_run, tmp_path) -> None:
    cfg, run_a = fed_run
    run_b = tmp_path / "B"
    shutil.copytree(run_a, run_b)
    # Simulate a crash during round 2: the round is left 'running', its checkpoint and later outputs absent.
    with sqlite3.connect(run_b / "run.db") as db:
        db.execute("UPDATE rounds SET status='running', finished_at=NULL WHERE round=2")
        db.execute("UPDATE runs SET status='running', finished_at=NULL")
    (run_b / "checkpoints" / "round_0002.npz").unlink()
    shutil.rmtree(run_b / "models")
    shutil.rmtree(run_b / "tables")
    run_simulation(cfg, run_dir=run_b, resume=True, prepare=False)
    like = initial_states(cfg)
    a, b = _final_states(run_a, like), _final_states(run_b, like)
    for key in a:
        for name in a[key]:
            assert np.array_equal(a[key][name].numpy(), b[key][name].numpy()), f"{key}/{name} differs"
    with RunStore.open_run_dir(run_b, readonly=True) as store:
        rid = store.runs()["run_id"].iloc[0]
        assert store.runs()["status"].iloc[0] == "completed"
        assert "resumed" in set(store.events(rid)["kind"])


def test_a_failing_site_is_recorded_and_the_round_goes_on(tiny_consortium, tmp_path) -> None:
    cfg = _copy_consortium(tiny_consortium, tmp_path, **{"fusion.enabled": False})  # training and evaluation only
    (Path(cfg.cache_root) / "site_c" / "manifest.csv").write_text("this is not a manifest\n\x00\x01")
    run_dir = run_simulation(cfg, run_dir=tmp_path / "runs" / "F", prepare=False)
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        rid = store.runs()["run_id"].iloc[0]
        assert store.runs()["status"].iloc[0] == "completed"
        failed = store.events(rid).query("kind == 'site_failed'")
        assert "site_c" in set(failed["site"]) and failed["message"].str.contains("site_c").all()
        rounds = store.rounds(rid)
        assert (rounds["n_replied"] == 2).all() and (rounds["n_failed"] == 1).all()
    table = pd.read_csv(run_dir / "tables" / "signature_auc.csv")
    pooled = table[table["site"] == "pooled (training sites)"]
    assert pooled["auc"].notna().all() and pooled["note"].str.contains("without site_c").all()


def test_fusion_analysis_runs_over_flower(fed_run) -> None:
    """The analysis stage ran through real Flower messages: tables, fusion models, scores kept on site."""
    cfg, run_dir = fed_run
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        stages = store.stages(store.runs()["run_id"].iloc[0])
        assert stages.set_index("name").loc["analysis", "status"] == "completed"
    perf = pd.read_csv(run_dir / "tables" / "table3_performance.csv")
    assert "FDL" in set(perf["model"]) and {"training", "internal_test", "external"} <= set(perf["cohort"])
    fits = pd.read_csv(run_dir / "tables" / "fusion_models.csv").set_index("model")
    assert fits.loc["FDL", "C"] in cfg.fusion.C_grid and fits.loc["FDL", "rounds"] > 2
    assert (run_dir / "models" / "fusion.npz").is_file()
    for site in ("site_a", "ext"):
        scores = pd.read_csv(Path(cfg.cache_root) / site / "fusion_scores.csv")
        assert scores["fusion_FDL"].between(0, 1).all()
    audit = [json.loads(x) for x in (Path(cfg.cache_root) / "ext" / "audit.jsonl").read_text().splitlines()]
    assert any(e["message_type"] == "evaluate.fusion" for e in audit)


def test_securely_aggregated_updates_give_the_fedavg_model(fed_run, tmp_path) -> None:
    """federation.secure_aggregation: the server reads only the weighted sum of the sites' masked updates;
    the final model equals the plain run's (to the 2**-24 fixed point), and the sites' replies were masked."""
    cfg, run_a = fed_run
    sec = _copy_consortium(cfg, tmp_path, **{"fusion.enabled": False, "federation.secure_aggregation": True})
    run_s = run_simulation(sec, run_dir=tmp_path / "runs" / "S", prepare=False)
    like = initial_states(cfg)
    a, s = _final_states(run_a, like), _final_states(run_s, like)
    worst = max(float(np.max(np.abs(a[k][n].double().numpy() - s[k][n].double().numpy()))) for k in a for n in a[k])
    print(f"secure vs plain final weights: max |difference| {worst:.2e}")
    assert worst < 1e-4, worst
    with RunStore.open_run_dir(run_s, readonly=True) as store:
        rid = store.runs()["run_id"].iloc[0]
        assert store.runs()["status"].iloc[0] == "completed"
        events = store.events(rid)
        assert "secure_aggregation" in set(events["kind"]) and "update_rejected" not in set(events["kind"])
        assert (store.rounds(rid)["n_replied"] == 3).all()
    audit = [json.loads(x) for x in (Path(sec.cache_root) / "site_a" / "audit.jsonl").read_text().splitlines()]
    kinds = [a["message_type"] for a in audit if a.get("run_id") == rid]  # (the copied cache holds run A's too)
    assert kinds.count("train.secagg") == 2 and kinds.count("train") == 2
    assert not (Path(sec.cache_root) / "ext" / "secagg" / "updates.json").exists()
    assert (Path(sec.cache_root) / "site_a" / "secagg" / "updates.json").is_file()


def test_a_site_requiring_secure_updates_refuses_a_plain_round(fed_run, tmp_path) -> None:
    cfg, _ = fed_run
    new = _copy_consortium(cfg, tmp_path, **{"fusion.enabled": False, "federation.rounds": 1,
                                             "site_policies": {"site_c": {"secure_updates": True}}})
    run_dir = run_simulation(new, run_dir=tmp_path / "runs" / "P", prepare=False)
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        rid = store.runs()["run_id"].iloc[0]
        failed = store.events(rid).query("kind == 'site_failed'")
        assert set(failed["site"]) == {"site_c"}
        assert failed["message"].str.contains(r"secure_updates.*federation.secure_aggregation: true").all()
        assert store.rounds(rid)["n_replied"].tolist() == [2]


def test_site_kept_state_fedbn_momentum_and_steps_over_flower(fed_run, tmp_path) -> None:
    """norm_stats: local + keep_optimizer_state + local_steps with FedAvgM, through Flower: every training
    site keeps its own BatchNorm statistics and SGD momentum in its cache (they differ between sites and
    from the averaged model's), makes exactly local_steps steps a round, and the external site, which
    never trained, re-estimates its statistics on its own images and still gets its signatures."""
    cfg, _ = fed_run
    c = _copy_consortium(cfg, tmp_path, **{"fusion.enabled": False, "federation.norm_stats": "local",
                                           "federation.strategy": "fedavgm", "train.keep_optimizer_state": True,
                                           "train.local_steps": 3})
    run_dir = run_simulation(c, run_dir=tmp_path / "runs" / "B", prepare=False)
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        rid = store.runs()["run_id"].iloc[0]
        assert store.runs()["status"].iloc[0] == "completed"
        steps = store.metrics(rid, stage="train")
        steps = steps[steps["key"].str.endswith("/steps")]
        assert len(steps) and set(steps["value"]) == {3.0}
    with np.load(run_dir / "models" / "final.npz") as z:
        averaged = {k: z[k] for k in z.files if k.endswith("running_mean")}
    kept = {}
    for site in ("site_a", "site_b", "site_c"):
        state = Path(c.cache_root) / site / "run_state" / rid
        with np.load(state / "norm_stats.npz") as z:
            kept[site] = {k: z[k] for k in z.files if k.endswith("running_mean")}
        assert set(kept[site]) == set(averaged)
        assert sorted(p.stem for p in (state / "optimizer").glob("*.pt")) == sorted(signature_keys(c))
    key = sorted(averaged)[0]
    assert not np.allclose(kept["site_a"][key], kept["site_b"][key])  # each site's own images
    assert not np.allclose(kept["site_a"][key], averaged[key])
    assert not (Path(c.cache_root) / "ext" / "run_state").exists()  # external: re-estimated, nothing kept
    sig = pd.read_csv(Path(c.cache_root) / "ext" / "signatures.csv")
    assert len(sig) and sig[signature_keys(c)].notna().all().all()


def test_a_broken_model_gives_a_clear_error_not_empty_signatures(fed_run, tmp_path) -> None:
    """A global model whose outputs are not finite (a running variance below zero, as a server optimiser
    that stepped the buffers once made) is refused at the signatures stage, naming site and backbone."""
    cfg, run_dir = fed_run
    final = _final_states(run_dir, initial_states(cfg))
    key = sorted(final)[0]
    name = next(n for n in final[key] if n.endswith("running_var"))
    final[key][name] = -final[key][name].abs() - 0.1
    sites, _ = simulation_sites(cfg)
    s = sites[0]
    cache = tmp_path / "cache"
    shutil.copytree(s["cache_dir"], cache)
    algo = SiteAlgorithm(s["name"], Path(s["data_dir"]), cache, cfg)
    with pytest.raises(ValueError, match=rf"site {s['name']}: backbone {key} gives non-finite outputs"):
        algo.signatures(final)
