"""A session's one lifecycle state, and the transitions it may take.

The rules, server side (a client's session is READY until it is CLOSED):

- NEGOTIATING: accepted; only VERSION may come. A good VERSION makes it READY;
  anything else, a bad VERSION, the deadline passing or the peer leaving CLOSES it.
- READY: negotiated and nothing in flight: each command is answered as it comes
  (REGION_READ/WRITE by the hot path). A handler that awaits, or output that must
  drain before the next command, makes it BUSY.
- BUSY: commands wait in arrival order behind the one in flight (or behind the
  output); when it is done and the queue is empty it is READY again.
- DRAINING: the input can no longer be followed (a framing error after
  negotiation): nothing more is read, the commands that came before the damage are
  answered, then it CLOSES.
- SHUTTING_DOWN: the server is closing: the command being handled (a handler that
  closes the server from inside, or one being awaited) finishes and is answered,
  the queue is dropped, then it CLOSES (or when the grace time is over).
- CLOSED: the connection is gone; nothing leaves it.

A session closes directly from any state when its peer leaves or a deadline cuts
it off.
"""

from __future__ import annotations

from enum import Enum


class Lifecycle(Enum):
    NEGOTIATING = "negotiating"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    SHUTTING_DOWN = "shutting down"
    CLOSED = "closed"


_ = Lifecycle
TRANSITIONS: dict[Lifecycle, frozenset[Lifecycle]] = {
    _.NEGOTIATING: frozenset({_.READY, _.SHUTTING_DOWN, _.CLOSED}),
    _.READY: frozenset({_.BUSY, _.DRAINING, _.SHUTTING_DOWN, _.CLOSED}),
    _.BUSY: frozenset({_.READY, _.DRAINING, _.SHUTTING_DOWN, _.CLOSED}),
    _.DRAINING: frozenset({_.SHUTTING_DOWN, _.CLOSED}),
    _.SHUTTING_DOWN: frozenset({_.CLOSED}),
    _.CLOSED: frozenset(),
}
"""From each state, the states it may go to next."""

ACCEPTING = frozenset({_.NEGOTIATING, _.READY, _.BUSY})
"""States in which newly received commands are taken (run or queued)."""


class LifecycleError(RuntimeError):
    """A transition the table does not allow: a bug in muser, never the peer's doing."""


def check_transition(old: Lifecycle, new: Lifecycle) -> None:
    if new not in TRANSITIONS[old]:
        raise LifecycleError(f"a session cannot go from {old.name} to {new.name}")
