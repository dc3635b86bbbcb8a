"""Sans-IO framing: bytes and file descriptors in, complete frames out.

The header is checked (message type, `16 <= size <= max_message_size`) as soon as
its 16 bytes are there, before any payload is buffered, so a client can make us
hold at most one bounded message. File descriptors belong to the message whose
header they arrived with: the kernel hands them over with the first bytes of the
`sendmsg` that carried them, and a vfio-user peer sends each message, fds
included, with one `sendmsg`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from muser.errors import ProtocolError
from muser.wire.constants import (
    ERROR_BIT,
    FLAGS_COMMAND,
    FLAGS_REPLY,
    HEADER_SIZE,
    MESSAGE_TYPE_MASK,
    NO_REPLY_BIT,
)
from muser.wire.messages import HEADER_CODEC as _HEADER


def close_fds(fds: Iterable[int]) -> None:
    """Close descriptors that nobody took ownership of."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def gather_piece(
    pieces: MutableSequence[bytes | bytearray | memoryview],
    piece: bytes | memoryview,
    small_below: int,
) -> None:
    """Append `piece`, which must not change, to bytes held as pieces: as it is if it
    is large, copied into the last gathered buffer if it is small, so that many tiny
    pieces cost one object, not one each."""
    if len(piece) >= small_below:
        pieces.append(piece)
    elif pieces and type(pieces[-1]) is bytearray:
        pieces[-1] += piece
    else:
        pieces.append(bytearray(piece))


@dataclass(slots=True, eq=False)
class Frame:
    """One complete message. Whoever holds the frame owns its `fds`: take them with
    `take_fds` or let `close_fds` close them."""

    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[int] = field(default_factory=list)
    fds_lost: bool = False
    """Some of the fds sent with the message never arrived: this process had no
    descriptors left to receive them (the kernel reports EMFILE as truncation)."""

    @property
    def is_reply(self) -> bool:
        return self.flags & MESSAGE_TYPE_MASK == FLAGS_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & NO_REPLY_BIT)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & ERROR_BIT)

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        if self.fds:  # most frames carry none
            close_fds(self.take_fds())

    def encode(self) -> bytes:
        """The frame as it would go over the wire, fds aside."""
        return (
            encode_header(self.msg_id, self.command, len(self.payload), self.flags, self.error)
            + self.payload
        )


class FramingError(ProtocolError):
    """The byte stream cannot be followed any more; the connection must close.

    `frames` holds the complete messages that came before the bad one in the same
    input, so that they are still processed in order.
    """

    def __init__(self, message: str, frames: list[Frame]) -> None:
        super().__init__(message)
        self.frames = frames


GATHER_FROM = 64 * 1024
"""A message at least this large that arrives over several receives is kept as
the received pieces and joined once, when whole, instead of being appended to a
growing buffer and then copied out: megabytes of DMA or migration data are
copied once instead of twice."""
_SMALL_PIECE = 4096
"""Pieces smaller than this are gathered into one buffer, not kept one by one: a
client sending a large message a few bytes at a time must not make us hold an
object per receive."""


def encode_header(
    msg_id: int, command: int, payload_size: int, flags: int, error: int = 0
) -> bytes:
    return _HEADER.pack(msg_id, command, HEADER_SIZE + payload_size, flags, error)


class Framer:
    """Split a vfio-user byte stream into frames, without doing any I/O."""

    __slots__ = (
        "_buffer",
        "_gathered",
        "_gathering",
        "_missing",
        "_pending_fds",
        "_pending_fds_lost",
        "buffered",
        "completed",
        "max_message_size",
    )

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self.buffered = 0
        """Bytes of an incomplete message held so far (read only)."""
        self.completed = 0
        """Messages framed whole so far (read only): whether the one in progress has
        changed can be told from it."""
        self._pending_fds: list[int] = []
        self._pending_fds_lost = False
        self._gathering: tuple[int, int, int, int] | None = None
        """The header (msg_id, command, flags, error) of a large message whose
        payload is being gathered piece by piece."""
        self._gathered: list[bytes | bytearray | memoryview] = []
        self._missing = 0
        """Payload bytes of that message still to come."""

    def feed(self, data: bytes, fds: Sequence[int] = (), *, fds_lost: bool = False) -> list[Frame]:
        """Take what one receive returned; return the messages it completed.

        Takes ownership of `fds`; `fds_lost` says more were sent with them than
        arrived, and marks their message. Raises FramingError (after closing every fd
        it holds) when the stream is broken: a bad header, or fds that arrived with
        payload bytes only.
        """
        if self._gathering is not None:
            return self._gather(data, fds, fds_lost)
        frames: list[Frame] = []
        held = self._buffer
        first_new = len(held)
        if held:
            held += data
            source: bytes | bytearray = held
        else:
            source = data
        total = len(source)
        position = 0
        fds_owner: Frame | None = None
        fds_to_pending = False
        view = memoryview(source)
        try:
            while position < total:
                starts_here = position >= first_new
                if total - position < HEADER_SIZE:
                    fds_to_pending = fds_to_pending or starts_here
                    break
                msg_id, command, size, flags, error = _HEADER.unpack_from(source, position)
                self._check_header(size, flags)
                if total - position < size:
                    fds_to_pending = fds_to_pending or starts_here
                    if size >= GATHER_FROM:
                        start = position + HEADER_SIZE
                        # received bytes never change, so a view will do; the held
                        # buffer is reused, so its bytes are copied
                        first = bytes(view[start:]) if held else memoryview(data)[start:]
                        self._gather_from((msg_id, command, flags, error), first, size)
                        position = total
                    break
                payload = bytes(view[position + HEADER_SIZE : position + size])
                frame = Frame(msg_id, command, flags, error, payload)
                if self._pending_fds or self._pending_fds_lost:
                    self._give_pending_fds(frame)
                if starts_here:
                    fds_owner = frame
                frames.append(frame)
                position += size
        except ProtocolError as exc:
            close_fds(fds)
            self.close()
            raise FramingError(str(exc), frames) from None
        finally:
            view.release()  # the held buffer must stay resizable for the next feed
        self._hold(source, position, was_held=bool(held))
        self.completed += len(frames)
        if fds or fds_lost:
            self._attribute_fds(fds, fds_lost, frames, fds_owner, to_pending=fds_to_pending)
        return frames

    def _give_pending_fds(self, frame: Frame) -> None:
        frame.fds, frame.fds_lost = self._pending_fds, self._pending_fds_lost
        self._pending_fds, self._pending_fds_lost = [], False

    def _hold(self, source: bytes | bytearray, position: int, *, was_held: bool) -> None:
        """Keep what follows the last whole message, unless it is being gathered."""
        if position:
            self._buffer = bytearray(source[position:])
        elif not was_held:
            self._buffer = bytearray(source)
        self.buffered = len(self._buffer)
        if self._gathering is not None:
            self.buffered = HEADER_SIZE + len(self._gathered[0])

    def _gather_from(
        self, header: tuple[int, int, int, int], first: bytes | memoryview, size: int
    ) -> None:
        """Start gathering a large message from the first bytes of its payload."""
        self._gathering = header
        self._gathered = [first]
        self._missing = size - HEADER_SIZE - len(first)

    def _gather(self, data: bytes, fds: Sequence[int], fds_lost: bool) -> list[Frame]:
        """Take the next piece of a large message; once it is whole, frame it and
        read on in what followed it."""
        missing = self._missing
        if (fds or fds_lost) and len(data) <= missing:
            self._refuse_body_fds(fds, [])
        if len(data) < missing:
            gather_piece(self._gathered, data, _SMALL_PIECE)
            self._missing -= len(data)
            self.buffered += len(data)
            return []
        header = self._gathering
        assert header is not None
        piece = data if len(data) == missing else memoryview(data)[:missing]
        gather_piece(self._gathered, piece, _SMALL_PIECE)
        frame = Frame(*header, b"".join(self._gathered))
        self._give_pending_fds(frame)
        self._gathering, self._gathered, self._missing = None, [], 0
        self.buffered = 0
        self.completed += 1
        if len(data) == missing:
            return [frame]
        try:
            return [frame, *self.feed(data[missing:], fds, fds_lost=fds_lost)]
        except FramingError as exc:
            exc.frames.insert(0, frame)
            raise

    def _attribute_fds(
        self,
        fds: Sequence[int],
        lost: bool,
        frames: list[Frame],
        owner: Frame | None,
        *,
        to_pending: bool,
    ) -> None:
        """Give a receive's fds to the last message that started in it."""
        if to_pending:
            self._pending_fds, self._pending_fds_lost = list(fds), lost
        elif owner is not None:
            owner.fds, owner.fds_lost = list(fds), lost
        else:
            # No message starts in this input, so the only frame it completed is the
            # one whose body carried the fds: it is the violation, not before it.
            self._refuse_body_fds(fds, frames)

    def _refuse_body_fds(self, fds: Sequence[int], frames: list[Frame]) -> NoReturn:
        close_fds(fds)
        self.close()
        for frame in frames:
            frame.close_fds()
        raise FramingError("file descriptors arrived with message body bytes", [])

    def _check_header(self, size: int, flags: int) -> None:
        message_type = flags & MESSAGE_TYPE_MASK
        if message_type not in (FLAGS_COMMAND, FLAGS_REPLY):
            raise ProtocolError(f"message type {message_type} is not defined")
        if size < HEADER_SIZE:
            raise ProtocolError(f"message size {size} is smaller than its header")
        if size > self.max_message_size:
            raise ProtocolError(f"message size {size} exceeds {self.max_message_size}")

    def close(self) -> None:
        """Forget a partial message and close the fds that came with it. Complete
        frames keep theirs: their new owner closes them."""
        close_fds(self._pending_fds)
        self._pending_fds, self._pending_fds_lost = [], False
        self._buffer = bytearray()
        self._gathering, self._gathered, self._missing = None, [], 0
        self.buffered = 0
