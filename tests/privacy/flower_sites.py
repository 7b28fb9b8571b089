"""Sites as a real consortium has them, reached through the real ClientApp handlers exactly as Flower calls them.

Each site: a data folder with ``patients.csv``, a cache with ``signatures.csv`` (made-up signatures,
stamped for the run), its own site config (``policy:`` with its floor, role, roster and key) passed
through node config ``site-config`` as ``rectalfl site join`` does. The server side of a test builds
Flower ``Message`` objects and calls ``client.client_app.stats(msg, context)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client import client_app
from client.site_policy import SIGNATURES_STAMP, write_stamp
from shared.wire import pack, pack_bytes, unpack, unpack_bytes
from simulations.sites import make_consortium_keys

RUN = "run-attack"
SIGS = ("pre_t2w", "post_t2w")


def make_patients(rng: np.random.Generator, site: str, n: int) -> pd.DataFrame:
    y = (rng.random(n) < 0.45).astype(int)
    return pd.DataFrame({
        "patient_id": [f"{site}-{i:04d}" for i in range(n)], "trg": np.where(y == 1, 1, 2), "response": y,
        "age": rng.integers(35, 85, n), "sex": rng.choice(["M", "F"], n), "hb": rng.normal(130, 12, n).round(),
        "cea": rng.lognormal(1.2, 0.6, n).round(2), "t_stage": rng.choice(["T2", "T3", "T4"], n),
        "n_stage": rng.choice(["N0", "N1", "N2"], n),
    })


class FlowerConsortium:
    """Four sites behind the real ClientApp; ``send`` is a transport for :func:`run_site_queries`."""

    def __init__(self, root: Path, sizes: dict[str, int], *, k: int = 3, seed: int = 0,
                 release_site_figures: dict[str, bool] | None = None, **policy: Any) -> None:
        rng = np.random.default_rng(seed)
        self.root = root
        keys = make_consortium_keys(root / "roster", list(sizes))
        self.cfg_yaml = yaml.safe_dump({"name": "attack", "data": {"sequences": ["t2w"], "timepoints": ["pre", "post"]},
                                        "fusion": {"clinical_predictors": ["age", "hb", "cea"]}})
        self.node_config: dict[str, dict[str, str]] = {}
        self.patients: dict[str, pd.DataFrame] = {}
        self.signatures: dict[str, pd.DataFrame] = {}
        for site, n in sizes.items():
            data, cache = root / "data" / site, root / "cache" / site
            data.mkdir(parents=True)
            cache.mkdir(parents=True)
            pts = make_patients(rng, site, n)
            pts.to_csv(data / "patients.csv", index=False)
            self.patients[site] = pts
            ext = site.startswith("ext")
            y = pts["response"].to_numpy()
            sig = pd.DataFrame({"patient_id": pts["patient_id"],
                                "split": "external" if ext else np.where(rng.random(n) < 0.6, "train", "test"),
                                "label": y})
            for j, s in enumerate(SIGS):
                sig[s] = np.clip(0.5 + (0.15 + 0.1 * j) * (y - 0.5) + rng.normal(0, 0.18, n), 0, 1).round(6)
            sig["delta_t2w"] = sig["pre_t2w"] - sig["post_t2w"]
            sig.to_csv(cache / "signatures.csv", index=False)
            self.signatures[site] = sig
            write_stamp(cache / SIGNATURES_STAMP, run=RUN, weights="0" * 64)
            site_cfg = {"name": f"site-{site}", "data_root": str(data), "cache_root": str(cache),
                        "fusion": {"clinical_predictors": ["age", "hb", "cea"]},
                        "policy": {"min_cell_count": k, "roster": str(root / "roster"), "identity_key": str(keys[site]),
                                   "role": "external" if ext else "train",
                                   "release_site_figures": bool((release_site_figures or {}).get(site, False)),
                                   **policy}}
            (root / f"{site}.yaml").write_text(yaml.safe_dump(site_cfg))
            self.node_config[site] = {"site-name": site, "data-dir": str(data), "cache-dir": str(cache),
                                      "site-config": str(root / f"{site}.yaml")}
            self.node_ids = {s: 100 + j for j, s in enumerate(sizes)}
        self.log: list[tuple[str, dict, dict | None, Message]] = []

    def context(self, site: str) -> Context:
        return Context(run_id=1, node_id=self.node_ids[site], node_config=dict(self.node_config[site]),
                       state=RecordDict(), run_config={})

    def message(self, request: dict, *, run: str = RUN, cfg_yaml: str | None = None) -> Message:
        text, arrays = pack(request)
        conf = ConfigRecord({"rectalfl-config": cfg_yaml or self.cfg_yaml, "run-id": run, "request": text,
                             "request-arrays": pack_bytes(arrays)})  # as the server sends it
        return Message(RecordDict({"config": conf}), dst_node_id=1,
                       message_type="evaluate.stats")

    def call(self, site: str, request: dict, **kw: Any) -> tuple[dict | None, Message]:
        """One request to one site's ClientApp; ``(decoded reply or None on error, the raw reply)``."""
        client_app._CACHE.clear()  # a fresh process per message, as on the Deployment Engine
        reply = client_app.stats(self.message(request, **kw), self.context(site))
        out = None
        if not reply.has_error():
            arrays = unpack_bytes(reply.content["reply"]["arrays"])
            out = unpack(str(reply.content["reply"]["json"]), arrays)
        self.log.append((site, request, out, reply))
        return out, reply

    def send(self, requests: dict[str, dict]) -> dict[str, dict]:
        out = {}
        for site, req in requests.items():
            rep, _ = self.call(site, req)
            if rep is not None:
                out[site] = rep
        return out

    def audit(self, site: str) -> list[dict]:
        import json

        path = self.root / "cache" / site / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
