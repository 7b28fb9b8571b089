"""Nested messages <-> one JSON text plus named NumPy arrays (maps onto a ConfigRecord + an ArrayRecord).

The statistics requests and replies are nested (queries, sessions, sites); Flower records are flat.
:func:`pack` turns any nesting of dicts/lists/str/numbers/ndarrays into ``(text, arrays)``, where
every array is replaced in the text by ``{"__nd__": "<name>"}``; :func:`unpack` reverses it and
refuses references to arrays that are not there. Flower-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

_REF = "__nd__"


def pack(obj: Any) -> tuple[str, dict[str, np.ndarray]]:
    """``(json_text, {name: ndarray})`` for a nested structure; NumPy scalars become Python numbers."""
    arrays: dict[str, np.ndarray] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            name = f"a{len(arrays)}"
            arrays[name] = np.ascontiguousarray(x)
            return {_REF: name}
        if isinstance(x, Mapping):
            out = {}
            for k, v in x.items():
                if not isinstance(k, str):
                    raise TypeError(f"message keys must be str, got {type(k).__name__}")
                out[k] = walk(v)
            return out
        if isinstance(x, list | tuple):
            return [walk(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, str | int | float | bool):
            return x
        raise TypeError(f"cannot send a value of type {type(x).__name__}")

    return json.dumps(walk(obj), sort_keys=True, allow_nan=False), arrays


def unpack(text: str, arrays: Mapping[str, np.ndarray]) -> Any:
    """Inverse of :func:`pack`.

    Raises
    ------
    ValueError
        On malformed text or a reference to a missing array.
    """
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed message: {exc}") from None

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {_REF}:
                name = x[_REF]
                if name not in arrays:
                    raise ValueError(f"malformed message: array {name!r} referenced but not sent")
                return np.asarray(arrays[name])
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(data)


def nbytes(text: str, arrays: Mapping[str, np.ndarray]) -> int:
    """Payload size: UTF-8 text plus array bytes."""
    return len(text.encode()) + sum(int(np.asarray(a).nbytes) for a in arrays.values())


_NUMERIC = "biufc"


def pack_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named numeric arrays as ONE ``bytes`` value (to ride inside a Flower ``ConfigRecord``).

    Layout: 8-byte little-endian length of a JSON header ``[[name, dtype, shape], ...]``, the header,
    then each array's raw C-order bytes in that order. On the Deployment Engine each ``Array`` of a
    message is its own object (one request at every hop); bytes inside a ``ConfigRecord`` are not.
    """
    spec, parts = [], []
    for name, a in arrays.items():
        a = np.asarray(a)  # (tobytes is C order whatever the layout; ascontiguousarray would make 0-d 1-d)
        if a.dtype.kind not in _NUMERIC:
            raise TypeError(f"array {name!r}: only numeric arrays travel, got dtype {a.dtype}")
        spec.append([str(name), a.dtype.str, list(a.shape)])
        parts.append(a.tobytes())
    header = json.dumps(spec).encode()
    return len(header).to_bytes(8, "little") + header + b"".join(parts)


def unpack_bytes(blob: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_bytes`.

    Raises
    ------
    ValueError
        On a malformed buffer: a header that is not the expected JSON, a non-numeric dtype, or array
        sizes that do not add up to exactly the bytes sent.
    """
    try:
        blob = bytes(blob)
        n = int.from_bytes(blob[:8], "little")
        if len(blob) < 8 + n:
            raise ValueError("header longer than the buffer")
        spec = json.loads(blob[8:8 + n].decode())
        if not isinstance(spec, list):
            raise ValueError("header is not a list")
        out: dict[str, np.ndarray] = {}
        pos = 8 + n
        for entry in spec:
            name, dt, shape = entry
            dtype = np.dtype(dt)
            if dtype.kind not in _NUMERIC or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"array {name!r}: dtype {dt} / shape {shape} not allowed")
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if pos + size > len(blob):
                raise ValueError(f"array {name!r} runs past the end of the buffer")
            out[str(name)] = np.frombuffer(blob, dtype=dtype, count=size // dtype.itemsize if dtype.itemsize else 0,
                                           offset=pos).reshape(tuple(shape)).copy()
            pos += size
        if pos != len(blob):
            raise ValueError(f"{len(blob) - pos} trailing bytes")
        return out
    except ValueError as exc:
        raise ValueError(f"malformed packed arrays: {exc}") from None
    except (TypeError, KeyError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed packed arrays: {exc}") from None
