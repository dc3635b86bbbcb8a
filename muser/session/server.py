"""The server's side of one client's session with one device, without any I/O.

Bytes and fds go in (`receive`); messages go out through the sink; what needs the
loop (awaiting a handler, waiting for the sink to drain, pausing reading, a timer,
closing, logging) is asked of the events object, which reports back (`finish`,
`fail`, `time_out`, `drained`, `tick`). Commands run strictly in arrival order
(posted writes rely on it): one whose handler answers at once is answered at once;
one whose handler awaits holds the ones behind it until it is done.
"""

from __future__ import annotations

import errno
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from muser.device import DisconnectReason, PciDevice
from muser.errors import VfioUserError
from muser.session.base import Session
from muser.session.commands import dispatch
from muser.session.context import Context
from muser.session.deadlines import Deadline, Deadlines
from muser.session.fast import AccessLane
from muser.session.outcome import HandlerCall, Observer, Outcome, Packed, Reply, ServerEvents, Sink
from muser.session.state import ACCEPTING, Lifecycle
from muser.session.waiting import WaitingCommands
from muser.wire import Frame, Layout
from muser.wire.constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    FLAGS_COMMAND,
    FLAGS_ERROR_REPLY,
    FLAGS_POSTED_COMMAND,
    FLAGS_REPLY,
    MESSAGE_OVERHEAD,
    Command,
    command_name,
)
from muser.wire.messages import ACCESS_MESSAGE

SHUTDOWN_GRACE = 5.0
"""Seconds a graceful close waits for the command in progress and its replies to go
out; then the connection is cut, so a stalled client cannot hold shutdown."""

_READY, _BUSY, _CLOSED = Lifecycle.READY, Lifecycle.BUSY, Lifecycle.CLOSED
_SHUTTING_DOWN = Lifecycle.SHUTTING_DOWN
_ENDING = frozenset({Lifecycle.DRAINING, Lifecycle.SHUTTING_DOWN})
_OUTCOMES = (Layout, Reply, Packed)
_unpack_access, _pack_access = ACCESS_MESSAGE.unpack_from, ACCESS_MESSAGE.pack
_REGION_READ, _REGION_WRITE = int(Command.REGION_READ), int(Command.REGION_WRITE)
_LANE_COMMANDS = (_REGION_READ, _REGION_WRITE)
_PLAIN_COMMAND_FLAGS = (FLAGS_COMMAND, FLAGS_POSTED_COMMAND)


@dataclass(frozen=True)
class SessionSettings:
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    negotiation_timeout: float | None = None
    """Seconds from the start to VERSION; None: no limit."""
    message_timeout: float | None = None
    """Seconds a message has to arrive whole once it has begun to; None: no limit."""
    fast_path: bool = True
    """Serve REGION_READ/WRITE by the hot path (`muser.session.fast`) when it can."""


def _access_lane(session: ServerSession, sink: Sink, observer: Observer | None) -> AccessLane:
    """The hot path for a session; with an observer it sends through `send_message`,
    so that the observer sees every message."""
    send, observe = session._send, None
    if observer is not None:
        send, observe = session.send_message, observer.received
    return AccessLane(
        session, session.context, session.device.region_sizes, send=send, sink=sink,
        observe=observe,
    )  # fmt: skip


class ServerSession(Session):
    """One client's session with one device."""

    events: ServerEvents

    def __init__(
        self,
        device: PciDevice,
        sink: Sink,
        events: ServerEvents,
        *,
        settings: SessionSettings,
        clock: Callable[[], float],
        observer: Observer | None = None,
    ) -> None:
        super().__init__(
            sink,
            events,
            max_message_size=settings.max_data_xfer_size + MESSAGE_OVERHEAD,
            clock=clock,
            observer=observer,
        )
        self.settings = settings
        self.context = Context(device, settings.max_data_xfer_size, events.log, self.log_limited)
        self.state = Lifecycle.NEGOTIATING
        self.in_flight: HandlerCall | None = None
        """The command whose handler is being awaited, while one is."""
        self.handling = False
        """Whether a handler is being called now (it may close the server)."""
        self._queue = WaitingCommands()
        self._reading_paused = False
        if settings.fast_path:
            self.data_received = _access_lane(self, sink, observer).receive
        self._deadlines = Deadlines(events.set_timer)
        if settings.negotiation_timeout is not None:
            self._deadlines.set(Deadline.NEGOTIATION, clock() + settings.negotiation_timeout)
        self._completed_at_deadline = 0
        """How many messages had arrived whole when the message deadline was set."""
        self.close_reason: DisconnectReason | None = None
        """Why the session ended, once it has; the first cause wins."""

    @property
    def device(self) -> PciDevice:
        return self.context.device

    @property
    def negotiated(self) -> bool:
        return self.context.peer is not None

    # In

    def receive(self, data: bytes, fds: list[int], fds_lost: bool = False) -> bool:
        """The general path: the framer and the queue; a message left partial starts
        its deadline."""
        super().receive(data, fds, fds_lost)
        timeout = self.settings.message_timeout
        if (
            self.framer.buffered
            and timeout is not None
            and Deadline.MESSAGE not in self._deadlines
        ):
            self._deadlines.set(Deadline.MESSAGE, self.clock() + timeout)
            self._completed_at_deadline = self.framer.completed
        return False

    def answer_handed_back(
        self, frame: Frame, result: Outcome | Awaitable[Outcome] | Exception
    ) -> None:
        """A message the hot path served, answered as `_run_queue` answers one."""
        if isinstance(result, Exception):
            self._refuse(frame, result)
        else:
            self._answer(frame, result)

    def lane_stopped(self) -> None:
        if self.state is _SHUTTING_DOWN and self.in_flight is None:
            self._close(flush=True)

    def _command_received(self, frame: Frame) -> None:
        if self.state not in ACCEPTING:
            frame.close_fds()
            return
        self._queue.append(frame)
        if self._queue.full:
            self._pause_reading()
        if self.state is not _BUSY:
            self._run_queue()

    def _stream_broken(self) -> None:
        """Answer what came before the bad bytes, then close; before negotiation there
        is nothing to answer."""
        self.close_reason = self.close_reason or DisconnectReason.PROTOCOL_ERROR
        if self.state not in (Lifecycle.READY, Lifecycle.BUSY):
            self._close(flush=True)
            return
        self._enter(Lifecycle.DRAINING)
        self._pause_reading()
        if self.in_flight is None:
            self._run_queue()

    # Running commands in order

    def _run_queue(self) -> None:
        """Run queued commands until one awaits, the sink must drain first, or none
        is left."""
        while self._queue and self.state is not _CLOSED:
            if self.sink.backlogged:
                if self.state is _READY:
                    self._enter(_BUSY)
                self.events.wait_for_drain()
                return
            frame = self._queue.popleft()
            self.handling = True
            try:
                result = dispatch(self.context, frame)
            except Exception as exc:
                self._refuse(frame, exc)
                frame.close_fds()
            else:
                if self._answer(frame, result):
                    self.handling = False
                    return
            self.handling = False
            if self.state is Lifecycle.NEGOTIATING:
                self._negotiation_answered()
        self._queue_done()

    def _negotiation_answered(self) -> None:
        """A session that negotiated is READY; one that sent anything else first, or a
        VERSION that was refused, is over."""
        if self.negotiated:
            self._deadlines.clear(Deadline.NEGOTIATION)
            self._enter(_READY)
            self.events.negotiated()
        else:
            self._close(flush=True)

    def _queue_done(self) -> None:
        """Nothing is in flight and nothing queued to run."""
        if self.state is _BUSY:
            self._enter(_READY)
        if self.state in _ENDING:
            self._close(flush=True)
        elif self.state is not _CLOSED and self._reading_paused:
            self._reading_paused = False
            self.events.resume_reading()

    def _answer(self, frame: Frame, result: Outcome | Awaitable[Outcome]) -> bool:
        """Reply with what a handler answered, or start awaiting it (True)."""
        if (
            result is not None
            and not isinstance(result, _OUTCOMES)
            and inspect.isawaitable(result)
        ):
            self.in_flight = call = HandlerCall(frame, result)
            if self.state is _READY:
                self._enter(_BUSY)
            self.events.run(call)
            return True
        try:
            self._reply(frame, result)
        except Exception as exc:
            self._refuse(frame, exc)
        frame.close_fds()
        return False

    # How an awaited handler ended, from the driver

    def finish(self, call: HandlerCall, outcome: Outcome) -> None:
        try:
            self._reply(call.frame, outcome)
        except Exception as exc:
            self._refuse(call.frame, exc)
        self._done(call)

    def fail(self, call: HandlerCall, exc: Exception) -> None:
        self._refuse(call.frame, exc)
        self._done(call)

    def time_out(self, call: HandlerCall, timeout: float | None) -> None:
        """A hung handler: ETIMEDOUT, logged without a traceback (it would only show
        the timeout)."""
        frame = call.frame
        command = command_name(frame.command)
        self.log_limited(
            "error",
            "handler timed out",
            command,
            msg_id=frame.msg_id,
            command=command,
            timeout=timeout,
        )
        if not frame.no_reply:
            self.send(frame.msg_id, frame.command, FLAGS_ERROR_REPLY, error=errno.ETIMEDOUT)
        self._done(call)

    def _done(self, call: HandlerCall) -> None:
        call.frame.close_fds()
        self.in_flight = None
        if self.state is Lifecycle.SHUTTING_DOWN:
            self._close(flush=True)
        elif self.state is not _CLOSED:
            self._run_queue()

    def drained(self) -> None:
        """The sink is no longer backlogged."""
        if self.in_flight is None and self.state is not _CLOSED:
            self._run_queue()

    # Replies

    def _reply(self, frame: Frame, outcome: Outcome) -> None:
        if frame.no_reply:
            return
        if isinstance(outcome, Packed):
            self.send_message((outcome.message,))
        elif isinstance(outcome, Reply):
            self.send(
                frame.msg_id,
                frame.command,
                FLAGS_REPLY,
                outcome.payload.build_parts(),
                fds=outcome.fds,
            )
        else:
            payload = b"" if outcome is None else outcome.build_parts()
            self.send(frame.msg_id, frame.command, FLAGS_REPLY, payload)

    def _refuse(self, frame: Frame, exc: Exception) -> None:
        """An error reply: a VfioUserError's errno, EIO (and a traceback in the log)
        for anything else. A posted command gets none."""
        command = command_name(frame.command)
        if isinstance(exc, VfioUserError):
            code = exc.errno
            self.events.log(
                "debug",
                "command refused",
                msg_id=frame.msg_id,
                command=command,
                errno=errno.errorcode.get(code),
                reason=str(exc),
            )
        else:
            code = errno.EIO
            self.log_limited(
                "error",
                "handler failed",
                (command, type(exc)),
                msg_id=frame.msg_id,
                command=command,
                exc_info=exc,
            )
        if not frame.no_reply:
            self.send(frame.msg_id, frame.command, FLAGS_ERROR_REPLY, error=code)

    def _unexpected_reply(self, frame: Frame) -> None:
        """A reply to nothing we asked: its bytes are already skipped; say EINVAL, as
        libvfio-user does, and keep serving."""
        super()._unexpected_reply(frame)
        self.send(frame.msg_id, frame.command, FLAGS_ERROR_REPLY, error=errno.EINVAL)

    # Ending

    def shut_down(self) -> None:
        """Close gracefully: the command in progress still gets its reply (and the
        replies to requests it makes still arrive), commands not yet started are
        dropped, and the connection closes once its replies are sent, or after
        SHUTDOWN_GRACE seconds at the most."""
        if self.state is _CLOSED or self.state is Lifecycle.SHUTTING_DOWN:
            return
        self.close_reason = self.close_reason or DisconnectReason.SERVER_CLOSING
        self._queue.drop()
        self.context.stopping = True
        if self.in_flight is None and not self.handling:
            self._close(flush=True)
            return
        self._enter(Lifecycle.SHUTTING_DOWN)
        self._deadlines.set(Deadline.GRACE, self.clock() + SHUTDOWN_GRACE)

    def _close(self, *, flush: bool, reason: DisconnectReason | None = None) -> None:
        """Close now, or once the replies are out (`flush`): within SHUTDOWN_GRACE
        seconds all the same, or a client that never reads would hold the close."""
        self.close_reason = self.close_reason or reason
        if self.state is not _CLOSED:
            self._enter(_CLOSED)
        self._queue.drop()
        self._deadlines.clear(Deadline.NEGOTIATION, Deadline.MESSAGE)
        if not flush:
            self._deadlines.clear(Deadline.GRACE)
        elif Deadline.GRACE not in self._deadlines:
            self._deadlines.set(Deadline.GRACE, self.clock() + SHUTDOWN_GRACE)
        self.events.close(flush=flush)

    def connection_lost(self) -> None:
        self.close_reason = self.close_reason or DisconnectReason.CLIENT_LEFT
        super().connection_lost()
        self._queue.drop()
        self._deadlines.clear(*Deadline)

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.events.pause_reading()

    # Deadlines: a client holds its device, so it may not hold it without talking

    def tick(self) -> None:
        """The timer set through the events object is due: act on what is overdue."""
        now = self.clock()
        for deadline in self._deadlines.take_due(now):
            if self.state is _CLOSED and deadline is not Deadline.GRACE:
                continue
            if deadline is Deadline.NEGOTIATION:
                timeout = self.settings.negotiation_timeout
                self.events.log(
                    "warning", "client did not negotiate in time; closing", timeout=timeout
                )
                self._close(flush=False, reason=DisconnectReason.TIMED_OUT)
            elif deadline is Deadline.MESSAGE:
                self._message_overdue(now)
            else:
                self._close(flush=False)
        self._deadlines.rearm()

    def _message_overdue(self, now: float) -> None:
        """Cut a client whose message has not arrived whole in time. If messages
        completed meanwhile, the one now in progress began later and gets a period of
        its own (so a message has between one and two); so does one whose rest is
        unread because the server is not reading."""
        framer, timeout = self.framer, self.settings.message_timeout
        if not framer.buffered or timeout is None:
            return
        if (
            framer.completed != self._completed_at_deadline
            or self._reading_paused
            or self.sink.backlogged
        ):
            self._deadlines.set(Deadline.MESSAGE, now + timeout)
            self._completed_at_deadline = framer.completed
            return
        self.events.log(
            "warning",
            "a message did not arrive whole in time; closing",
            timeout=timeout,
            bytes_held=framer.buffered,
        )
        self._close(flush=False, reason=DisconnectReason.TIMED_OUT)
