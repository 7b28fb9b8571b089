"""Differential privacy on site: the DP network, per-sample clipping, the persisted ledger, the budget.

Tiny networks at 32 px on CPU; the cross-process test starts one fresh Python process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from client.privacy_ledger import PrivacyLedger, batches, calibrate_noise, epsilon_of, make_accountant
from client.stats_service import PolicyRefusal
from client.train import SliceSet, train_backbone, train_backbone_dp
from shared.config import PrivacyConfig, TrainConfig, parse_config
from shared.models import build_model, dp_compatible, initial_states, models_from_states

ROOT = Path(__file__).resolve().parents[2]


S = 32
"""Slice side: at 16 px densenet_tiny's last GroupNorm sees 1x1 maps of one channel per group, which
torch refuses for a batch of one (a Poisson batch can hold one case; torch.func works case by case)."""


def _data(n: int = 12, size: int = S, seed: int = 0) -> SliceSet:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float32)
    x = rng.normal(0.3, 0.05, (n, 1, size, size)).astype(np.float32)
    x[y == 1, :, size // 4: 3 * size // 4, size // 4: 3 * size // 4] += 0.5
    return SliceSet("pre_t2w", x.clip(0, 1), y, [f"P{i}" for i in range(n)], np.array(["train"] * n, dtype=object))


def _dp_cfg(**privacy: object):
    return parse_config({"data": {"sequences": ["t2w"], "timepoints": ["pre", "post"]},
                         "preprocess": {"slice_size": 32}, "train": {"backbone": "densenet_tiny"},
                         "privacy": {"dp": True, "noise_multiplier": 1.0, **privacy}})


# --------------------------------------------------------------------------- the network


def test_batchnorm_becomes_groupnorm_identically_on_every_side() -> None:
    cfg = _dp_cfg()
    server = initial_states(cfg)
    site = initial_states(cfg)  # another process would compute the same: seeded build + deterministic fix
    for key in server:
        assert list(server[key]) == list(site[key])
        assert all(torch.equal(server[key][k], site[key][k]) for k in server[key])
        assert not any("running_mean" in k or "num_batches_tracked" in k for k in server[key])
    models = models_from_states(cfg, server)  # the site loads the server's weights into the same network
    net = models["pre_t2w"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in net.modules())
    plain = initial_states(cfg.model_copy(update={"privacy": PrivacyConfig()}))
    assert any("running_mean" in k for k in plain["pre_t2w"])  # without DP the network keeps BatchNorm
    _, changes = dp_compatible(build_model("densenet_tiny", 32))
    assert changes and all("BatchNorm2d" in c and "GroupNorm" in c for c in changes)


class OddNorm(nn.BatchNorm2d):
    """A BatchNorm subclass: Opacus' fixer matches exact types only, so it is left in place."""


def _odd_network(size: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), OddNorm(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))


def test_a_batchnorm_subclass_opacus_does_not_fix_is_refused() -> None:
    net = _odd_network(16)
    with pytest.raises(ValueError, match=r"layer 1 \(OddNorm\) normalises over the batch"):
        dp_compatible(net)


def test_dp_training_refuses_a_network_with_batchnorm() -> None:
    led = PrivacyLedger.in_memory("s")
    plan = led.plan("train", PrivacyConfig(dp=True, noise_multiplier=1.0), {"pre_t2w": 12}, 12, batch_size=4,
                    epochs=1, planned_rounds=1)
    with pytest.raises(ValueError, match="without BatchNorm"):
        train_backbone(build_model("densenet_tiny", S), _data(), TrainConfig(batch_size=4), epochs=1, seed=0,
                       dp=plan.for_backbone("pre_t2w", 1))


# --------------------------------------------------------------------------- clipping and noise


@pytest.mark.parametrize("backbone", ["densenet_tiny", "resnet_tiny"])  # Opacus hooks / torch.func engine
def test_no_sample_gradient_exceeds_the_clipping_bound(backbone: str) -> None:
    """Recover each sample's clipping factor from what Opacus summed; every clipped gradient has norm <= C."""
    clip = 0.05
    data = _data(12)
    led = PrivacyLedger.in_memory("s")
    plan = led.plan("train", PrivacyConfig(dp=True, noise_multiplier=1.0, max_grad_norm=clip), {"pre_t2w": 12}, 12,
                    batch_size=6, epochs=2, planned_rounds=1)
    net, _ = dp_compatible(build_model(backbone, S, seed=0))
    seen: list[dict[str, float]] = []

    def check(model: nn.Module) -> None:
        ps = [p for p in model.parameters() if p.requires_grad]
        g = torch.cat([p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in ps], 1).double()  # (B, D) raw
        if g.shape[0] == 0:
            return
        summed = torch.cat([p.summed_grad.reshape(-1) for p in ps]).double()  # sum of the clipped gradients
        factors = torch.linalg.lstsq(g.T, summed.unsqueeze(1)).solution.squeeze(1)  # summed = sum_j c_j g_j
        assert torch.allclose(g.T @ factors, summed, rtol=1e-4, atol=1e-7)
        norms = g.norm(dim=1)
        clipped = (factors * norms).abs()
        noisy = torch.cat([p.grad.reshape(-1) for p in ps]).double()
        seen.append({"raw": float(norms.max()), "clipped": float(clipped.max()),
                     "noise": float((noisy * plan.for_backbone("pre_t2w", 2).sample_rate * 12 - summed).norm())})

    train_backbone_dp(net, data, TrainConfig(batch_size=6, lr=0.05), epochs=2, seed=0,
                      dp=plan.for_backbone("pre_t2w", 2), on_step=check)
    assert seen, "no non-empty Poisson batch"
    assert max(s["raw"] for s in seen) > 5 * clip  # the gradients were larger than the bound ...
    assert max(s["clipped"] for s in seen) <= clip * (1 + 1e-4)  # ... and no clipped one exceeds it
    assert min(s["noise"] for s in seen) > 0.1 * clip  # noise was added on top of the clipped sum


def test_dp_training_is_repeatable_from_the_site_secret_only() -> None:
    data = _data(12)

    def run(ledger: PrivacyLedger) -> OrderedDict:
        plan = ledger.plan("train", PrivacyConfig(dp=True, noise_multiplier=1.0), {"pre_t2w": 12}, 12, batch_size=4,
                           epochs=1, planned_rounds=1)
        net, _ = dp_compatible(build_model("densenet_tiny", S, seed=0))
        train_backbone(net, data, TrainConfig(batch_size=4), epochs=1, seed=3, dp=plan.for_backbone("pre_t2w", 1))
        return OrderedDict(net.state_dict())

    a_led = PrivacyLedger.in_memory("s")
    b_led = PrivacyLedger.in_memory("s")
    b_led.data["secret"] = a_led.secret
    c_led = PrivacyLedger.in_memory("s")  # same run seed, another secret: other noise and batches
    a, b, c = run(a_led), run(b_led), run(c_led)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------- the ledger across processes

_ROUND = """
import json, sys
import numpy as np
from client.privacy_ledger import PrivacyLedger
from client.train import SliceSet, train_backbone, train_backbone_dp
from shared.config import PrivacyConfig, TrainConfig
from shared.models import build_model, dp_compatible
cache, rnd = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
x = rng.random((10, 1, 32, 32)).astype(np.float32)
y = (np.arange(10) % 2).astype(np.float32)
data = SliceSet("pre_t2w", x, y, [f"P{i}" for i in range(10)], np.array(["train"] * 10, dtype=object))
ledger = PrivacyLedger.open(cache, "run-42", "site_a")
plan = ledger.plan("train", PrivacyConfig(dp=True, noise_multiplier=1.3, accountant=sys.argv[3]),
                   {"pre_t2w": 10, "post_t2w": 10}, 10, batch_size=4, epochs=2, planned_rounds=5)
for key in ("pre_t2w", "post_t2w"):
    net, _ = dp_compatible(build_model("densenet_tiny", 32, seed=0))
    train_backbone(net, data, TrainConfig(batch_size=4), epochs=2, seed=rnd, dp=plan.for_backbone(key, 2))
print(json.dumps(ledger.commit(plan, rnd)))
"""


def _round_in_new_process(cache: Path, rnd: int, accountant: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _ROUND, str(cache), str(rnd), accountant], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ledger_survives_processes_and_equals_opacus_accountant(tmp_path: Path) -> None:
    first = _round_in_new_process(tmp_path, 1, "rdp")
    path = PrivacyLedger.file_for(tmp_path, "run-42")
    assert path.is_file() and (path.stat().st_mode & 0o777) == 0o600
    second = _round_in_new_process(tmp_path, 2, "rdp")  # a fresh process reloads and continues
    q, steps = batches(10, 4)  # 10 cases, batch 4: 3 steps per epoch at sample rate 1/3
    total = 2 * 2 * 2 * steps  # rounds x backbones x epochs x steps
    ref = make_accountant("rdp")
    for _ in range(total):
        ref.step(noise_multiplier=1.3, sample_rate=q)
    delta = 1 / (10 * 10)
    assert second["dp-steps"] == total and second["dp-rounds"] == 2
    assert second["epsilon"] == pytest.approx(ref.get_epsilon(delta=delta), abs=1e-6)
    assert first["epsilon"] < second["epsilon"]
    half = make_accountant("rdp", [(1.3, q, total // 2)])
    assert first["epsilon"] == pytest.approx(half.get_epsilon(delta=delta), abs=1e-6)
    saved = json.loads(path.read_text())
    assert [r["round"] for r in saved["stages"]["train"]["rounds"]] == [1, 2]
    assert saved["stages"]["train"]["delta"] == pytest.approx(delta)


def test_prv_accountant_continues_the_same_way(tmp_path: Path) -> None:
    led = PrivacyLedger.open(tmp_path, "r", "s")
    plan = led.plan("train", PrivacyConfig(dp=True, noise_multiplier=1.0, accountant="prv"), {"a": 20}, 20,
                    batch_size=5, epochs=1, planned_rounds=3)
    for _ in range(plan.steps["a"]):
        plan.accountant.step(noise_multiplier=1.0, sample_rate=plan.sample_rates["a"])
    led.commit(plan, 1)
    again = PrivacyLedger.open(tmp_path, "r", "s")
    plan2 = again.plan("train", PrivacyConfig(dp=True, noise_multiplier=1.0, accountant="prv"), {"a": 20}, 20,
                       batch_size=5, epochs=1, planned_rounds=3)
    for _ in range(plan2.steps["a"]):
        plan2.accountant.step(noise_multiplier=1.0, sample_rate=plan2.sample_rates["a"])
    m = again.commit(plan2, 2)
    ref = make_accountant("prv", [(1.0, 0.25, 8)])
    assert m["epsilon"] == pytest.approx(ref.get_epsilon(delta=1 / 200), abs=1e-6)


def test_stages_compose_into_the_site_total(tmp_path: Path) -> None:
    led = PrivacyLedger.open(tmp_path, "r", "s")
    for stage in ("train", "train-segmentation"):
        plan = led.plan(stage, PrivacyConfig(dp=True, noise_multiplier=1.0), {"a": 20}, 20, batch_size=5, epochs=1,
                        planned_rounds=1)
        for _ in range(4):
            plan.accountant.step(noise_multiplier=1.0, sample_rate=0.25)
        led.commit(plan, 1)
    one = led.epsilon("train")
    assert led.epsilon("train-segmentation") == pytest.approx(one)
    assert led.epsilon() == pytest.approx(epsilon_of("rdp", [(1.0, 0.25, 8)], 1 / 200))
    assert led.epsilon() > one


def test_settings_cannot_change_within_a_run(tmp_path: Path) -> None:
    led = PrivacyLedger.open(tmp_path, "r", "s")
    led.commit(led.plan("train", PrivacyConfig(dp=True, noise_multiplier=1.0), {"a": 20}, 20, batch_size=5,
                        epochs=1, planned_rounds=1), 1)
    again = PrivacyLedger.open(tmp_path, "r", "s")
    with pytest.raises(ValueError, match=r"changed since its first train round \(noise_multiplier 1.0 -> 0.5\)"):
        again.plan("train", PrivacyConfig(dp=True, noise_multiplier=0.5), {"a": 20}, 20, batch_size=5, epochs=1,
                   planned_rounds=1)


def test_delta_must_be_below_one_over_n() -> None:
    led = PrivacyLedger.in_memory("site_b")
    with pytest.raises(ValueError, match=r"site site_b: privacy.delta 0.1 is not below 1/n = 0.05 for its 20"):
        led.plan("train", PrivacyConfig(dp=True, noise_multiplier=1.0, delta=0.1), {"a": 20}, 20, batch_size=5,
                 epochs=1, planned_rounds=1)
    plan = led.plan("train", PrivacyConfig(dp=True, noise_multiplier=1.0, delta=1e-4), {"a": 20}, 20, batch_size=5,
                    epochs=1, planned_rounds=1)
    assert plan.delta == 1e-4


def test_target_epsilon_calibrates_the_noise_over_the_planned_rounds() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    led = PrivacyLedger.in_memory("s")
    plan = led.plan("train", PrivacyConfig(dp=True, target_epsilon=3.0), {"a": 40, "b": 40}, 40, batch_size=8,
                    epochs=2, planned_rounds=10)
    q, steps = batches(40, 8)
    planned = [(plan.noise_multiplier, q, 10 * 2 * steps)] * 2  # both backbones, all planned rounds
    eps = epsilon_of("rdp", planned, 1 / 400)
    assert 3.0 - 0.011 <= eps <= 3.0
    # with one backbone this is Opacus' own calibration
    ours = calibrate_noise(3.0, 1 / 400, [(q, 10 * 2 * steps)], "rdp")
    assert ours == pytest.approx(get_noise_multiplier(target_epsilon=3.0, target_delta=1 / 400, sample_rate=q,
                                                      steps=10 * 2 * steps, accountant="rdp"), rel=1e-9)


# --------------------------------------------------------------------------- the budget


def test_a_round_over_the_budget_is_refused_naming_budget_spent_and_cost(tmp_path: Path) -> None:
    led = PrivacyLedger.open(tmp_path, "run-7", "site_c")
    cfg = PrivacyConfig(dp=True, noise_multiplier=1.0)
    plan = led.plan("train", cfg, {"a": 20}, 20, batch_size=5, epochs=1, planned_rounds=5)
    spent, after = led.check_budget(plan, 100.0)
    assert spent == 0.0 and after > 0
    for _ in range(plan.steps["a"]):
        plan.accountant.step(noise_multiplier=1.0, sample_rate=plan.sample_rates["a"])
    led.commit(plan, 1)
    one = led.epsilon()
    plan2 = led.plan("train", cfg, {"a": 20}, 20, batch_size=5, epochs=1, planned_rounds=5)
    two = epsilon_of("rdp", [(1.0, 0.25, 8)], 1 / 200)
    budget = (one + two) / 2
    with pytest.raises(PolicyRefusal) as err:
        led.check_budget(plan2, budget)
    msg = str(err.value)
    assert err.value.rule == "epsilon_budget" and "refused by site policy (epsilon_budget)" in msg
    assert f"{budget:g}" in msg and f"spent {one:.4g}" in msg and f"{two - one:.4g} more" in msg
    assert led.epsilon() == pytest.approx(one)  # a refused round spends nothing
    assert led.check_budget(plan2, two + 1e-9)[1] == pytest.approx(two)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(("privacy", "message"), [
    ({"dp": True}, "neither privacy.noise_multiplier"),
    ({"dp": True, "noise_multiplier": 1.0, "target_epsilon": 8}, "both set"),
    ({"dp": True, "noise_multiplier": 1.0, "delta": None}, "privacy.delta is missing"),
    ({"dp": True, "noise_multiplier": 1.0, "delta": 1.5}, "number in \\(0, 1\\)"),
    ({"dp": True, "noise_multiplier": 1.0, "delta": "tiny"}, "'auto' or a number"),
    ({"dp": True, "noise_multiplier": 0}, "privacy.noise_multiplier = 0"),
    ({"dp": True, "noise_multiplier": 1.0, "accountant": "gdp"}, "'rdp' or 'prv'"),
    ({"dp_noise_multiplier": 1.0}, "privacy.dp_noise_multiplier is now privacy.noise_multiplier"),
])
def test_dp_settings_are_checked_when_the_config_loads(privacy: dict, message: str) -> None:
    from shared.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_config({"privacy": privacy})


def test_delta_given_as_text_and_dp_off_settings_are_accepted() -> None:
    assert parse_config({"privacy": {"dp": True, "target_epsilon": 8, "delta": "1e-5"}}).privacy.delta == 1e-5
    assert parse_config({"privacy": {"dp": False}}).privacy.noise_multiplier is None


def test_a_network_opacus_cannot_fix_is_refused_by_config_validate(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import shared.config
    import shared.models as models
    from rectalfl import app

    monkeypatch.setitem(shared.config.BACKBONES, "oddnet_test", None)  # known to the schema, like every registry name
    monkeypatch.setitem(models._REGISTRY, "oddnet_test",
                        models.ModelSpec("oddnet_test", "classification", "test", _odd_network))
    models.dp_network_changes.cache_clear()
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {backbone: oddnet_test}\nprivacy: {dp: true, noise_multiplier: 1.0}\n")
    good = tmp_path / "good.yaml"
    good.write_text("train: {backbone: densenet_tiny}\nprivacy: {dp: true, target_epsilon: 8}\n")
    res = CliRunner().invoke(app, ["config", "validate", str(bad)])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "train.backbone" in text and "oddnet_test" in text and "cannot be trained with privacy.dp" in text
    assert "OddNorm" in text
    assert CliRunner().invoke(app, ["config", "validate", str(good)]).exit_code == 0
