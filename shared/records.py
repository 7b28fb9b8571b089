"""How model weights and statistics travel in Flower records.

All backbones of a round travel in ONE ``ArrayRecord`` whose keys are prefixed with the backbone's
signature key (``pre_t2w/features.conv0.weight``), so one message per site per round carries the
whole multi-backbone model. BatchNorm's ``num_batches_tracked`` counters do not travel: they are
not weights (with a fixed BN momentum nothing reads them), averaging or Adam-stepping an integer
counter is meaningless, and Flower's FedAdam rejects their 0-d shape. Other integer buffers are
cast back to their dtype on load.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

if TYPE_CHECKING:  # torch is imported where tensors are made, so message handling without models starts fast
    import torch

SEP = "/"

StateDicts = dict[str, "OrderedDict[str, torch.Tensor]"]


def is_local_only(param_name: str) -> bool:
    """Buffers that never leave a site (see module docstring)."""
    return param_name.endswith("num_batches_tracked")


def flatten_states(states: StateDicts) -> OrderedDict[str, np.ndarray]:
    """``{"pre_t2w": state_dict, ...}`` -> ``{"pre_t2w/<param>": ndarray, ...}`` (deterministic order)."""
    flat: OrderedDict[str, np.ndarray] = OrderedDict()
    for key in sorted(states):
        if SEP in key:
            raise ValueError(f"backbone key {key!r} must not contain {SEP!r}")
        for name, tensor in states[key].items():
            if is_local_only(name):
                continue
            flat[f"{key}{SEP}{name}"] = tensor.detach().cpu().numpy()
    return flat


def unflatten_states(flat: dict[str, np.ndarray], like: StateDicts | None = None) -> StateDicts:
    """Inverse of :func:`flatten_states`; with ``like``, tensors take the reference dtypes."""
    import torch

    out: dict[str, OrderedDict[str, torch.Tensor]] = {}
    for full, arr in flat.items():
        key, _, name = full.partition(SEP)
        if not name:
            raise ValueError(f"array {full!r} has no backbone prefix")
        t = torch.from_numpy(np.array(arr, copy=True))
        if like is not None and key in like and name in like[key]:
            ref = like[key][name]
            if ref.dtype in (torch.int64, torch.int32, torch.long):
                t = torch.round(t.double()).to(ref.dtype) if t.is_floating_point() else t.to(ref.dtype)
            else:
                t = t.to(ref.dtype)
        out.setdefault(key, OrderedDict())[name] = t
    return out


def states_to_record(states: StateDicts) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(v)) for k, v in flatten_states(states).items()))


def record_to_states(record: ArrayRecord, like: StateDicts | None = None) -> StateDicts:
    return unflatten_states({k: v.numpy() for k, v in record.items()}, like)


def record_to_arrays(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def pack_json(obj: Any) -> str:
    """Structured payloads (small dicts/lists) travel as one JSON string in a ConfigRecord."""
    return json.dumps(obj, sort_keys=True, allow_nan=False, default=_default)


def unpack_json(text: str) -> Any:
    return json.loads(text)


def _default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def config_record(**values: Any) -> ConfigRecord:
    return ConfigRecord(values)
