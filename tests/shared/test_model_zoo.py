"""The backbone zoo: every architecture builds, trains one step on CPU and travels in packed records."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import parse_config
from shared.models import (
    available_models,
    build_model,
    count_parameters,
    cpu_models,
    full_size_models,
    initial_states,
    model_spec,
    models_from_states,
)
from shared.records import flatten_states, pack_arrays, unflatten_states, unpack_arrays

CPU = cpu_models()
FULL = full_size_models()


def test_the_zoo_has_ten_full_size_architectures_each_with_a_cpu_variant() -> None:
    assert len(FULL) >= 10
    assert {"densenet121", "densenet169", "resnet18", "resnet50", "seresnet50", "efficientnet_b0", "convnext_t",
            "vit", "swin_t"} <= set(FULL)
    for name in FULL:
        small = model_spec(name).cpu_variant
        assert small in CPU and model_spec(small).full_size == name
        assert model_spec(small).family == model_spec(name).family


def test_unknown_name_lists_the_new_architectures() -> None:
    with pytest.raises(KeyError) as err:
        build_model("convnext_base")
    for name in ("convnext_t", "swin_t", "efficientnet_b0", "seresnet50", "convnext_t_tiny"):
        assert name in str(err.value)


def _forward_backward(name: str, size: int) -> None:
    net = build_model(name, size, seed=0).train()
    x = torch.rand(2, 1, size, size)
    out = net(x)
    assert out.shape == (2, 1)
    assert torch.isfinite(out).all()
    torch.nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), torch.tensor([0.0, 1.0])).backward()
    # every parameter learns (MONAI's TransformerBlock keeps an unused cross-attention norm)
    grads = {k: p.grad for k, p in net.named_parameters() if p.requires_grad and "norm_cross_attn" not in k}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        (name, [k for k, g in grads.items() if g is None][:3])
    # the input layer learns: the loss reaches the first weights
    first = next(p for p in net.parameters() if p.ndim >= 2)
    assert first.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CPU)
def test_cpu_variant_runs_forward_and_backward(name: str) -> None:
    _forward_backward(name, 32)


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_size_architecture_runs_forward_and_backward_on_a_small_slice(name: str) -> None:
    _forward_backward(name, 32)


@pytest.mark.parametrize("name", CPU)
def test_weights_round_trip_through_packed_records(name: str) -> None:
    states = {k: OrderedDict(build_model(name, 32, seed=i).state_dict()) for i, k in enumerate(["pre_t2w", "post_dwi"])}
    record, layout = pack_arrays(flatten_states(states))
    assert len(record) <= 2  # one flat array per dtype
    back = unflatten_states(dict(unpack_arrays(record, layout)), like=states)
    for key, sd in states.items():
        net = build_model(name, 32)
        net.load_state_dict(back[key], strict=False)
        for pname, t in net.state_dict().items():
            if pname.endswith("num_batches_tracked"):
                continue
            assert torch.equal(t, sd[pname]), (name, key, pname)


def test_architectures_differ_in_size_as_published() -> None:
    sizes = {n: count_parameters(build_model(n, 32)) for n in ("resnet18", "efficientnet_b0", "densenet121")}
    # ResNet-18 ~11.2M, EfficientNet-B0 ~4.0M, DenseNet-121 ~7.0M with a one-logit head
    assert 10.5e6 < sizes["resnet18"] < 11.5e6
    assert 3.5e6 < sizes["efficientnet_b0"] < 4.5e6
    assert 6.5e6 < sizes["densenet121"] < 7.5e6


def test_cam_layers_exist_in_every_network() -> None:
    for name in CPU:
        spec = model_spec(name)
        net = build_model(name, 32)
        if spec.cam_method == "gradcam":
            assert spec.cam_layer in dict(net.named_modules()), name
        else:
            assert spec.cam_method == "rollout" and spec.kind == "transformer"


@pytest.mark.parametrize(("name", "size"), [("vit_tiny", 36), ("swin_t_tiny", 40)])
def test_transformers_reject_slices_off_their_grid(name: str, size: int) -> None:
    with pytest.raises(ValueError, match="multiple of"):
        build_model(name, size)


def test_pretrained_path_loads_local_weights(tmp_path: Path) -> None:
    source = build_model("convnext_t_tiny", 32, seed=123)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    loaded = build_model("convnext_t_tiny", 32, seed=0, pretrained=path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values(),
                                                   strict=True))


def test_pretrained_path_of_another_architecture_fails_with_what_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pt"
    torch.save({"state_dict": build_model("resnet_tiny", 32).state_dict()}, path)
    with pytest.raises(ValueError) as err:
        build_model("densenet_tiny", 32, pretrained=path)
    msg = str(err.value)
    assert str(path) in msg and "densenet_tiny" in msg and "missing" in msg and "unexpected" in msg


def test_pretrained_path_with_another_head_names_the_shape_mismatch(tmp_path: Path) -> None:
    sd = build_model("resnet_tiny", 32).state_dict()
    sd["fc.weight"] = torch.zeros(1000, sd["fc.weight"].shape[1])
    sd["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "imagenet_head.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"shape mismatch.*fc\.weight: file \(1000, 64\) vs network \(1, 64\)"):
        build_model("resnet_tiny", 32, pretrained=path)


def test_missing_pretrained_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train.pretrained_path"):
        build_model("resnet_tiny", 32, pretrained=tmp_path / "nope.pt")


def test_initial_states_start_from_a_previous_runs_final_npz(tmp_path: Path) -> None:
    cfg = parse_config({"data": {"sequences": ["t2w"], "timepoints": ["pre", "post"]},
                        "preprocess": {"slice_size": 32}, "train": {"backbone": "resnet_tiny"}})
    previous = {k: OrderedDict(build_model("resnet_tiny", 32, seed=i).state_dict())
                for i, k in enumerate(["pre_t2w", "post_t2w"], start=50)}
    path = tmp_path / "final.npz"
    np.savez(path, **flatten_states(previous))
    cfg.train.pretrained_path = path
    states = initial_states(cfg)
    for key in ("pre_t2w", "post_t2w"):  # each backbone gets its own prefixed weights
        assert torch.equal(states[key]["conv1.weight"], previous[key]["conv1.weight"])
    assert not torch.equal(states["pre_t2w"]["conv1.weight"], states["post_t2w"]["conv1.weight"])
    models_from_states(cfg, states)  # and they load back into the network


def test_every_response_backbone_is_a_classifier() -> None:
    assert set(CPU) | set(FULL) == set(available_models("classification"))
