"""The privacy boundary (DESIGN.md): every message type of a tiny run, as Flower calls the ClientApp.

May leave a site: model weights, the number of training patients, losses, split counts of at least
its floor, secure-aggregation messages (signed keys, sealed seeds, masked vectors), and releases that
hold only counts of 0 or >= k. Never: images, masks, per-patient rows, signatures, scores or
predictions, patient identifiers, a site's own sums. The statistics part records everything the
server sees over a whole batch of queries and checks it against every patient value it could hide.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from client import client_app
from server.pipeline import simulation_sites
from shared.models import initial_states, signature_keys
from shared.records import (
    is_local_only,
    pack_json,
    states_to_record,
)

from .node_context import node_context

# steps follow from n, the batch size and the config; norm-stats-local counts backbones, not patients
ALLOWED_METRIC = re.compile(r"^(num-examples|train-loss|fit-seconds|norm-stats-local|"
                            r"(pre|post)_[a-z0-9_]+/(train-loss|n|seconds|steps))$")


def _config(cfg, sites, **extra) -> ConfigRecord:
    return ConfigRecord({"rectalfl-config": cfg.to_yaml(), "sim-sites": pack_json(sites), **extra})


def _all_text(reply: Message) -> str:
    """Every key and every string/number value in the reply, as text."""
    parts = []
    for name, rec in reply.content.items():
        parts.append(name)
        for k, v in rec.items():
            parts.append(k)
            if isinstance(rec, ArrayRecord):
                parts.append(np.array2string(v.numpy(), threshold=10**9))
            elif isinstance(v, bytes):  # packed arrays inside a ConfigRecord: scan their values too
                from shared.wire import unpack_bytes

                parts += [f"{n}\n{np.array2string(a, threshold=10**9)}" for n, a in unpack_bytes(v).items()]
            else:
                parts.append(str(v))
    return "\n".join(parts)


def _reply_arrays(reply: Message):
    """Every array a reply carries: in ArrayRecords, and packed as bytes inside ConfigRecords."""
    from shared.wire import unpack_bytes

    for name, rec in reply.content.items():
        for k, v in rec.items():
            if isinstance(rec, ArrayRecord):
                yield f"{name}/{k}", v.numpy()
            elif isinstance(v, bytes):
                yield from ((f"{name}/{k}/{n}", a) for n, a in unpack_bytes(v).items())


@pytest.fixture
def consortium(tiny_consortium, tmp_path: Path):
    """A private copy of the caches (the handlers write signatures and audit logs there)."""
    cfg = tiny_consortium.model_copy(update={"cache_root": tmp_path / "cache"})
    shutil.copytree(tiny_consortium.cache_root, cfg.cache_root)
    sites, _ = simulation_sites(cfg)
    client_app._CACHE.clear()
    return cfg, sites


def _patient_ids(cfg, site: str) -> list[str]:
    return pd.read_csv(Path(cfg.data_root) / site / "patients.csv", dtype=str)["patient_id"].tolist()


def test_describe_sends_counts_only(consortium, run_identity) -> None:
    cfg, sites = consortium
    msg = Message(RecordDict({"config": _config(cfg, sites)}), dst_node_id=100, message_type="query.describe")
    reply = client_app.describe(msg, node_context(0, len(sites)))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.keys()) == {"info", "site"}
    info = json.loads(reply.content["info"]["info"])
    assert set(info) == {"site", "patients-train", "patients-val", "patients-test", "min-cell-count", "role"}
    k = info["min-cell-count"]
    counts = [v for key, v in info.items() if key.startswith("patients-")]
    assert all(v == -1 or v == 0 or v >= k for v in counts)  # a split below the floor is only "fewer than k"
    assert not any(pid in _all_text(reply) for pid in _patient_ids(cfg, "site_a"))


def test_train_reply_holds_weights_counts_and_losses_only(consortium, run_identity) -> None:
    cfg, sites = consortium
    states = initial_states(cfg)
    content = RecordDict({"arrays": states_to_record(states), "config": _config(cfg, sites, **{"server-round": 1})})
    reply = client_app.train(Message(content, dst_node_id=100, message_type="train"), node_context(0, len(sites)))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.keys()) == {"arrays", "metrics", "site"}
    # Weights: exactly the model's parameter names, same shapes as the global model.
    expected = {f"{k}/{n}": t.shape for k, sd in states.items() for n, t in sd.items() if not is_local_only(n)}
    sent = {k: v.numpy().shape for k, v in reply.content["arrays"].items()}
    assert sent == {k: tuple(s) for k, s in expected.items()}
    # Metrics: an allow-list of aggregate numbers; num-examples is the true training-patient count.
    metrics = reply.content["metrics"]
    assert all(ALLOWED_METRIC.match(k) for k in metrics.keys()), sorted(metrics.keys())
    assert 0 < metrics["num-examples"] <= len(_patient_ids(cfg, "site_a"))
    assert dict(reply.content["site"]) == {"name": "site_a"}
    text = _all_text(reply)
    assert not any(pid in text for pid in _patient_ids(cfg, "site_a"))
    # The site's own audit log records what left.
    audit = [json.loads(x) for x in (Path(cfg.cache_root) / "site_a" / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["message_type"] == "train" and audit[-1]["bytes_out"] > 0


def test_a_node_without_site_identity_gets_a_clear_error(consortium, run_identity) -> None:
    cfg, _ = consortium
    msg = Message(RecordDict({"config": ConfigRecord({"rectalfl-config": cfg.to_yaml()})}), dst_node_id=1,
                  message_type="query.describe")
    reply = client_app.describe(msg, node_context(0, 1))
    assert reply.has_error()
    assert "--node-config" in reply.error.reason and "data-dir" in reply.error.reason


def _ledger_free(cfg) -> None:
    """Fresh per-site statistics state (each test is its own run)."""
    import shutil as _sh

    for s in ("site_a", "site_b", "site_c", "ext"):
        _sh.rmtree(Path(cfg.cache_root) / s / "stats", ignore_errors=True)


def _signatures_everywhere(cfg, sites, run: str) -> None:
    states = states_to_record(initial_states(cfg))
    for i, s in enumerate(sites):
        external = s["name"] == "ext"
        msg = Message(RecordDict({"arrays": states, "config": _config(cfg, sites, external=external,
                                                                      **{"run-id": run})}),
                      dst_node_id=100 + i, message_type="evaluate.signatures")
        reply = client_app.signatures(msg, node_context(i, len(sites)))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert set(reply.content.keys()) == {"metrics", "site"}
        assert list(reply.content["metrics"].keys()) == ["patients-with-signatures"]


def _flower_transport(cfg, sites, run: str, seen: list):
    from shared.wire import pack, pack_bytes, unpack, unpack_bytes

    index = {s["name"]: i for i, s in enumerate(sites)}

    def send(requests):
        out = {}
        for site, req in requests.items():
            text, arrays = pack(req)
            content = RecordDict({"config": _config(cfg, sites, **{"run-id": run, "request": text,
                                                                   "request-arrays": pack_bytes(arrays)})})
            client_app._CACHE.clear()
            reply = client_app.stats(Message(content, dst_node_id=100, message_type="evaluate.stats"),
                                     node_context(index[site], len(sites)))
            seen.append((site, reply))
            if not reply.has_error():
                out[site] = unpack(str(reply.content["reply"]["json"]), unpack_bytes(reply.content["reply"]["arrays"]))
        return out

    return send


def test_statistics_release_only_aggregates_and_hide_every_site_number(consortium, run_identity) -> None:
    """A batch of real queries through the ClientApp: the server's whole view hides every signature value,
    every site's own class counts, and holds no released count in (0, k)."""
    from shared.stats.sc_cohort import CohortSummarySite
    from shared.stats.sc_roc import ROCSite
    from shared.stats_driver import SiteQuery, run_site_queries
    from simulations.sites import prepare_site_policies

    cfg, sites = consortium
    run = "boundary-run"
    external = {"ext"}
    prepare_site_policies(cfg, sites, external)
    _ledger_free(cfg)
    _signatures_everywhere(cfg, sites, run)
    seen: list = []
    train = ["site_a", "site_b", "site_c"]
    keys = signature_keys(cfg)
    qs = [SiteQuery("roc.train", ROCSite(keys), "training", keys, train),
          SiteQuery("n.test", CohortSummarySite(), "internal_test", keys, train)]
    run_site_queries(qs, _flower_transport(cfg, sites, run, seen), run=run, k=3,
                     roles={s["name"]: ("external" if s["name"] in external else "train") for s in sites})
    assert all(q.ok for q in qs), [q.error for q in qs]
    tables = {s: pd.read_csv(Path(cfg.cache_root) / s / "signatures.csv", dtype={"patient_id": str}) for s in train}
    values = np.concatenate([t[keys].to_numpy(float).ravel() for t in tables.values()])
    values = values[np.isfinite(values)]
    own_counts = set()
    for t in tables.values():
        tr = t[t["split"].isin(["train", "val"])]
        own_counts |= {int((tr["label"] == c).sum()) for c in (0, 1)}
    pooled = pd.concat(tables.values())
    pooled_tr = pooled[pooled["split"].isin(["train", "val"])]
    assert qs[0].released["n_pos"] == int((pooled_tr["label"] == 1).sum())  # the release is the pooled cohort
    checked = 0
    for site, reply in seen:
        assert not reply.has_error(), reply.error.reason
        text = _all_text(reply)
        assert not any(pid in text for pid in _patient_ids(cfg, site))
        arrays = list(_reply_arrays(reply))
        checked += sum(a.dtype == np.uint64 for _, a in arrays)
        for key, a in arrays:
            if a.dtype == np.uint64:  # masked vectors: no signature value, no own count in the clear
                as_int = a.view(np.int64)
                # uniform 64-bit values: a small count appears by chance with probability ~1e-14
                assert not np.isin(as_int, list(own_counts)).any(), (site, key)
            else:
                assert not np.isin(np.round(a.astype(float), 6), np.round(values, 6)).any(), (site, key)
    assert checked, "the statistics replies carry masked vectors: none was found to check"
    # every released count is 0 or >= k
    for q in qs:
        for key in ("n_pos", "n_neg"):
            v = q.released.get(key)
            assert v is None or v == 0 or v >= 3


def test_fusion_scores_only_with_models_the_site_derived(consortium, run_identity) -> None:
    """evaluate.fusion with a model the site did not derive (a server-made scoring function) is refused."""
    from shared.fusion import SVMModel, models_to_payload
    from shared.wire import pack_bytes
    from simulations.sites import prepare_site_policies

    cfg, sites = consortium
    prepare_site_policies(cfg, sites, {"ext"})
    run = "fusion-run"
    _ledger_free(cfg)
    _signatures_everywhere(cfg, sites, run)
    cols = signature_keys(cfg)
    rng = np.random.default_rng(0)
    model = SVMModel(cols, np.full(len(cols), 0.5), np.full(len(cols), 0.1), rng.normal(size=(16, len(cols))),
                     rng.uniform(0, 6.28, 16), rng.normal(size=16), 0.1, -1.0, 0.0, 1.0, 0.1)
    arrays, columns = models_to_payload({"FDL": model})
    content = RecordDict({"config": _config(cfg, sites, **{"fusion-models": pack_json(columns), "run-id": run,
                                                           "fusion-arrays": pack_bytes(arrays)})})
    reply = client_app.fusion(Message(content, dst_node_id=100, message_type="evaluate.fusion"),
                              node_context(0, len(sites)))
    assert reply.has_error() and "not derived by this site" in reply.error.reason
    assert not (Path(cfg.cache_root) / "site_a" / "fusion_scores.csv").exists() or \
        "fusion_FDL" not in pd.read_csv(Path(cfg.cache_root) / "site_a" / "fusion_scores.csv").columns
