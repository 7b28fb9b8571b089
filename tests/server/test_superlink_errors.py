"""The ServerApp rides out a SuperLink that answers 500 under load ('database is locked').

Seen on the three-terminal quickstart while the test suite loaded the machine: one failed
``pull-messages`` ended the whole run in the fusion analysis. A pull is now tried again; a push
never is (the SuperLink may hold part of it), and other errors still end the exchange.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server.orchestrator import _ProgressGrid, exchange_riding_out_errors


class FlakyGrid:
    """Push returns ids; pull fails ``fail`` times with ``error``, then returns one reply per pull."""

    def __init__(self, n: int, fail: int, error: str = "Server error '500 Internal Server Error' "
                 "for url 'https://127.0.0.1:9092/v1/runtime/pull-messages'") -> None:
        self.n, self.fail, self.error = n, fail, error
        self.pushes = self.pulls = 0

    def push_messages(self, msgs):
        self.pushes += 1
        return [f"m{i}" for i in range(len(msgs))]

    def pull_messages(self, ids):
        self.pulls += 1
        if self.fail:
            self.fail -= 1
            raise RuntimeError(self.error)
        first = sorted(ids)[0]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=first))]


def test_a_pull_that_fails_with_a_locked_superlink_is_tried_again() -> None:
    grid = FlakyGrid(3, fail=2)
    replies = exchange_riding_out_errors(grid, [object()] * 3, timeout=60, poll_s=0, backoff_s=0)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.pushes == 1 and grid.pulls == 5  # two failures, then one reply per pull


def test_too_many_failures_in_a_row_or_another_error_still_raise() -> None:
    with pytest.raises(RuntimeError, match="500"):
        exchange_riding_out_errors(FlakyGrid(2, fail=5), [object()] * 2, timeout=60, poll_s=0, backoff_s=0, tries=3)
    with pytest.raises(RuntimeError, match="permission denied"):
        exchange_riding_out_errors(FlakyGrid(2, fail=1, error="permission denied"), [object()] * 2, timeout=60,
                                   poll_s=0, backoff_s=0)


def test_missing_replies_end_at_the_timeout() -> None:
    class Silent(FlakyGrid):
        def pull_messages(self, ids):
            self.pulls += 1
            return []

    grid = Silent(2, fail=0)
    assert exchange_riding_out_errors(grid, [object()] * 2, timeout=0.05, poll_s=0.01) == []
    assert grid.pushes == 1 and grid.pulls >= 2


class OwnLoopGrid(FlakyGrid):
    """A grid with its own ``send_and_receive`` (as the simulation's interruptible grid has)."""

    def __init__(self, n: int) -> None:
        super().__init__(n, fail=0)
        self.own = 0

    def send_and_receive(self, msgs, *, timeout=None):
        self.own += 1
        ids = self.push_messages(msgs)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i), has_error=lambda: False) for i in ids]


def test_only_a_network_grid_is_polled_every_3_s(tmp_path, monkeypatch) -> None:
    """The simulation engine's grid keeps its own loop: a statistics exchange is not held to a 3 s poll."""
    import time

    grid = OwnLoopGrid(3)
    view = _ProgressGrid(grid, tmp_path / "progress.json", lambda: "analysis")
    t0 = time.monotonic()
    replies = list(view.send_and_receive([object()] * 3, timeout=60))
    assert len(replies) == 3 and grid.own == 1 and time.monotonic() - t0 < 1.0

    class HttpGrid(FlakyGrid):  # named as Flower's Deployment Engine grid: pulls are ridden out
        pass

    net = HttpGrid(2, fail=1)
    import server.orchestrator as orch

    calls = []
    real = orch.exchange_riding_out_errors
    monkeypatch.setattr(orch, "exchange_riding_out_errors",
                        lambda g, m, t: calls.append(g) or real(g, m, t, poll_s=0, backoff_s=0))
    out = list(_ProgressGrid(net, tmp_path / "p2.json", lambda: "analysis").send_and_receive([object()] * 2,
                                                                                           timeout=60))
    assert calls == [net] and len(out) == 2 and net.pulls == 3  # one failed pull tried again


def test_polls_start_short_and_back_off_to_the_cap(monkeypatch) -> None:
    """A reply that is ready 0.3 s after the push is collected within a fraction of a second (Flower's own
    loop waits a fixed 3 s), and a site that takes long is polled at most every ``poll_max_s``."""
    import server.orchestrator as orch

    clock = {"t": 0.0}
    sleeps: list[float] = []
    monkeypatch.setattr(orch.time, "time", lambda: clock["t"])

    def fake_sleep(s: float) -> None:
        sleeps.append(s)
        clock["t"] += s

    monkeypatch.setattr(orch.time, "sleep", fake_sleep)

    class Late(FlakyGrid):
        def __init__(self, ready_at: float) -> None:
            super().__init__(1, fail=0)
            self.ready_at = ready_at

        def pull_messages(self, ids):
            self.pulls += 1
            if clock["t"] < self.ready_at:
                return []
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids]

    quick = Late(0.3)
    assert len(exchange_riding_out_errors(quick, [object()], timeout=60)) == 1
    assert clock["t"] < 0.6, f"a reply ready at 0.3 s was collected at {clock['t']:.2f} s"

    clock["t"], sleeps[:] = 0.0, []
    slow = Late(20.0)
    assert len(exchange_riding_out_errors(slow, [object()], timeout=60, poll_max_s=1.0)) == 1
    assert max(sleeps) <= 1.0 and 20.0 <= clock["t"] <= 21.0
    assert slow.pulls < 40, f"{slow.pulls} pulls in 20 s: the backoff does not reach its cap"

    clock["t"], sleeps[:] = 0.0, []
    never = Late(1e9)
    assert exchange_riding_out_errors(never, [object()], timeout=5.0) == []
    assert clock["t"] <= 5.0 + 1e-9, "the last wait ran past the timeout"
