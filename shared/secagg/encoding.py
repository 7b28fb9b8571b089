"""Fixed-point encoding of arrays into the ring of unsigned 64-bit integers (two's complement).

A value ``x`` of the array named ``key`` becomes the integer ``round(x * 2**frac_bits)`` stored as a
uint64 (negative numbers wrap, as in two's complement). Sums modulo ``2**64`` of such encodings are
the encodings of the integer sums as long as ``|sum| < 2**63``; :func:`check_capacity` refuses a
declaration under which that could fail. Counts use ``frac_bits=0`` and are exact; sums of floats
use e.g. ``frac_bits=24`` (resolution ``2**-24`` per site and value).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

RING_BITS = 64
_LIMIT = 1 << 63  # |sum| must stay below this


@dataclass(frozen=True)
class ArraySpec:
    """How one array is encoded.

    Parameters
    ----------
    bound : float
        The largest ``|value|`` any site may contribute in this array (declared by the caller; a site
        refuses to encode a value above it).
    frac_bits : int
        Fractional bits of the fixed-point encoding (0: integers, exact; output of the decoded sum
        is int64 then, float64 otherwise).
    """

    bound: float
    frac_bits: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.bound, bool) or not isinstance(self.bound, int | float | np.integer | np.floating):
            raise TypeError(f"bound must be a number, got {type(self.bound).__name__}")
        if not math.isfinite(float(self.bound)) or float(self.bound) <= 0:
            raise ValueError(f"bound must be finite and > 0, got {self.bound!r}")
        if isinstance(self.frac_bits, bool) or not isinstance(self.frac_bits, int | np.integer) \
                or not 0 <= int(self.frac_bits) <= 62:
            raise ValueError(f"frac_bits must be an integer in [0, 62], got {self.frac_bits!r}")
        object.__setattr__(self, "bound", float(self.bound))
        object.__setattr__(self, "frac_bits", int(self.frac_bits))

    @property
    def encoded_bound(self) -> int:
        """The largest ``|encoded value|`` one site may contribute: ``ceil(bound * 2**frac_bits)``."""
        return math.ceil(math.ldexp(self.bound, self.frac_bits))

    def describe(self) -> str:
        """Canonical text of the spec (bound in exact hex), bound into the key derivations."""
        return f"bound={self.bound.hex()};frac_bits={self.frac_bits}"


def as_specs(spec: Mapping[str, ArraySpec | Mapping[str, float | int]]) -> dict[str, ArraySpec]:
    """Normalise ``{key: ArraySpec or {"bound": .., "frac_bits": ..}}`` (a ConfigRecord-friendly form)."""
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError("spec must be a non-empty mapping {array key: ArraySpec}")
    out = {}
    for key, s in spec.items():
        check_key(key)
        try:
            out[key] = s if isinstance(s, ArraySpec) else ArraySpec(**dict(s))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"spec of array {key!r}: {exc}") from None
    return out


def check_key(key: object) -> str:
    """Array keys: non-empty text without '/' or control characters, not starting with '__'."""
    if not isinstance(key, str) or not key or key.startswith("__") or "/" in key \
            or any(ord(c) < 32 for c in key) or len(key) > 200:
        raise ValueError(f"array key {key!r}: use a non-empty name (max 200 characters) without '/', "
                         "control characters or a leading '__' (reserved)")
    return key


def check_capacity(key: str, spec: ArraySpec, n_sites: int) -> int:
    """Refuse a declaration whose sum over ``n_sites`` could reach ``2**63``; returns the sum bound.

    Raises
    ------
    ValueError
        Naming ``key`` and what to lower.
    """
    total = n_sites * spec.encoded_bound
    if total >= _LIMIT:
        raise ValueError(
            f"array {key!r}: bound {spec.bound:g} with frac_bits={spec.frac_bits} over {n_sites} sites could "
            f"reach |sum| = {total:.3g} >= 2**63 in the 64-bit ring; lower frac_bits or the bound")
    return total


def encode(key: str, values: np.ndarray, spec: ArraySpec, n_sites: int) -> np.ndarray:
    """Encode one site's array (any shape) as a flat uint64 vector.

    Raises
    ------
    ValueError
        Naming ``key``: non-numeric data, NaN/inf, a value above the declared bound, or a
        declaration that could overflow the ring.
    """
    check_capacity(key, spec, n_sites)
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"array {key!r}: need numbers (bool, int or float), got dtype {arr.dtype}")
    flat = arr.ravel()
    if arr.dtype.kind == "f":
        x = flat.astype(np.float64)
        bad = ~np.isfinite(x)
        if bad.any():
            raise ValueError(f"array {key!r}: {int(bad.sum())} NaN or infinite value(s); remove or impute "
                             "them before the secure sum")
        over = np.abs(x) > spec.bound
        if over.any():
            raise ValueError(f"array {key!r}: {int(over.sum())} value(s) exceed the declared bound "
                             f"|x| <= {spec.bound:g}; raise the bound (all sites must use the same spec) or clip")
        ints = np.rint(np.ldexp(x, spec.frac_bits)).astype(np.int64)
    else:
        bound = math.floor(spec.bound)
        if arr.dtype.kind == "u":
            over = flat > np.uint64(bound)
        else:
            wide = flat.astype(np.int64)
            over = (wide > bound) | (wide < -bound)
        if over.any():
            raise ValueError(f"array {key!r}: {int(over.sum())} value(s) exceed the declared bound "
                             f"|x| <= {spec.bound:g}; raise the bound (all sites must use the same spec) or clip")
        ints = flat.astype(np.int64) << np.int64(spec.frac_bits)
    return ints.view(np.uint64)


def decode(key: str, ring: np.ndarray, spec: ArraySpec, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Decode a (summed) uint64 vector: int64 when ``frac_bits == 0``, float64 otherwise."""
    arr = np.asarray(ring)
    if arr.dtype != np.uint64:
        raise ValueError(f"array {key!r}: ring elements must be uint64, got {arr.dtype}")
    signed = arr.view(np.int64)
    out = signed.copy() if spec.frac_bits == 0 else np.ldexp(signed.astype(np.float64), -spec.frac_bits)
    return out.reshape(shape) if shape is not None else out


def decode_sum(total: Mapping[str, np.ndarray], spec: Mapping[str, ArraySpec | Mapping[str, float | int]],
               shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Decode every array of a revealed sum (server side, only with ``reveal_total=True``)."""
    specs = as_specs(spec)
    return {k: decode(k, total[k], s, None if shapes is None else tuple(shapes[k])) for k, s in specs.items()}
