"""Secure aggregation of model updates: what a site masks, and how the server reads the revealed sum.

With ``federation.secure_aggregation: true`` a training site sends, instead of its new weights, its
weights times its number of training patients (and that number), masked in a kept
secure-aggregation session (:mod:`shared.secagg`, ``reveal_total=True``): the server's sum of the
masked replies *is* the weighted sum of the sites' weights, from which it takes the FedAvg mean;
it never sees one site's weights. The encoding below is fixed here (not taken from a message) so
every site uses the same one.

What it costs (``docs/secure_aggregation.md``, "Model updates"): no per-site screening of updates on
the server (a non-finite or out-of-range update is refused by the site itself), twice the upload
(64-bit ring elements instead of float32), one key exchange (two extra messages) per training stage,
and no dropout recovery: a site missing from a round stops the stage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from shared.secagg import ArraySpec, decode_sum

FRAC_BITS = 24
"""Fixed-point resolution of ``n * w`` (2**-24); the mean's error is at most ``sites * 2**-25 / N``."""
WEIGHT_BOUND = 1.0e4
"""Largest ``|w|`` of any weight or buffer a site may send (a larger one is refused on site)."""
MAX_EXAMPLES = 1_000_000
"""Largest number of training patients one site may weight its update by."""
N_KEY = "n"


def array_keys(keys: list[str]) -> dict[str, str]:
    """Record key -> secure-aggregation array key (``u0, u1, ...`` in sorted record-key order)."""
    return {k: f"u{i}" for i, k in enumerate(sorted(keys))}


def update_spec(keys: list[str]) -> dict[str, ArraySpec]:
    """The spec every site masks its weighted update with (the same at every site by construction)."""
    spec = {a: ArraySpec(bound=WEIGHT_BOUND * MAX_EXAMPLES, frac_bits=FRAC_BITS) for a in array_keys(keys).values()}
    spec[N_KEY] = ArraySpec(bound=MAX_EXAMPLES, frac_bits=0)
    return spec


def weighted_update(arrays: Mapping[str, np.ndarray], n: int, *, site: str) -> dict[str, np.ndarray]:
    """A site's contribution: ``n * w`` per packed array (float64) and ``n``.

    Raises
    ------
    ValueError
        Naming the site and the array: non-finite values, ``|w|`` above :data:`WEIGHT_BOUND`, or
        ``n`` outside ``1..MAX_EXAMPLES``.
    """
    if isinstance(n, bool) or not 1 <= int(n) <= MAX_EXAMPLES:
        raise ValueError(f"site {site}: {n!r} training patients; a securely aggregated update needs 1..{MAX_EXAMPLES}")
    out: dict[str, np.ndarray] = {}
    for key, a in array_keys(list(arrays)).items():
        w = np.asarray(arrays[key], dtype=np.float64).ravel()
        if not np.isfinite(w).all():
            raise ValueError(f"site {site}: its update has non-finite values in {key!r}; not sent (the local "
                             "training diverged: lower train.lr or check this site's images)")
        big = float(np.max(np.abs(w))) if w.size else 0.0
        if big > WEIGHT_BOUND:
            raise ValueError(f"site {site}: a weight of {key!r} is {big:.3g}, above the {WEIGHT_BOUND:g} a securely "
                             "aggregated update may hold; not sent")
        out[a] = w * float(n)
    out[N_KEY] = np.asarray(int(n), dtype=np.int64)
    return out


def mean_from_sum(total: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], int]:
    """The server's side: decode the revealed sum; returns ``({record key: weighted mean}, N)``.

    ``shapes``: record key -> shape of the packed array (the server's own layout).
    """
    keys = array_keys(list(shapes))
    spec = update_spec(list(shapes))
    plain = decode_sum({a: total[a] for a in spec}, spec, {**{a: (int(np.prod(shapes[k])),) for k, a in keys.items()},
                                                            N_KEY: ()})
    n = int(plain[N_KEY])
    if n < 1:
        raise ValueError(f"the revealed sum says {n} training patients in all; nothing to average")
    return {k: (plain[a] / n).reshape(shapes[k]) for k, a in keys.items()}, n


def weights_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the global weights a site was sent (which model an update was trained from)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()
