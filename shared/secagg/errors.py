"""Exceptions of the secure-aggregation protocol."""

from __future__ import annotations

from collections.abc import Iterable


class SecAggError(RuntimeError):
    """Base class: the protocol cannot go on; the message names the site/session and the reason."""


class SecAggRefused(SecAggError):
    """A site refuses a server message: bad or replayed advert, unknown site, wrong order, expiry."""


class SecAggIntegrityError(SecAggError):
    """The sum a site received does not verify: the server (or the network) altered it."""


class SecAggDropout(SecAggError):
    """Server side: some participants' messages are missing; re-run without them in a fresh session.

    Attributes
    ----------
    missing : tuple of str
        The participants whose message is missing, sorted.
    """

    def __init__(self, missing: Iterable[str], round_name: str, session_id: str | None = None) -> None:
        self.missing = tuple(sorted(missing))
        where = f" of session {session_id!r}" if session_id else ""
        super().__init__(f"secure aggregation{where}: no {round_name} message from "
                         f"{', '.join(self.missing)}; nothing can be unmasked without every participant, "
                         "so re-run the query in a fresh session without "
                         f"{'it' if len(self.missing) == 1 else 'them'}")
