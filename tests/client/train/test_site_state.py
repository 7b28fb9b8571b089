"""Training state a site keeps between rounds: its own normalisation statistics (norm_stats: local),
its SGD momentum (train.keep_optimizer_state), and local work counted in steps (train.local_steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from client.site_state import (
    apply_norm_stats,
    load_norm_stats,
    load_optimizer_state,
    run_state_dir,
    save_norm_stats,
    save_optimizer_state,
)
from client.train import SliceSet, recompute_norm_stats, train_backbone
from shared.config import ConfigError, TrainConfig, load_config
from shared.models import build_model


def _slices(n: int = 16, size: int = 32, shift: float = 0.0, seed: int = 0) -> SliceSet:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float32)
    x = (rng.normal(0.5 + shift, 0.1, (n, 1, size, size)) + 0.2 * y[:, None, None, None]).astype(np.float32)
    return SliceSet("pre_t2w", x, y, [f"P{i}" for i in range(n)], np.array(["train"] * n, dtype=object))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(self.drop(h.mean(dim=(2, 3))))


def test_recomputed_statistics_are_the_images_own_feature_statistics() -> None:
    """After re-estimation the running mean/variance are the per-channel mean/variance of the layer's input
    over all the images (no labels used), in batches, whatever the model held before."""
    torch.manual_seed(0)
    net = _Net()
    net.bn.running_mean.fill_(5.0)
    net.bn.running_var.fill_(9.0)
    data = _slices(n=70, shift=0.3)  # 70 = 64 + 6: two batches
    assert recompute_norm_stats(net, data, batch_size=64) == 1
    with torch.no_grad():
        feats = net.conv(torch.from_numpy(data.x))  # (n, c, h, w)
    flat = feats.permute(1, 0, 2, 3).reshape(4, -1).double()
    np.testing.assert_allclose(net.bn.running_mean.numpy(), flat.mean(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.bn.running_var.numpy(), flat.var(1).numpy(), rtol=2e-2)  # within-batch variances
    assert not net.training and not net.bn.training and net.bn.momentum == 0.1  # left as it was used


def test_norm_stats_round_trip_and_only_statistics_are_kept(tmp_path) -> None:
    a = build_model("densenet_tiny", slice_size=32, seed=1).state_dict()
    b = build_model("densenet_tiny", slice_size=32, seed=2).state_dict()
    for sd, v in ((a, 3.0),):
        for k in sd:
            if k.endswith("running_mean"):
                sd[k].fill_(v)
    n = save_norm_stats(tmp_path, "run-1", {"pre_t2w": a})
    kept = load_norm_stats(tmp_path, "run-1")
    assert kept is not None and len(kept) == n > 0
    assert all(k.endswith(("running_mean", "running_var")) for k in kept)  # no weight is kept
    assert load_norm_stats(tmp_path, "run-2") is None  # another run never reads them
    own, changed = apply_norm_stats({"pre_t2w": b}, kept)
    assert changed == ["pre_t2w"]
    for k, t in own["pre_t2w"].items():
        if k.endswith("running_mean"):
            assert torch.all(t == 3.0)
        elif not k.endswith("running_var"):
            assert torch.equal(t, b[k])  # the received weights are untouched
    bad = {k: np.zeros(7, np.float32) for k in kept}
    with pytest.raises(ValueError, match="has shape"):
        apply_norm_stats({"pre_t2w": b}, bad)
    assert run_state_dir(tmp_path, "a/b").parent == tmp_path / "run_state"  # a run id is never a path


def test_local_steps_count_steps_not_epochs() -> None:
    cfg = TrainConfig(backbone="densenet_tiny", batch_size=4, local_steps=7)
    model = build_model("densenet_tiny", slice_size=32, seed=0)
    stats = train_backbone(model, _slices(16), cfg, epochs=1, seed=0, max_steps=cfg.local_steps)
    assert stats.steps == 7 and len(stats.epoch_losses) == 2  # 4 steps an epoch: two (partial) epochs
    stats = train_backbone(build_model("densenet_tiny", slice_size=32, seed=0), _slices(16), cfg, epochs=3, seed=0)
    assert stats.steps == 12  # without max_steps: the epochs


def test_optimizer_state_survives_rounds_through_the_cache(tmp_path) -> None:
    """Round 2 continues the momentum of round 1 (read back from the site's cache): its update differs
    from a fresh optimiser's, and equals the one computed from the state held in memory."""
    cfg = TrainConfig(backbone="densenet_tiny", batch_size=4, keep_optimizer_state=True)
    model = build_model("densenet_tiny", slice_size=32, seed=0)
    first = train_backbone(model, _slices(16), cfg, epochs=1, seed=1)
    assert first.optimizer_state is not None
    buffers = [st["momentum_buffer"] for st in first.optimizer_state["state"].values()]
    assert buffers and any(float(b.abs().sum()) > 0 for b in buffers)
    save_optimizer_state(tmp_path, "run-1", "pre_t2w", first.optimizer_state)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def round_two(state):
        m = build_model("densenet_tiny", slice_size=32, seed=0)
        m.load_state_dict(start)
        train_backbone(m, _slices(16), cfg, epochs=1, seed=2, optimizer_state=state)
        return m.state_dict()

    reloaded = load_optimizer_state(tmp_path, "run-1", "pre_t2w")
    kept, memory, fresh = round_two(reloaded), round_two(first.optimizer_state), round_two(None)
    w = "features.conv0.weight" if "features.conv0.weight" in kept else next(iter(kept))
    assert torch.equal(kept[w], memory[w])
    assert not torch.equal(kept[w], fresh[w])


@pytest.mark.parametrize("key", ["local_steps: 5", "keep_optimizer_state: true"])
def test_site_state_options_are_refused_with_dp(tmp_path, key) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"privacy: {{dp: true, noise_multiplier: 1.0}}\ntrain: {{{key}}}\n")
    with pytest.raises(ConfigError, match="privacy.dp"):
        load_config(path)
