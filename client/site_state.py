"""Training state a site keeps between rounds of one run, in its own cache (never sent anywhere).

- **Normalisation statistics** (``federation.norm_stats: local``, SiloBN/FedBN-style): the BatchNorm
  running means and variances of the site's own images after its last local update, per backbone.
  The next round's update, and the site's signatures, use them instead of the averaged ones.
- **Optimiser state** (``train.keep_optimizer_state``): the SGD momentum of each backbone after the
  site's last local update, so a round continues the site's trajectory instead of restarting it.

Layout: ``<cache>/run_state/<run id>/norm_stats.npz`` and ``.../optimizer/<backbone>.pt``, written
atomically; a resumed run finds them again, another run never reads them. On the Deployment Engine
every message runs in a fresh process, so the files are the only memory between rounds.
"""

from __future__ import annotations

import io
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from client.atomic import atomic_write
from shared.records import is_norm_stat

STATE_DIR = "run_state"


def run_state_dir(cache_dir: Path | str, run_id: str) -> Path:
    if not run_id:
        raise ValueError("a run id is needed to keep training state between rounds")
    return Path(cache_dir) / STATE_DIR / re.sub(r"[^A-Za-z0-9._-]", "_", str(run_id))


def _atomic_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def save_norm_stats(cache_dir: Path | str, run_id: str, states: dict[str, Any]) -> int:
    """Keep every backbone's running statistics of ``states`` (``{key: state_dict}``); returns how many."""
    arrays = {f"{key}/{name}": t.detach().cpu().numpy() for key, sd in states.items() for name, t in sd.items()
              if is_norm_stat(name)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_bytes(run_state_dir(cache_dir, run_id) / "norm_stats.npz", buf.getvalue())
    return len(arrays)


def load_norm_stats(cache_dir: Path | str, run_id: str) -> dict[str, np.ndarray] | None:
    """The statistics kept by :func:`save_norm_stats` for this run, or None before the site's first update."""
    path = run_state_dir(cache_dir, run_id) / "norm_stats.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def apply_norm_stats(states: dict[str, Any], stored: dict[str, np.ndarray]) -> tuple[dict[str, Any], list[str]]:
    """``states`` with the site's own statistics in place of the received ones, and the backbones changed.

    A stored array whose shape differs from the received one (another network) is an error naming it.
    """
    import torch

    out: dict[str, Any] = {}
    changed = []
    for key, sd in states.items():
        new = OrderedDict(sd)
        hit = False
        for name, t in sd.items():
            arr = stored.get(f"{key}/{name}")
            if arr is None or not is_norm_stat(name):
                continue
            if tuple(arr.shape) != tuple(t.shape):
                raise ValueError(f"kept normalisation statistic {key}/{name} has shape {arr.shape}, the model's is "
                                 f"{tuple(t.shape)}: the run's network changed; delete {STATE_DIR}/ in the cache")
            new[name] = torch.from_numpy(np.array(arr, dtype=np.float32)).to(t.dtype)
            hit = True
        out[key] = new
        if hit:
            changed.append(key)
    return out, changed


def _optimizer_path(cache_dir: Path | str, run_id: str, key: str) -> Path:
    return run_state_dir(cache_dir, run_id) / "optimizer" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', key)}.pt"


def save_optimizer_state(cache_dir: Path | str, run_id: str, key: str, state: dict[str, Any]) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_bytes(_optimizer_path(cache_dir, run_id, key), buf.getvalue())


def load_optimizer_state(cache_dir: Path | str, run_id: str, key: str) -> dict[str, Any] | None:
    import torch

    path = _optimizer_path(cache_dir, run_id, key)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
