"""Repeated log lines from one client, held back: a client that repeats a bad
message must not turn each of its bytes into many bytes of log."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

DEFAULT_INTERVAL = 10.0
"""Seconds between two lines of the same kind."""
MAX_KINDS = 256
"""Kinds tracked separately; any beyond share one, so the table stays small
whatever a client makes up."""
_OTHER = "other"


class LogLimiter:
    """Lets the first line of each kind through, then at most one per `interval`
    seconds, counting the ones held back in between. The clock is passed in."""

    def __init__(
        self, interval: float = DEFAULT_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._kinds: dict[tuple[str, Hashable], tuple[float, int]] = {}
        """Per (event, kind): when its next line may go out, how many were held back."""

    def allow(self, event: str, kind: Hashable = None) -> int | None:
        """None to hold this line back; else how many lines of its event and kind were
        held back since the last one let through (0 for the first)."""
        now = self._clock()
        key = (event, kind)
        if key not in self._kinds and len(self._kinds) >= MAX_KINDS:
            key = (event, _OTHER)
        entry = self._kinds.get(key)
        if entry is not None and now < entry[0]:
            self._kinds[key] = (entry[0], entry[1] + 1)
            return None
        self._kinds[key] = (now + self.interval, 0)
        return 0 if entry is None else entry[1]

    def held_back(self) -> dict[str, int]:
        """Per event, the lines held back since the last let through: for a last word
        when the client leaves."""
        totals: dict[str, int] = {}
        for (event, _kind), (_until, held) in self._kinds.items():
            if held:
                totals[event] = totals.get(event, 0) + held
        return totals
