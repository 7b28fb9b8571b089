"""Helpers to call the ClientApp's handlers in-process, exactly as the Flower runtime would."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict


@pytest.fixture
def run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are built inside a run; give this test process a run identity."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def node_context(partition_id: int, n: int) -> Context:
    return Context(run_id=1, node_id=100 + partition_id, node_config={"partition-id": partition_id,
                                                                       "num-partitions": n},
                   state=RecordDict(), run_config={})
