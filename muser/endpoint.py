"""The asyncio side of a session, for either end: it owns the transport, drives the
session's timer, logs for it, and turns the requests this end sends into awaitables
(a future per msg_id, resolved when the session says the reply arrived)."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import structlog

from muser.errors import ConnectionClosedError, VfioUserError
from muser.session import Observer, Payload, Session
from muser.transport import FdTransport
from muser.wire import Frame
from muser.wire.constants import command_name


def debug_enabled(logger: Any) -> bool:
    """Whether to log every message: only when the application configured structlog
    to keep debug lines (unconfigured structlog prints every level, and a library
    must not fill its user's stdout). Checked once per connection, so per-message
    logging costs nothing when off."""
    if not structlog.is_configured():
        return False
    for name in ("is_enabled_for", "isEnabledFor"):
        check = getattr(logger, name, None)
        if check is not None:
            return bool(check(logging.DEBUG))
    return True


class Recorder(Observer, Protocol):
    """Keeps every message of a session (`muser.recording.WireTrace`)."""

    def close(self) -> None: ...


class MessageObserver:
    """Sees every whole message a session receives and sends: it logs each at debug
    level, and hands it on to a recorder if one is set."""

    def __init__(self, logger: Any, recorder: Recorder | None, *, debug: bool) -> None:
        self._logger = logger
        self._recorder = recorder
        self._debug = debug

    def received(self, frame: Frame) -> None:
        if self._debug:
            self._logger.debug(
                "received",
                msg_id=frame.msg_id,
                command=command_name(frame.command),
                flags=frame.flags,
                size=len(frame.payload),
                fds=len(frame.fds),
            )
        if self._recorder is not None:
            self._recorder.received(frame)

    def sent(self, message: bytes, nfds: int) -> None:
        if self._recorder is not None:
            self._recorder.sent(message, nfds)

    def close(self) -> None:
        if self._recorder is not None:
            self._recorder.close()


class Endpoint:
    """One end's connection on the running loop. Subclasses make `session`, then
    call `_start`."""

    session: Session

    def __init__(self, transport: FdTransport, *, logger: Any) -> None:
        self.transport = transport
        self.logger = logger
        """structlog logger the session's log lines go to (a server binds the client's pid)."""
        self._loop = asyncio.get_running_loop()
        self._requests: dict[int, asyncio.Future[Frame]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._lost = asyncio.Event()

    def observer(self, recorder: Recorder | None) -> MessageObserver | None:
        """What to show every message: None when nobody looks (then it costs nothing)."""
        debug = debug_enabled(self.logger)
        if not debug and recorder is None:
            return None
        return MessageObserver(self.logger, recorder, debug=debug)

    def _start(self) -> None:
        self.transport.start(self.session.data_received, self.connection_lost)

    # What the session asks of us

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def close(self, *, flush: bool = False) -> None:
        """End the connection: at once, or once what is queued has gone (`flush`)."""
        if flush:
            self.transport.close_when_sent()
        else:
            self.transport.close()

    def set_timer(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._timer_due)

    def _timer_due(self) -> None:
        self._timer = None
        self.session.tick()

    def log(self, level: str, event: str, /, **fields: object) -> None:
        getattr(self.logger, level)(event, **fields)

    def reply_arrived(self, msg_id: int, frame: Frame) -> None:
        future = self._requests.pop(msg_id, None)
        if future is None or future.done():
            frame.close_fds()
        else:
            future.set_result(frame)

    # The transport's end

    def connection_lost(self, exc: BaseException | None) -> None:
        self.session.connection_lost()
        for future in self._requests.values():
            if not future.done():
                future.set_exception(ConnectionClosedError("connection lost"))
        self._requests.clear()
        observer = self.session.observer
        if isinstance(observer, MessageObserver):
            observer.close()
        if exc is not None:
            self.logger.info("connection lost", error=str(exc))
        self._lost.set()

    # Requests this end sends

    async def exchange(
        self, command: int, payload: Payload = b"", fds: Sequence[int] = ()
    ) -> Frame:
        """Send a command and return its reply frame as it came, error replies included.

        The caller owns the reply's fds.
        """
        if self.transport.closed:
            raise ConnectionClosedError("connection is closed")
        future: asyncio.Future[Frame] = self._loop.create_future()
        msg_id = self.session.send_request(command, payload, fds)
        self._requests[msg_id] = future
        try:
            return await future
        finally:
            if self._requests.get(msg_id) is future:
                del self._requests[msg_id]
                self.session.forget_request(msg_id)

    async def request(
        self, command: int, payload: Payload = b"", fds: Sequence[int] = ()
    ) -> Frame:
        """Send a command and wait for its reply; an error reply raises VfioUserError."""
        reply = await self.exchange(command, payload, fds)
        if reply.is_error:
            reply.close_fds()
            raise VfioUserError(
                reply.error or errno.EIO, f"{command_name(command)} failed: errno {reply.error}"
            )
        return reply

    def post(self, command: int, payload: Payload = b"", fds: Sequence[int] = ()) -> None:
        """Send a command with NO_REPLY: nothing comes back, not even an error."""
        self.session.send_request(command, payload, fds, posted=True)

    @property
    def is_closed(self) -> bool:
        return self._lost.is_set()

    async def wait_closed(self) -> None:
        await self._lost.wait()
