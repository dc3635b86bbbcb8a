"""What command handlers answer, and what a session asks of the code that drives it."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol

from muser.wire import Frame, Layout


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply payload that carries file descriptors (still owned by the device)."""

    payload: Layout
    fds: Sequence[int]


@dataclass(frozen=True, slots=True)
class Packed:
    """A whole reply message, header included, packed by the hot path's packers."""

    message: bytes


Outcome = Layout | Reply | Packed | None
"""What a handler answers: a reply payload, one with fds, a packed reply, or None
for a header-only reply."""


@dataclass(slots=True, eq=False)
class HandlerCall:
    """A command whose handler returned an awaitable: the driver awaits it and tells
    the session how it ended (`finish`, `fail` or `time_out`)."""

    frame: Frame
    awaitable: Awaitable[Outcome]


class Receiver(Protocol):
    def __call__(self, data: bytes, fds: list[int], fds_lost: bool = False) -> bool:
        """Take what one receive returned (the fds are now the session's); whether an
        answer went out (had the peer gone, its send failed: no need to look for more)."""


class Sender(Protocol):
    def __call__(self, buffers: Sequence[bytes], fds: Sequence[int] = ()) -> None:
        """Send one message, its buffers in order, with `fds` on its first byte."""


class Sink(Protocol):
    """Where a session's messages go (a transport), and whether it is so full that no
    further command should run until it drains."""

    backlogged: bool

    def send(self, buffers: Sequence[bytes], fds: Sequence[int] = ()) -> None:
        """Send one message, its buffers in order, with `fds` on its first byte."""


class Observer(Protocol):
    """Sees every whole message a session receives and sends (a wire recorder, or
    per-message debug logging)."""

    def received(self, frame: Frame) -> None: ...

    def sent(self, message: bytes, nfds: int) -> None: ...


class SessionEvents(Protocol):
    """What a session asks of whatever drives it (its socket, loop and clock) besides
    sending: all of it called from the session, none of it awaited there."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self, *, flush: bool) -> None:
        """End the connection: once what is queued has gone (`flush`), or now."""

    def set_timer(self, deadline: float | None) -> None:
        """Call the session's `tick` at `deadline` (its clock), instead of any
        earlier request; None for no timer."""

    def log(self, level: str, event: str, /, **fields: object) -> None: ...

    def reply_arrived(self, msg_id: int, frame: Frame) -> None:
        """The reply to a request this end sent with `Session.send_request`."""


class ServerEvents(SessionEvents, Protocol):
    def negotiated(self) -> None:
        """VERSION was agreed: the peer is now the device's client."""

    def run(self, call: HandlerCall) -> None:
        """Await a handler's awaitable, then report how it ended to the session."""

    def wait_for_drain(self) -> None:
        """Call the session's `drained` once the sink is no longer backlogged."""
