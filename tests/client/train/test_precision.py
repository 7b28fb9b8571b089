"""Mixed precision and channels-last: switches that act on CUDA only, and change nothing on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.train import Precision, SliceSet, resolve_precision, train_backbone, training_network
from shared.config import ConfigError, TrainConfig, load_config
from shared.models import build_model


@pytest.mark.parametrize(("asked", "bf16", "dtype", "scaler"), [
    ("fp32", True, None, False),
    ("bf16", True, torch.bfloat16, False),
    ("fp16", True, torch.float16, True),
    ("auto", True, torch.bfloat16, False),
    ("auto", False, torch.float16, True),
])
def test_precision_on_cuda(asked, bf16, dtype, scaler) -> None:
    p = resolve_precision(asked, True, torch.device("cuda:0"), bf16_supported=bf16)
    assert p.dtype is dtype and p.scaler is scaler and p.channels_last


@pytest.mark.parametrize("asked", ["fp32", "bf16", "fp16", "auto"])
def test_every_switch_is_off_on_cpu(asked) -> None:
    p = resolve_precision(asked, True, torch.device("cpu"), compile=True, deterministic=False)
    assert p.dtype is None and not p.scaler and not p.channels_last and p.name == "fp32"
    assert not p.compile and p.deterministic


def test_compile_and_fast_mode_on_cuda() -> None:
    p = resolve_precision("bf16", False, torch.device("cuda:0"), bf16_supported=True, compile=True,
                          deterministic=False)
    assert p.compile and not p.deterministic
    assert not resolve_precision("fp32", False, torch.device("cuda:0")).compile  # off unless asked


def test_training_network_compiles_the_same_parameters_and_sets_cudnn_modes() -> None:
    model = build_model("densenet_tiny", slice_size=32, seed=0)
    eager = training_network(model, Precision(None, False, False), torch.device("cpu"))
    assert eager is model
    compiled = training_network(model, Precision(None, False, False, compile=True), torch.device("cpu"))
    assert compiled is not model and compiled._orig_mod is model  # a wrapper: the optimiser steps model's tensors
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in model.parameters()]
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:  # the flags are process-wide settings, set without touching a GPU
        training_network(model, Precision(None, False, False, deterministic=False), torch.device("cuda:0"))
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        training_network(model, Precision(None, False, False), torch.device("cuda:0"))
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


@pytest.fixture
def slice_set() -> SliceSet:
    rng = np.random.default_rng(0)
    y = (np.arange(16) % 2).astype(np.float32)
    x = (rng.normal(0.5, 0.1, (16, 1, 32, 32)) + 0.2 * y[:, None, None, None]).astype(np.float32)
    return SliceSet("pre_t2w", x.clip(0, 1), y, [f"P{i}" for i in range(16)], np.array(["train"] * 16, dtype=object))


def test_cpu_training_is_identical_whatever_the_gpu_switches(slice_set) -> None:
    """On CPU the same seed gives bit-identical weights with bf16 + channels-last + compile + fast mode asked
    as with fp32."""
    out = []
    for precision, fast in (("fp32", False), ("bf16", True)):
        cfg = TrainConfig(backbone="densenet_tiny", batch_size=4, precision=precision, channels_last=fast,
                          compile=fast, deterministic=not fast)
        model = build_model("densenet_tiny", slice_size=slice_set.x.shape[-1], seed=3)
        train_backbone(model, slice_set, cfg, epochs=1, seed=5)
        out.append({k: v.clone() for k, v in model.state_dict().items()})
        assert all(v.is_contiguous() for v in model.state_dict().values())
    for k in out[0]:
        assert torch.equal(out[0][k], out[1][k]), k


@pytest.mark.parametrize(("text", "match"), [
    ("privacy: {dp: true, noise_multiplier: 1.0}\ntrain: {precision: bf16}\n", "train.precision 'bf16' with privacy.dp"),
    ("train: {precision: fp17}\n", "train.precision"),
    ("privacy: {dp: true, noise_multiplier: 1.0}\ntrain: {compile: true}\n", "train.compile with privacy.dp"),
])
def test_bad_precision_settings_are_config_errors(tmp_path, text, match) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)
