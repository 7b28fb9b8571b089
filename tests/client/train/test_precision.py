"""Mixed precision and channels-last: switches that act on CUDA only, and change nothing on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.train import SliceSet, resolve_precision, train_backbone
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
    p = resolve_precision(asked, True, torch.device("cpu"))
    assert p.dtype is None and not p.scaler and not p.channels_last and p.name == "fp32"


@pytest.fixture
def slice_set() -> SliceSet:
    rng = np.random.default_rng(0)
    y = (np.arange(16) % 2).astype(np.float32)
    x = (rng.normal(0.5, 0.1, (16, 1, 32, 32)) + 0.2 * y[:, None, None, None]).astype(np.float32)
    return SliceSet("pre_t2w", x.clip(0, 1), y, [f"P{i}" for i in range(16)], np.array(["train"] * 16, dtype=object))


def test_cpu_training_is_identical_whatever_the_gpu_switches(slice_set) -> None:
    """On CPU the same seed gives bit-identical weights with bf16 + channels-last asked as with fp32."""
    out = []
    for precision, cl in (("fp32", False), ("bf16", True)):
        cfg = TrainConfig(backbone="densenet_tiny", batch_size=4, precision=precision, channels_last=cl)
        model = build_model("densenet_tiny", slice_size=slice_set.x.shape[-1], seed=3)
        train_backbone(model, slice_set, cfg, epochs=1, seed=5)
        out.append({k: v.clone() for k, v in model.state_dict().items()})
        assert all(v.is_contiguous() for v in model.state_dict().values())
    for k in out[0]:
        assert torch.equal(out[0][k], out[1][k]), k


@pytest.mark.parametrize(("text", "match"), [
    ("privacy: {dp: true, noise_multiplier: 1.0}\ntrain: {precision: bf16}\n", "train.precision 'bf16' with privacy.dp"),
    ("train: {precision: fp17}\n", "train.precision"),
])
def test_bad_precision_settings_are_config_errors(tmp_path, text, match) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)
