"""``flower-supernode`` with its fixed waits made adaptive: a site answers a busy run's messages promptly.

Flower 1.41's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a fixed 3 s whenever a
pull from the SuperLink finds no message, and polls its own state every 0.5 s for the ClientApp's
reply. During a run the server sends the next message a fraction of a second after the last reply,
so almost every message of a Deployment Engine run waited for most of those 3 s: the fusion analysis
makes dozens of message rounds, each paying it again.

This launcher runs Flower's own ``flower-supernode`` entry point unchanged (same arguments, same
TLS, authentication and isolation) with one difference: those two waits. After a message was
pulled, an empty pull is repeated after ``--busy-poll`` seconds (default 0.2) for ``--busy-for``
seconds (default 120); then the wait grows back (x1.5 per empty pull) to Flower's 3 s, so an idle
node asks the SuperLink no more often than Flower's own. The reply poll becomes 0.05 s (a read of the
node's in-memory state). Nothing else of the SuperNode changes.

It is run by path (``python -P client/supernode_poll.py [flower-supernode arguments]``) and imports
only the standard library and Flower. With a Flower whose loop is not the one described above (no
module-level ``time`` or ``_pull_and_store_message``), it says so and runs the SuperNode unchanged.
"""

from __future__ import annotations

import sys
import time as _time
from typing import Any

IDLE_S = 3.0  # Flower 1.41's sleep after an empty pull
REPLY_POLL_S = 0.5  # Flower 1.41's poll for the ClientApp's reply


class AdaptiveWaits:
    """Stands in for the ``time`` module inside Flower's SuperNode loop; only ``sleep`` differs."""

    def __init__(self, busy_poll_s: float = 0.2, busy_for_s: float = 120.0, reply_poll_s: float = 0.05,
                 clock: Any = _time.monotonic, sleep: Any = _time.sleep) -> None:
        self.busy_poll_s, self.busy_for_s, self.reply_poll_s = busy_poll_s, busy_for_s, reply_poll_s
        self._clock, self._sleep = clock, sleep
        self.last_message: float | None = None
        self._wait = IDLE_S

    def pulled(self, got_message: bool) -> None:
        """Called after every pull from the SuperLink."""
        if got_message:
            self.last_message = self._clock()
            self._wait = self.busy_poll_s

    def idle_wait(self) -> float:
        """How long to wait after an empty pull: short while a run is busy, back to Flower's 3 s when idle."""
        if self.last_message is not None and self._clock() - self.last_message <= self.busy_for_s:
            return self.busy_poll_s
        self._wait = min(IDLE_S, max(self._wait, self.busy_poll_s) * 1.5)
        return self._wait

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_S:
            seconds = self.idle_wait()
        elif seconds == REPLY_POLL_S:
            seconds = self.reply_poll_s
        self._sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def install(waits: AdaptiveWaits, module: Any = None) -> bool:
    """Put ``waits`` into Flower's SuperNode loop; False (nothing changed) if the loop is not the expected one."""
    if module is None:
        import flwr.supernode.start_client_internal as module  # noqa: PLC0415 - only when launching
    pull = getattr(module, "_pull_and_store_message", None)
    if getattr(module, "time", None) is not _time or pull is None:
        return False

    def pull_and_note(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        waits.pulled(run_id is not None)
        return run_id

    module._pull_and_store_message = pull_and_note
    module.time = waits
    return True


def main(argv: list[str]) -> None:
    busy_poll, busy_for = 0.2, 120.0
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--busy-poll":
            busy_poll = float(next(it))
        elif a == "--busy-for":
            busy_for = float(next(it))
        else:
            rest.append(a)
    if not 0.01 <= busy_poll <= IDLE_S:
        sys.exit(f"supernode_poll: --busy-poll must be between 0.01 and {IDLE_S} s, got {busy_poll}")
    if not install(AdaptiveWaits(busy_poll, busy_for)):
        print("[rectalfl] this Flower's SuperNode loop is not the one supernode_poll knows; running it unchanged "
              "(messages wait up to 3 s for the node's next poll)", file=sys.stderr, flush=True)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
