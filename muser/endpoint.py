"""What both ends of a vfio-user connection share: framing, message ids, and the
requests this end sent, matched with their replies.

The server uses it for its DMA_READ/DMA_WRITE requests, the client for all of
its commands. Replies are matched as soon as they arrive, never behind queued
commands, so a reply can't be stuck waiting for the command it is needed by.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Sequence
from typing import Any, Protocol

import structlog

from muser.errors import ConnectionClosedError, VfioUserError
from muser.transport import FdTransport
from muser.wire import Frame, Framer, FramingError, encode_header
from muser.wire.constants import (
    FLAGS_COMMAND,
    FLAGS_POSTED_COMMAND,
    FLAGS_REPLY,
    HEADER_SIZE,
    MESSAGE_TYPE_MASK,
    command_name,
)
from muser.wire.messages import HEADER_CODEC

_MSG_ID_MODULUS = 1 << 16

Payload = bytes | tuple[bytes, ...]
"""A message's payload: its bytes, or parts sent back to back without joining
them (`Layout.build_parts`), so that bulk data is not copied into a new buffer."""


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


class WireRecorder(Protocol):
    """Sees every whole message an endpoint receives and sends (see `muser.trace`)."""

    def received(self, frame: Frame) -> None: ...

    def sent(self, message: bytes, nfds: int) -> None: ...

    def close(self) -> None: ...


class Endpoint:
    """One side of a connected vfio-user socket."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_message_size: int,
        max_receive_fds: int,
        logger: Any,
        recorder: WireRecorder | None = None,
        read_while_backlogged: bool = True,
    ) -> None:
        self.log = logger
        self._debug = debug_enabled(logger)
        self._recorder = recorder
        """Off (None) unless tracing: one test per message is all it costs then."""
        self._framer = Framer(max_message_size)
        self._requests: dict[int, tuple[int, asyncio.Future[Frame]]] = {}
        self._next_msg_id = 0
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport = FdTransport(
            sock,
            self,
            max_receive_fds=max_receive_fds,
            read_while_backlogged=read_while_backlogged,
        )

    # Transport callbacks

    def data_received(self, data: bytes, fds: list[int], fds_lost: bool = False) -> bool:
        """Frame what arrived and take each message; whether an answer went out is
        not followed here (False), so the transport looks for more itself."""
        framer = self._framer
        if (
            not fds
            and not fds_lost
            and not framer.buffered
            and len(data) >= HEADER_SIZE
            and not self._debug
            and self._recorder is None
        ):
            # One whole message, as a peer waiting on each answer sends them: taken
            # without the framer, whose header checks these are.
            msg_id, command, size, flags, error = HEADER_CODEC.unpack_from(data)
            if size == len(data) <= framer.max_message_size:
                message_type = flags & MESSAGE_TYPE_MASK
                if message_type == FLAGS_REPLY:
                    self._reply_received(Frame(msg_id, command, flags, error, data[HEADER_SIZE:]))
                    return False
                if message_type == FLAGS_COMMAND:
                    self._command_received(
                        Frame(msg_id, command, flags, error, data[HEADER_SIZE:])
                    )
                    return False
        try:
            frames = self._framer.feed(data, fds, fds_lost=fds_lost)
            broken: FramingError | None = None
        except FramingError as exc:
            frames, broken = exc.frames, exc
        for frame in frames:
            if self._debug:
                self.log.debug(
                    "received",
                    msg_id=frame.msg_id,
                    command=command_name(frame.command),
                    flags=frame.flags,
                    size=len(frame.payload),
                    fds=len(frame.fds),
                )
            if self._recorder is not None:
                self._recorder.received(frame)
            if frame.is_reply:
                self._reply_received(frame)
            else:
                self._command_received(frame)
        if broken is not None:
            self.log.warning("protocol violation; closing the connection", error=str(broken))
            self._stream_broken()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._framer.close()
        for _command, future in self._requests.values():
            if not future.done():
                future.set_exception(ConnectionClosedError("connection lost"))
        self._requests.clear()
        if self._recorder is not None:
            self._recorder.close()
        if exc is not None:
            self.log.info("connection lost", error=str(exc))
        if not self._lost.done():
            self._lost.set_result(None)

    # What each side does with what arrives

    def _command_received(self, frame: Frame) -> None:
        raise NotImplementedError

    def _unexpected_reply(self, frame: Frame) -> None:
        self.log.warning(
            "unexpected reply", msg_id=frame.msg_id, command=command_name(frame.command)
        )
        frame.close_fds()

    def _stream_broken(self) -> None:
        self.transport.close()

    def _reply_received(self, frame: Frame) -> None:
        entry = self._requests.get(frame.msg_id)
        if entry is None or entry[0] != frame.command:
            self._unexpected_reply(frame)
            return
        del self._requests[frame.msg_id]
        future = entry[1]
        if future.done():
            frame.close_fds()
        else:
            future.set_result(frame)

    # Sending

    def send(
        self,
        msg_id: int,
        command: int,
        flags: int,
        payload: Payload = b"",
        fds: Sequence[int] = (),
        *,
        error: int = 0,
    ) -> None:
        if not isinstance(payload, tuple):  # one buffer: bytes, or any bytes-like
            if type(payload) is not bytes:
                payload = bytes(payload)  # len() of a view counts items, not bytes
            header = encode_header(msg_id, command, len(payload), flags, error)
            buffers: tuple[bytes, ...] = (header, payload) if payload else (header,)
        else:
            header = encode_header(msg_id, command, sum(map(len, payload)), flags, error)
            buffers = (header, *payload)
        self.transport.send(buffers, fds)
        if self._recorder is not None:
            self._recorder.sent(b"".join(buffers), len(fds))

    def _allocate_msg_id(self) -> int:
        msg_id = self._next_msg_id
        while msg_id in self._requests:
            msg_id = (msg_id + 1) % _MSG_ID_MODULUS
        self._next_msg_id = (msg_id + 1) % _MSG_ID_MODULUS
        return msg_id

    async def exchange(
        self, command: int, payload: Payload = b"", fds: Sequence[int] = ()
    ) -> Frame:
        """Send a command and return its reply frame as it came, error replies included.

        The caller owns the reply's fds.
        """
        msg_id = self._allocate_msg_id()
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._requests[msg_id] = (command, future)
        try:
            self.send(msg_id, command, FLAGS_COMMAND, payload, fds)
            return await future
        finally:
            entry = self._requests.get(msg_id)
            if entry is not None and entry[1] is future:
                del self._requests[msg_id]

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
        self.send(
            self._allocate_msg_id(),
            command,
            FLAGS_POSTED_COMMAND,
            payload,
            fds,
        )

    @property
    def is_closed(self) -> bool:
        return self._lost.done()

    def close(self) -> None:
        self.transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._lost)
