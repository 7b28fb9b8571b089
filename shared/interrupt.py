"""Stopping a long command cleanly on Ctrl-C (SIGINT) or ``kill`` (SIGTERM).

Every long command (``simulate``, ``demo``, ``synth``, ``site preprocess``) runs with
:func:`raise_on_signals` installed, so both signals raise :class:`Interrupted` in the main thread at
the next Python instruction: the code in flight unwinds through its ``finally`` blocks (the run
record marks the stage and the run ``interrupted``, a cache keeps every finished volume) and the
command prints what was done and the command that continues.

Code that waits in other threads (the in-process Flower simulation) installs its own handlers
with :func:`handle_signals` and asks its threads to stop at a safe point instead.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The user stopped the command (Ctrl-C = SIGINT, or SIGTERM).

    A ``KeyboardInterrupt``, so code that already cleans up on Ctrl-C does the same for SIGTERM.

    Parameters
    ----------
    signal_name : str
        ``"SIGINT"`` or ``"SIGTERM"``.

    Attributes
    ----------
    signal_name : str
    run_dir : pathlib.Path or None
        Set by a run that recorded the interruption in its run directory.
    """

    def __init__(self, signal_name: str = "SIGINT") -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name = signal_name
        self.run_dir = None

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return type(self), (self.signal_name,)


def signal_name(signum: int) -> str:
    """``"SIGINT"`` for ``signal.SIGINT``, ..."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal_name(signum))


@contextlib.contextmanager
def handle_signals(handler: Callable[[int, FrameType | None], object],
                   signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Install ``handler`` for ``signals`` inside the block and restore the previous handlers after.

    Does nothing outside the main thread (Python delivers signals to the main thread only).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def raise_on_signals() -> None:
    """From now on SIGINT and SIGTERM raise :class:`Interrupted` in the main thread."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _raise)


@contextlib.contextmanager
def sigint_held_from_children() -> Iterator[None]:
    """Start worker processes inside the block with SIGINT ignored, and hold the parent's Ctrl-C.

    SIGINT is blocked and its disposition set to ``SIG_IGN`` while the block runs: a spawned worker
    (fork + exec) inherits the ignored disposition, and Python then never installs its
    KeyboardInterrupt handler there, so a Ctrl-C that reaches the whole process group while the
    worker is still importing never raises (and prints) in it. A Ctrl-C arriving during the block
    stays pending (Linux never discards a blocked signal) and reaches the parent, with its own
    handler restored, as soon as the block ends. Use around creating a pool and submitting its work.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def ignore_in_worker() -> None:
    """For worker processes of a pool: leave SIGINT to the parent, which stops the pool in order.

    A terminal's Ctrl-C reaches every process of the foreground group; a worker that raised on it
    would print its own traceback and break the pool mid-task.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
