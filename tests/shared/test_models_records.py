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


def test_pack_bytes_round_trips_numeric_arrays_exactly():
    from shared.wire import pack_bytes, unpack_bytes

    rng = np.random.default_rng(5)
    arrays = {"masked": rng.integers(0, 2**63, size=1000, dtype=np.uint64), "f": rng.normal(size=(3, 4)),
              "i32": np.arange(5, dtype=np.int32), "b": np.array([True, False]), "z": np.zeros((0, 2)),
              "c": np.array([1 + 2j]), "s": np.array(3.5)}
    back = unpack_bytes(pack_bytes(arrays))
    assert list(back) == list(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    assert unpack_bytes(pack_bytes({})) == {}
    with pytest.raises(TypeError, match="only numeric"):
        pack_bytes({"o": np.array(["text"], dtype=object)})


@pytest.mark.parametrize("mutate", ["truncate", "trailing", "header", "dtype", "shape", "length"])
def test_unpack_bytes_refuses_malformed_buffers(mutate):
    import json

    from shared.wire import pack_bytes, unpack_bytes

    blob = pack_bytes({"a": np.arange(4, dtype=np.float64)})
    n = int.from_bytes(blob[:8], "little")
    header, body = blob[8:8 + n], blob[8 + n:]

    def build(h: bytes, b: bytes = body) -> bytes:
        return len(h).to_bytes(8, "little") + h + b

    bad = {"truncate": blob[:-3], "trailing": blob + b"x", "header": build(b"{not json"),
           "dtype": build(json.dumps([["a", "|O", [4]]]).encode()),
           "shape": build(json.dumps([["a", "<f8", [-4]]]).encode()),
           "length": (10**9).to_bytes(8, "little") + header + body}[mutate]
    with pytest.raises(ValueError, match="malformed packed arrays"):
        unpack_bytes(bad)
