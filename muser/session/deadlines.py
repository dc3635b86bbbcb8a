"""A session's deadlines, kept as times on its clock, behind the one timer its driver
runs: whichever is due first."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum


class Deadline(Enum):
    NEGOTIATION = "negotiation"
    """VERSION must have come by then."""
    MESSAGE = "message"
    """A message that began to arrive must have arrived whole by then."""
    GRACE = "grace"
    """A graceful close must be over by then."""


class Deadlines:
    """Named times, and the driver's timer set to the earliest of them."""

    def __init__(self, set_timer: Callable[[float | None], None]) -> None:
        self._set_timer = set_timer
        self._times: dict[Deadline, float] = {}
        self._armed: float | None = None
        """What the driver's timer is set to."""

    def __contains__(self, deadline: Deadline) -> bool:
        return deadline in self._times

    def set(self, deadline: Deadline, at: float) -> None:
        self._times[deadline] = at
        self._arm()

    def clear(self, *deadlines: Deadline) -> None:
        for deadline in deadlines:
            self._times.pop(deadline, None)
        self._arm()

    def take_due(self, now: float) -> list[Deadline]:
        """The driver's timer fired: those due by `now`, forgotten, in the enum's
        order. A timer may fire a little early (uvloop rounds to milliseconds), so
        the timer is set again for what is not due yet (call `rearm` after acting)."""
        self._armed = None
        due = [deadline for deadline in Deadline if self._times.get(deadline, now + 1) <= now]
        for deadline in due:
            del self._times[deadline]
        return due

    def rearm(self) -> None:
        self._arm()

    def _arm(self) -> None:
        earliest = min(self._times.values(), default=None)
        if earliest != self._armed:
            self._armed = earliest
            self._set_timer(earliest)
