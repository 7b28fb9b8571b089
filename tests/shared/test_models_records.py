"""Network registry and how weights travel in Flower records."""

from collections import OrderedDict

import numpy as np
import pytest
import torch

from shared.models import available_models, build_model
from shared.records import flatten_states, record_to_states, states_to_record, unflatten_states

TINY = ["densenet_tiny", "resnet_tiny", "vit_tiny"]


def test_unknown_network_lists_the_valid_names() -> None:
    with pytest.raises(KeyError) as err:
        build_model("densenet12")
    for name in ("densenet121", "resnet18", "vit", "unet"):
        assert name in str(err.value)


@pytest.mark.parametrize("name", TINY)
def test_tiny_backbones_give_one_logit_per_slice(name: str) -> None:
    net = build_model(name, 32, seed=0)
    out = net(torch.rand(3, 1, 32, 32))
    assert out.shape == (3, 1)


def test_paper_backbones_are_registered() -> None:
    names = available_models("classification")
    assert {"densenet121", "resnet18", "resnet34", "resnet50", "vit"} <= set(names)
    assert available_models("segmentation") == ["unet"]


def test_seeded_initialisation_is_identical_and_seed_dependent() -> None:
    a = build_model("densenet_tiny", 32, seed=1).state_dict()
    b = build_model("densenet_tiny", 32, seed=1).state_dict()
    c = build_model("densenet_tiny", 32, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_vit_rejects_a_slice_size_off_the_patch_grid() -> None:
    with pytest.raises(ValueError, match="patch"):
        build_model("vit_tiny", 30)


def test_states_round_trip_through_one_array_record_with_prefixed_keys() -> None:
    states = {k: OrderedDict(build_model("densenet_tiny", 32, seed=i).state_dict())
              for i, k in enumerate(["pre_t2w", "post_dwi"])}
    record = states_to_record(states)
    assert all("/" in k for k in record.keys())
    assert {k.split("/")[0] for k in record.keys()} == {"pre_t2w", "post_dwi"}
    assert not any(k.endswith("num_batches_tracked") for k in record.keys())  # counters stay local
    back = record_to_states(record, like=states)
    for key in states:
        for name, t in states[key].items():
            if name.endswith("num_batches_tracked"):
                continue
            assert back[key][name].dtype == t.dtype
            assert torch.equal(back[key][name], t)


def test_integer_buffers_are_cast_back_after_averaging() -> None:
    like = {"pre_t2w": OrderedDict(n=torch.tensor(3, dtype=torch.int64), w=torch.zeros(2))}
    flat = flatten_states(like)
    flat["pre_t2w/n"] = np.asarray(3.4)  # what a weighted mean does to an int buffer
    back = unflatten_states(flat, like)
    assert back["pre_t2w"]["n"].dtype == torch.int64 and int(back["pre_t2w"]["n"]) == 3


def test_backbone_keys_must_not_contain_the_separator() -> None:
    with pytest.raises(ValueError, match="must not contain"):
        flatten_states({"pre/t2w": OrderedDict(w=torch.zeros(1))})
