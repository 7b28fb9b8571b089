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


def is_norm_stat(param_name: str) -> bool:
    """A normalisation layer's running statistic (``...running_mean`` / ``...running_var``): an estimate of the
    data's feature statistics, not a weight (server optimisers average it; ``norm_stats: local`` keeps it on site)."""
    return param_name.endswith(("running_mean", "running_var"))


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


PACKED = "packed"
LAYOUT_KEY = "array-layout"


def pack_arrays(arrays: dict[str, np.ndarray], layout: str | None = None) -> tuple[ArrayRecord, str]:
    """Weights on the wire as ONE flat array per dtype, plus their layout (a JSON string for a ConfigRecord).

    Flower's Deployment Engine moves every ``Array`` of a message as its own object (an HTTPS request,
    two at a time), so a model of a few hundred tensors costs hundreds of requests per message; packed,
    it costs one or two. Element-wise aggregation (FedAvg, FedProx, FedAdam) is unchanged by packing.
    With ``layout`` (the server's), the arrays must be exactly those it describes, in its order.
    """
    if layout is None:
        spec = [[k, np.asarray(v).dtype.str, list(np.shape(v))] for k, v in arrays.items()]
    else:
        spec = unpack_json(layout)
        names = [name for name, _, _ in spec]
        if set(names) != set(arrays):
            extra, missing = sorted(set(arrays) - set(names)), sorted(set(names) - set(arrays))
            raise ValueError(f"arrays do not match the server's layout: extra {extra[:3]}, missing {missing[:3]}")
    groups: OrderedDict[str, list[np.ndarray]] = OrderedDict()
    for name, dt, shape in spec:
        a = np.asarray(arrays[name])
        if list(a.shape) != list(shape):
            raise ValueError(f"array {name!r} has shape {a.shape}, the server's layout says {tuple(shape)}")
        groups.setdefault(dt, []).append(a.astype(np.dtype(dt), copy=False).reshape(-1))
    record = ArrayRecord(OrderedDict((f"{PACKED}{SEP}{dt}", Array(np.concatenate(parts)))
                                     for dt, parts in groups.items()))
    return record, layout if layout is not None else pack_json(spec)


def unpack_arrays(record: ArrayRecord, layout: str) -> OrderedDict[str, np.ndarray]:
    """Inverse of :func:`pack_arrays`. Slices keep the flat array's dtype (an aggregate may be float64)."""
    flats = {k.partition(SEP)[2]: v.numpy() for k, v in record.items()}
    used = dict.fromkeys(flats, 0)
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, dt, shape in unpack_json(layout):
        if dt not in flats:
            raise ValueError(f"packed record has no {dt} array (needed for {name!r})")
        n, start = int(np.prod(shape, dtype=np.int64)), used[dt]
        if start + n > flats[dt].size:
            raise ValueError(f"packed {dt} array too short for {name!r}")
        out[name] = flats[dt][start:start + n].reshape(shape)
        used[dt] = start + n
    short = [dt for dt, n in used.items() if n != flats[dt].size]
    if short:
        raise ValueError(f"packed {short[0]} array longer than its layout")
    return out


def message_arrays(content: Any) -> OrderedDict[str, np.ndarray]:
    """The named arrays of a message's ``arrays`` record, packed (``config[array-layout]``) or not."""
    conf = content["config"] if "config" in content else None
    layout = conf.get(LAYOUT_KEY) if conf is not None else None
    return unpack_arrays(content["arrays"], str(layout)) if layout else record_to_arrays(content["arrays"])


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
