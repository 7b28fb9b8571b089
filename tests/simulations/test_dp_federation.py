"""A tiny DP federation end to end on Flower's simulation engine, and the DP pooled baseline.

3 training sites + 1 external, 2 rounds of DP-SGD. site_c's own policy allows the epsilon of one
round but not two: it refuses round 2 and the federation goes on with the other two sites.
Slow (starts Ray), marked ``slow``; CI runs it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.algorithm import SiteAlgorithm
from client.privacy_ledger import PrivacyLedger, batches, epsilon_of
from server.pipeline import simulation_sites
from server.store import RunStore
from simulations.runner import run_simulation

pytestmark = pytest.mark.slow

NOISE = 1.0


def _sizes(cfg, site: dict) -> tuple[dict[str, int], int]:
    algo = SiteAlgorithm(site["name"], Path(site["data_dir"]), Path(site["cache_dir"]), cfg)
    sets = {k: algo.data[k].subset(["train"]) for k in algo.keys}
    return {k: len(d) for k, d in sets.items()}, len(set().union(*(d.patient_ids for d in sets.values())))


def _expected_epsilon(cfg, sizes: dict[str, int], n_patients: int, rounds: int) -> float:
    """Opacus' RDP accountant over the steps a site takes: every backbone, every epoch, ``rounds`` rounds."""
    hist = []
    for n in sizes.values():
        q, steps = batches(n, cfg.train.batch_size)
        hist.append((NOISE, q, rounds * cfg.train.local_epochs * steps))
    return epsilon_of("rdp", hist, 1 / (10 * n_patients))


def _dp_config(tiny_consortium, root: Path, **federation: object):
    base = tiny_consortium.model_copy(update={"cache_root": root / "cache", "runs_root": root / "runs"})
    shutil.copytree(tiny_consortium.cache_root, base.cache_root)
    data = base.model_dump(mode="json")
    data["privacy"].update({"dp": True, "noise_multiplier": NOISE, "max_grad_norm": 1.0})
    data["fusion"]["enabled"] = False
    data["federation"].update(federation)
    from shared.config import parse_config

    return parse_config(data)


@pytest.fixture(scope="module")
def dp_run(tiny_consortium, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpfed")
    cfg = _dp_config(tiny_consortium, root)
    sites, _ = simulation_sites(cfg)
    site_c = next(s for s in sites if s["name"] == "site_c")
    sizes, n = _sizes(cfg, site_c)
    one, two = _expected_epsilon(cfg, sizes, n, 1), _expected_epsilon(cfg, sizes, n, 2)
    budget = round((one + two) / 2, 6)  # enough for round 1, not for round 2
    data = cfg.model_dump(mode="json")
    data["site_policies"] = {"site_c": {"epsilon_budget": budget, "min_cell_count": 3}}
    from shared.config import parse_config

    cfg = parse_config(data)
    run_dir = run_simulation(cfg, run_dir=root / "runs" / "dp", prepare=False)
    return cfg, run_dir, budget, one


def _run_id(run_dir: Path) -> str:
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        return str(store.runs()["run_id"].iloc[0])


def test_the_site_over_budget_refused_round_two_and_the_others_went_on(dp_run) -> None:
    cfg, run_dir, budget, one = dp_run
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        rid = store.runs()["run_id"].iloc[0]
        assert store.runs()["status"].tolist() == ["completed"]
        rounds = store.rounds(rid, "train").set_index("round")
        assert rounds.loc[1, "n_replied"] == 3 and rounds.loc[2, "n_replied"] == 2
        failed = store.events(rid).query("kind == 'site_failed'")
    assert failed["site"].tolist() == ["site_c"] and failed["round"].tolist() == [2]
    reason = failed["message"].iloc[0]
    detail = failed["detail"].iloc[0]
    assert detail["code"] == 4300 and "refused by site policy (epsilon_budget)" in reason
    assert f"budget (policy.epsilon_budget) is {budget:g}" in reason and f"spent {one:.4g}" in reason
    audit = [json.loads(x) for x in (Path(cfg.cache_root) / "site_c" / "audit.jsonl").read_text().splitlines()]
    refused = [a for a in audit if a.get("policy_rule") == "epsilon_budget"]
    assert len(refused) == 1 and refused[0]["server_round"] == 2 and refused[0]["bytes_out"] == 0


def test_each_sites_epsilon_equals_opacus_accountant_over_its_steps(dp_run) -> None:
    cfg, run_dir, _, _ = dp_run
    ledger = pd.read_csv(run_dir / "tables" / "privacy_ledger.csv").set_index("site")
    assert sorted(ledger.index) == ["site_a", "site_b", "site_c"]  # the external site never trained
    sites, _ = simulation_sites(cfg)
    rid = _run_id(run_dir)
    for s in sites[:3]:
        rounds = 1 if s["name"] == "site_c" else 2
        sizes, n = _sizes(cfg, s)
        row = ledger.loc[s["name"]]
        assert row["rounds"] == rounds and row["stage"] == "train" and row["accountant"] == "rdp"
        assert row["delta"] == pytest.approx(1 / (10 * n)) and row["noise_multiplier"] == NOISE
        assert row["epsilon"] == pytest.approx(_expected_epsilon(cfg, sizes, n, rounds), abs=1e-6)
        own = PrivacyLedger.open(Path(s["cache_dir"]), rid, s["name"])  # the site's file agrees
        assert own.epsilon("train") == pytest.approx(row["epsilon"], abs=1e-9)
        assert [r["round"] for r in own.stage("train")["rounds"]] == list(range(1, rounds + 1))


def test_training_replies_carried_epsilon_and_no_loss(dp_run) -> None:
    _, run_dir, _, _ = dp_run
    rid = _run_id(run_dir)
    with RunStore.open_run_dir(run_dir, readonly=True) as store:
        m = store.metrics(rid, "train")
    eps = m[m["key"] == "epsilon"]
    assert len(eps) == 5  # site_a, site_b: 2 rounds; site_c: 1
    for _, g in eps.groupby("site"):
        assert g.sort_values("round")["value"].is_monotonic_increasing
    assert not m["key"].str.endswith("train-loss").any()  # a loss is a statistic DP does not cover


def test_every_side_used_the_groupnorm_network(dp_run) -> None:
    _, run_dir, _, _ = dp_run
    with np.load(run_dir / "models" / "final.npz") as z:
        names = z.files
    assert names and not any("running_mean" in k or "running_var" in k for k in names)
    meta = json.loads((run_dir / "models" / "final.json").read_text())
    assert meta["privacy"]["dp"] is True
    assert meta["architecture_change"].startswith("BatchNorm2d -> GroupNorm in")
    auc = pd.read_csv(run_dir / "tables" / "signature_auc.csv")
    assert auc["auc"].notna().any()  # signatures were computed with the DP network on every site


def test_dashboard_shows_each_sites_epsilon(dp_run) -> None:
    from server.dashboard.data import find_run, run_detail

    _, run_dir, _, _ = dp_run
    rid = _run_id(run_dir)
    detail = run_detail(find_run(run_dir.parent, rid), run_dir.parent, series=False)
    shown = {s["site"]: s["epsilon"] for s in detail["sites"]}
    ledger = pd.read_csv(run_dir / "tables" / "privacy_ledger.csv").set_index("site")["epsilon"]
    for site, eps in ledger.items():
        assert shown[site] == pytest.approx(eps)
    assert shown["ext"] is None


def test_pooled_baseline_applies_the_same_dp_with_one_accountant(tiny_consortium, tmp_path: Path) -> None:
    cfg = _dp_config(tiny_consortium, tmp_path, mode="pooled")
    run_dir = run_simulation(cfg, run_dir=tmp_path / "runs" / "pooled", prepare=False)
    ledger = pd.read_csv(run_dir / "tables" / "privacy_ledger.csv")
    assert ledger["site"].tolist() == ["site_a+site_b+site_c"] and ledger["stage"].tolist() == ["train:pooled"]
    sites, _ = simulation_sites(cfg)
    parts = [_sizes(cfg, s) for s in sites[:3]]
    sizes = {k: sum(p[0][k] for p in parts) for k in parts[0][0]}
    n = sum(p[1] for p in parts)
    pooled = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 1})})
    pooled = pooled.model_copy(update={"train": cfg.train.model_copy(
        update={"local_epochs": cfg.federation.rounds * cfg.train.local_epochs})})
    assert ledger["delta"].iloc[0] == pytest.approx(1 / (10 * n))
    assert ledger["epsilon"].iloc[0] == pytest.approx(_expected_epsilon(pooled, sizes, n, 1), abs=1e-6)
    meta = json.loads((run_dir / "models" / "final.json").read_text())
    assert meta["privacy"]["dp"] is True and "GroupNorm" in meta["architecture_change"]
