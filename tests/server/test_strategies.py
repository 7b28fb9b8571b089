"""Flower's strategies (FedAvg, FedProx, FedAdam, FedAvgM) as the orchestrator configures them, on real backbone records."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from shared.records import arrays_to_record


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "fedavgm"])
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


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "fedavgm"])
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


def _buffer_round(strategy: str, monkeypatch: pytest.MonkeyPatch, **fed):
    from flwr.supercore.task_identity import TaskIdentity

    from server.orchestrator import _SubsetGrid, make_strategy
    from shared.config import parse_config

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    cfg = parse_config({"federation": {"strategy": strategy, **fed}})
    start = {"b/w": np.zeros(4, np.float32), "b/bn.running_mean": np.zeros(3, np.float32),
             "b/bn.running_var": np.ones(3, np.float32)}

    class _Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    strat = make_strategy(cfg, 2)
    cur = arrays_to_record(start)
    history = []
    for rnd in (1, 2, 3):
        list(strat.configure_train(rnd, cur, ConfigRecord({}), _SubsetGrid(_Grid(), [1, 2])))
        sites = [{"b/w": cur["b/w"].numpy() + 0.1, "b/bn.running_mean": np.full(3, m, np.float32),
                  "b/bn.running_var": np.full(3, v, np.float32)} for m, v in ((2.0, 4.0), (6.0, 8.0))]
        replies = [Message(RecordDict({"arrays": arrays_to_record(a), "metrics": MetricRecord({"num-examples": n})}),
                           dst_node_id=i + 1, message_type="train") for i, (a, n) in enumerate(zip(sites, (10, 30), strict=True))]
        cur, _ = strat.aggregate_train(rnd, replies)
        history.append({k: v.numpy().copy() for k, v in cur.items()})
    return strat, history


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm"])
def test_server_optimisers_step_the_weights_and_average_the_normalisation_buffers(strategy, monkeypatch) -> None:
    """A running mean/variance is the weighted mean of the sites' (5 = (10*2 + 30*6)/40 and 7), every
    round, while the weights take the optimiser's step (not the plain mean)."""
    _, history = _buffer_round(strategy, monkeypatch)
    for h in history:
        np.testing.assert_allclose(h["b/bn.running_mean"], 5.0, rtol=0, atol=1e-6)
        np.testing.assert_allclose(h["b/bn.running_var"], 7.0, rtol=0, atol=1e-6)
    w = [float(h["b/w"][0]) for h in history]
    if strategy == "fedavgm":  # lr 1, momentum 0.9: steps of 0.1, 0.19, 0.271 (pseudo-gradients accumulate)
        np.testing.assert_allclose(np.diff([0.0, *w]), [0.1, 0.19, 0.271], atol=1e-5)
    else:  # Adam's first steps are about eta (0.01) whatever the update's size
        assert all(abs(d - 0.01) < 0.005 for d in np.diff([0.0, *w]))


def test_fedadam_settings_reach_flower_and_bad_betas_are_config_errors(monkeypatch) -> None:
    from shared.config import ConfigError, parse_config

    strat, _ = _buffer_round("fedadam", monkeypatch, server_tau=0.05, server_betas=[0.5, 0.9], server_lr=0.1)
    assert (strat.tau, strat.beta_1, strat.beta_2, strat.eta) == (0.05, 0.5, 0.9, 0.1)
    with pytest.raises((ConfigError, ValueError), match="betas"):
        parse_config({"federation": {"server_betas": [0.9, 1.0]}})


def test_fedavgm_momentum_survives_a_checkpoint(monkeypatch) -> None:
    """strategy_state / load_strategy_state: a resumed FedAvgM continues with the same momentum."""
    from server.orchestrator import load_strategy_state, make_strategy, strategy_state
    from shared.config import parse_config

    strat, _ = _buffer_round("fedavgm", monkeypatch)
    state = strategy_state(strat)
    assert {k for k in state if k.startswith("momentum::")} == {"momentum::b/w", "momentum::b/bn.running_mean",
                                                                 "momentum::b/bn.running_var"}
    fresh = make_strategy(parse_config({"federation": {"strategy": "fedavgm"}}), 2)
    load_strategy_state(fresh, state)
    for a, b in zip(fresh.momentum_vector, strat.momentum_vector, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm"])
def test_buffers_are_averaged_when_the_weights_travel_packed(strategy, monkeypatch) -> None:
    """The orchestrator packs the weights into one flat array per dtype; the buffers are found through the
    layout (found missing: with packed weights FedAvgM stepped running variances below zero, so every
    signature of the demo was NaN)."""
    from flwr.supercore.task_identity import TaskIdentity

    from server.orchestrator import _SubsetGrid, make_strategy
    from shared.config import parse_config
    from shared.records import pack_arrays, unpack_arrays

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    strat = make_strategy(parse_config({"federation": {"strategy": strategy}}), 2)
    cur = {"b/w": np.zeros(4, np.float32), "b/bn.running_mean": np.zeros(3, np.float32),
           "b/bn.running_var": np.ones(3, np.float32)}

    class _Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    for rnd in (1, 2, 3):
        packed, layout = pack_arrays(cur)
        list(strat.configure_train(rnd, packed, ConfigRecord({}), _SubsetGrid(_Grid(), [1, 2])))
        sites = [{"b/w": cur["b/w"] + 0.5, "b/bn.running_mean": np.full(3, m, np.float32),
                  "b/bn.running_var": np.full(3, v, np.float32)} for m, v in ((2.0, 0.1), (6.0, 0.3))]
        replies = [Message(RecordDict({"arrays": pack_arrays(a, layout)[0], "metrics": MetricRecord({"num-examples": n})}),
                           dst_node_id=i + 1, message_type="train") for i, (a, n) in enumerate(zip(sites, (10, 30), strict=True))]
        strat.layout = layout
        new, _ = strat.aggregate_train(rnd, replies)
        cur = {k: np.asarray(v, np.float32) for k, v in unpack_arrays(new, layout).items()}
        np.testing.assert_allclose(cur["b/bn.running_mean"], 5.0, atol=1e-6)
        np.testing.assert_allclose(cur["b/bn.running_var"], 0.25, atol=1e-6)  # never stepped below zero
    assert float(cur["b/w"][0]) > 0.02  # the weights did take the optimiser's steps (FedAdam: ~eta a round)
