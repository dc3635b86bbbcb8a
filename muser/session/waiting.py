"""Commands received and not yet run, in arrival order, and what they hold."""

from __future__ import annotations

from collections import deque

from muser.session.negotiation import MAX_MSG_FDS
from muser.wire import Frame

MAX_WAITING_BYTES = 8 * 1024 * 1024
"""Above this much waiting payload nothing more is read until the queue shrinks."""
MAX_WAITING_FRAMES = 1024
MAX_WAITING_FDS = 4 * MAX_MSG_FDS
"""Nor while the commands waiting hold more fds than this: they count against the
process's limit."""


class WaitingCommands:
    """A FIFO of frames that knows when it holds too much to read more."""

    def __init__(self) -> None:
        self._frames: deque[Frame] = deque()
        self._bytes = self._fds = 0

    def __bool__(self) -> bool:
        return bool(self._frames)

    def append(self, frame: Frame) -> None:
        self._frames.append(frame)
        self._bytes += len(frame.payload)
        self._fds += len(frame.fds)

    def popleft(self) -> Frame:
        frame = self._frames.popleft()
        self._bytes -= len(frame.payload)
        self._fds -= len(frame.fds)
        return frame

    @property
    def full(self) -> bool:
        return (
            self._bytes > MAX_WAITING_BYTES
            or len(self._frames) > MAX_WAITING_FRAMES
            or self._fds > MAX_WAITING_FDS
        )

    def drop(self) -> None:
        """Forget every frame (closing its fds): they will never run."""
        while self._frames:
            self._frames.popleft().close_fds()
        self._bytes = self._fds = 0
