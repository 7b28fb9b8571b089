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
