"""Local training: splits, augmentation, loops, FedProx, determinism; and Flower's aggregation."""

from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from client.train import SliceSet, assign_splits, predict, random_resized_crop, train_backbone
from shared.config import TrainConfig
from shared.models import build_model
from shared.records import arrays_to_record, record_to_arrays


def _labels(n_pos: int, n_neg: int) -> pd.Series:
    ids = [f"P{i:03d}" for i in range(n_pos + n_neg)]
    return pd.Series([1] * n_pos + [0] * n_neg, index=ids, dtype=float)


def test_split_is_patient_level_stratified_and_seeded() -> None:
    labels = _labels(30, 70)
    a = assign_splits(labels, "8:1:1", seed=1, site="x")
    b = assign_splits(labels, "8:1:1", seed=1, site="x")
    c = assign_splits(labels, "8:1:1", seed=1, site="y")
    assert a.equals(b) and not a.equals(c)
    assert a.value_counts().to_dict() == {"train": 80, "val": 10, "test": 10}
    for split in ("train", "val", "test"):  # both classes in every split, in proportion
        prev = labels[a == split].mean()
        assert 0.2 <= prev <= 0.4


def test_seven_three_split_has_no_validation() -> None:
    s = assign_splits(_labels(10, 20), "7:3", seed=0)
    assert set(s) == {"train", "test"} and (s == "test").sum() == 9


def test_random_resized_crop_keeps_shape_and_is_seeded() -> None:
    x = torch.rand(4, 1, 32, 32)
    a = random_resized_crop(x, (0.8, 1.0), (0.9, 1.1), torch.Generator().manual_seed(0))
    b = random_resized_crop(x, (0.8, 1.0), (0.9, 1.1), torch.Generator().manual_seed(0))
    c = random_resized_crop(x, (0.8, 1.0), (0.9, 1.1), torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def _separable(n: int = 48, size: int = 32, seed: int = 0) -> SliceSet:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float32)
    x = rng.normal(0.3, 0.05, (n, 1, size, size)).astype(np.float32)
    x[y == 1, :, 8:24, 8:24] += 0.5  # a bright "tumour" for good responders
    return SliceSet("pre_t2w", x.clip(0, 1), y, [f"P{i}" for i in range(n)], np.array(["train"] * n, dtype=object))


def test_training_reduces_the_loss_and_separates_the_classes() -> None:
    data = _separable()
    net = build_model("densenet_tiny", 32, seed=0)
    stats = train_backbone(net, data, TrainConfig(batch_size=16, lr=0.05), epochs=8, seed=0)
    assert stats.loss_last_epoch < stats.loss_first_epoch
    p = predict(net, data)
    assert p[data.y == 1].mean() > p[data.y == 0].mean() + 0.1


def test_training_is_deterministic_given_the_seed() -> None:
    data = _separable(16)
    nets = [build_model("densenet_tiny", 32, seed=0) for _ in range(3)]
    for net, seed in zip(nets, (5, 5, 6), strict=True):
        train_backbone(net, data, TrainConfig(batch_size=8), epochs=1, seed=seed)
    a, b, c = (n.state_dict() for n in nets)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_fedprox_term_keeps_weights_near_the_global_model() -> None:
    data = _separable(16)
    global_state = OrderedDict(build_model("densenet_tiny", 32, seed=0).state_dict())

    def drift(mu: float) -> float:
        net = build_model("densenet_tiny", 32, seed=0)
        train_backbone(net, data, TrainConfig(batch_size=8, lr=0.1), epochs=3, seed=0,
                       global_state=global_state, proximal_mu=mu)
        return sum(float(((p.detach() - global_state[n]) ** 2).sum()) for n, p in net.named_parameters())

    assert drift(10.0) < 0.5 * drift(0.0)


def test_fedavg_aggregate_is_the_case_weighted_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # Messages are normally built inside a run; give this process a run identity.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    rng = np.random.default_rng(0)
    sites = [(rng.normal(size=(3, 2)), 10), (rng.normal(size=(3, 2)), 30), (rng.normal(size=(3, 2)), 5)]
    replies = [
        Message(RecordDict({"arrays": arrays_to_record({"pre_t2w/w": w}),
                            "metrics": MetricRecord({"num-examples": n})}), dst_node_id=i + 1, message_type="train")
        for i, (w, n) in enumerate(sites)
    ]
    arrays, _ = FedAvg(weighted_by_key="num-examples").aggregate_train(1, replies)
    expected = sum(w * n for w, n in sites) / sum(n for _, n in sites)
    np.testing.assert_allclose(record_to_arrays(arrays)["pre_t2w/w"], expected, rtol=0, atol=1e-12)
    assert isinstance(arrays, ArrayRecord) and not isinstance(arrays, ConfigRecord)


@pytest.mark.parametrize("n", [0])
def test_training_on_no_cases_is_a_defined_no_op(n: int) -> None:
    empty = SliceSet("pre_t2w", np.zeros((n, 1, 32, 32), np.float32), np.zeros(n, np.float32), [], np.array([]))
    stats = train_backbone(build_model("densenet_tiny", 32), empty, TrainConfig(), epochs=1, seed=0)
    assert stats.n_examples == 0 and stats.steps == 0
