"""The privacy boundary (DESIGN.md): inspect every record a site sends in each stage.

May leave a site: model weights, counts, losses, aggregate statistics with a minimum cell count.
Never: images, masks, per-patient rows, signatures or predictions, patient identifiers.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client import client_app
from server.evaluation import signature_auc_queries
from server.pipeline import simulation_sites
from shared.models import initial_states, signature_keys
from shared.records import arrays_to_record, is_local_only, pack_json, states_to_record

from .conftest import node_context

ALLOWED_METRIC = re.compile(r"^(num-examples|train-loss|fit-seconds|(pre|post)_[a-z0-9_]+/(train-loss|n|seconds))$")


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
            else:
                parts.append(str(v))
    return "\n".join(parts)


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
    assert set(info) == {"site", "patients-train", "patients-val", "patients-test"}
    assert all(isinstance(v, int) for k, v in info.items() if k != "site")
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


def test_signatures_stay_on_site_and_stats_replies_are_aggregates(consortium, run_identity) -> None:
    cfg, sites = consortium
    ctx = node_context(0, len(sites))
    arrays = states_to_record(initial_states(cfg))
    msg = Message(RecordDict({"arrays": arrays, "config": _config(cfg, sites)}), dst_node_id=100,
                  message_type="evaluate.signatures")
    reply = client_app.signatures(msg, ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.keys()) == {"metrics", "site"}
    assert list(reply.content["metrics"].keys()) == ["patients-with-signatures"]
    table = pd.read_csv(Path(cfg.cache_root) / "site_a" / "signatures.csv", dtype={"patient_id": str})
    assert set(signature_keys(cfg)) <= set(table.columns)

    # Round 1 of the AUC protocol, as the server would send it, with a disclosure threshold of 3.
    q = signature_auc_queries(["pre_t2w"], {"site_a": "train"}, min_count=3)[0]
    q.splits = ["train", "test"]  # enough patients of each class to pass the threshold
    params = q.protocol.start()
    values = {f"{q.qid}|{k}": v for k, v in params.items()}
    arr = {k: v for k, v in values.items() if isinstance(v, np.ndarray)}
    sca = {k: v for k, v in values.items() if not isinstance(v, np.ndarray)}
    cfg3 = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"min_cell_count": 3})})
    content = RecordDict({"config": _config(cfg3, sites, queries=pack_json({q.qid: q.spec()})),
                          "arrays": arrays_to_record(arr), "metrics": MetricRecord(sca)})
    client_app._CACHE.clear()
    reply = client_app.stats(Message(content, dst_node_id=100, message_type="evaluate.stats"), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    sent_arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    scores = table.loc[table["split"].isin(q.splits), "pre_t2w"].dropna().to_numpy()
    assert any(k.endswith(".count") for k in sent_arrays), "the site should have sent histogram cells"
    for key, a in sent_arrays.items():
        if key.endswith(".count"):
            assert np.all((a == 0) | (a >= 3)), f"{key} has a cell below the minimum count"
        # No per-patient score travels: histogram payloads are integers (bin indices and counts).
        assert a.dtype.kind in "iu", f"{key} carries non-integer values"
        assert not np.isin(scores, a.astype(float)).any()
    assert not any(pid in _all_text(reply) for pid in _patient_ids(cfg, "site_a"))


def test_a_node_without_site_identity_gets_a_clear_error(consortium, run_identity) -> None:
    cfg, _ = consortium
    msg = Message(RecordDict({"config": ConfigRecord({"rectalfl-config": cfg.to_yaml()})}), dst_node_id=1,
                  message_type="query.describe")
    reply = client_app.describe(msg, node_context(0, 1))
    assert reply.has_error()
    assert "--node-config" in reply.error.reason and "data-dir" in reply.error.reason


def test_fusion_stage_keeps_scores_on_site_and_sends_shap_sums(consortium, run_identity) -> None:
    """evaluate.fusion: the site scores its patients and keeps the scores; only SHAP sums and counts leave."""
    from shared.fusion import FusionSVMProtocol, SVMModel, models_to_payload

    cfg, sites = consortium
    ctx = node_context(0, len(sites))
    msg = Message(RecordDict({"arrays": states_to_record(initial_states(cfg)), "config": _config(cfg, sites)}),
                  dst_node_id=100, message_type="evaluate.signatures")
    assert not client_app.signatures(msg, ctx).has_error()
    cols = signature_keys(cfg)
    rng = np.random.default_rng(0)
    model = SVMModel(cols, np.full(len(cols), 0.5), np.full(len(cols), 0.1), rng.normal(size=(len(cols), 16)),
                     rng.uniform(0, 6.28, 16), rng.normal(size=16), 0.1, -1.0, 0.0, 1.0, 0.1)
    arrays, columns = models_to_payload({"FDL": model})
    content = RecordDict({"arrays": arrays_to_record(arrays), "config": _config(cfg, sites,
                                                                                **{"fusion-models": pack_json(columns)})})
    reply = client_app.fusion(Message(content, dst_node_id=100, message_type="evaluate.fusion"), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    sent = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert set(sent) == {"FDL|abs_shap"} and sent["FDL|abs_shap"].shape == (len(cols),)
    assert set(reply.content["metrics"].keys()) == {"FDL|n", "FDL|scored", "FDL|withheld"}
    scores = pd.read_csv(Path(cfg.cache_root) / "site_a" / "fusion_scores.csv", dtype={"patient_id": str})
    assert scores["fusion_FDL"].notna().sum() == reply.content["metrics"]["FDL|scored"] > 0
    text = _all_text(reply)
    assert not any(pid in text for pid in _patient_ids(cfg, "site_a"))
    assert not np.isin(np.round(scores["fusion_FDL"].to_numpy(), 6), np.round(sent["FDL|abs_shap"], 6)).any()

    # one round of the fusion SVM fit: pooled moments only (counts, sums, sums of squares)
    proto = FusionSVMProtocol(len(cols), min_count=1)
    q_values = {f"fit|{k}": v for k, v in proto.start().items()}
    spec = {"fit": {"protocol": proto.name, "columns": cols, "splits": ["train", "val"]}}
    content = RecordDict({"config": _config(cfg, sites, queries=pack_json(spec)),
                          "arrays": arrays_to_record({k: v for k, v in q_values.items() if isinstance(v, np.ndarray)}),
                          "metrics": MetricRecord({k: v for k, v in q_values.items() if not isinstance(v, np.ndarray)})})
    reply = client_app.stats(Message(content, dst_node_id=100, message_type="evaluate.stats"), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert {k.split("|")[1] for k in reply.content["arrays"].keys()} == {"sum", "sumsq"}
    assert all(v.numpy().shape == (len(cols),) for v in reply.content["arrays"].values())
