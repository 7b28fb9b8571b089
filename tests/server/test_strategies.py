"""Flower's strategies (FedAvg, FedProx, FedAdam) as the orchestrator configures them, on real backbone records."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from shared.records import arrays_to_record


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_every_strategy_aggregates_real_backbone_records(strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from server.orchestrator import _SubsetGrid, cast_like, make_strategy
    from shared.config import parse_config
    from shared.models import initial_states, models_from_states
    from shared.records import record_to_states, states_to_record

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    cfg = parse_config({"data": {"sequences": ["t2w"], "timepoints": ["pre"]}, "preprocess": {"slice_size": 32},
                        "train": {"backbone": "densenet_tiny"}, "federation": {"strategy": strategy}})
    start = states_to_record(initial_states(cfg))

    class _Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    strat = make_strategy(cfg, 2)
    for rnd in (1, 2):  # two rounds: FedAdam keeps server state between them
        msgs = list(strat.configure_train(rnd, start, ConfigRecord({}), _SubsetGrid(_Grid(), [1, 2])))
        assert len(msgs) == 2
        replies = []
        for i, n in enumerate((10, 30)):
            moved = {k: v.numpy() + (i + 1) * 0.01 for k, v in start.items()}
            replies.append(Message(RecordDict({"arrays": arrays_to_record(moved),
                                               "metrics": MetricRecord({"num-examples": n})}),
                                   dst_node_id=i + 1, message_type="train"))
        agg, _ = strat.aggregate_train(rnd, replies)
        start = cast_like(agg, start)
    models = models_from_states(cfg, record_to_states(start))  # the result loads into the network
    assert set(models) == {"pre_t2w"}
    assert all(v.numpy().dtype == np.float32 for v in start.values())


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_the_revealed_secure_mean_aggregates_like_the_sites_own_replies(strategy: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """federation.secure_aggregation hands the strategy one reply (the weighted mean, weight N) instead of
    the sites' replies: every strategy must give the same model from it, FedAdam's server state included."""
    from flwr.supercore.task_identity import TaskIdentity

    from server.orchestrator import _SubsetGrid, _SumReply, make_strategy
    from shared.config import parse_config

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    cfg = parse_config({"federation": {"strategy": strategy}})
    rng = np.random.default_rng(0)
    start = arrays_to_record({"w": rng.normal(size=20).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)})

    class _Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2, 3]

    plain, secure = make_strategy(cfg, 3), make_strategy(cfg, 3)
    cur_p = cur_s = start
    for rnd in (1, 2):
        list(plain.configure_train(rnd, cur_p, ConfigRecord({}), _SubsetGrid(_Grid(), [1, 2, 3])))
        list(secure.configure_train(rnd, cur_s, ConfigRecord({}), _SubsetGrid(_Grid(), [1, 2, 3])))
        ns = (10, 30, 7)
        sites = [{k: v.numpy() + rng.normal(0, 0.05, v.numpy().shape).astype(np.float32) for k, v in cur_p.items()}
                 for _ in ns]
        replies = [Message(RecordDict({"arrays": arrays_to_record(a), "metrics": MetricRecord({"num-examples": n})}),
                           dst_node_id=i + 1, message_type="train") for i, (a, n) in enumerate(zip(sites, ns, strict=True))]
        mean = {k: sum(n * a[k].astype(np.float64) for a, n in zip(sites, ns, strict=True)) / sum(ns) for k in sites[0]}
        cur_p, _ = plain.aggregate_train(rnd, replies)
        cur_s, _ = secure.aggregate_train(rnd, [_SumReply(arrays_to_record(mean), sum(ns), replies[0])])
        for k in cur_p:
            np.testing.assert_allclose(cur_s[k].numpy(), cur_p[k].numpy(), rtol=1e-5, atol=1e-6)
