"""Helpers to call the ClientApp's handlers in-process, exactly as the Flower runtime would."""

from __future__ import annotations

from flwr.app import Context, RecordDict


def node_context(partition_id: int, n: int) -> Context:
    return Context(run_id=1, node_id=100 + partition_id, node_config={"partition-id": partition_id,
                                                                       "num-partitions": n},
                   state=RecordDict(), run_config={})
