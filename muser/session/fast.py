"""The hot path: whole REGION_READ and REGION_WRITE messages, what a guest's MMIO
becomes, served straight from the received bytes, with no frame, queue or lookup per
message, while the session is READY.

It is the first to see each receive (`ServerSession.data_received`) and stops at the
first message it cannot answer plainly: one that needs more (fds, a partial message,
another command, anything to refuse) goes to the general path with all that follows;
one whose handler raised, must be awaited, or returned bytes to check is answered as
the general path answers it (`regions.read_outcome`/`write_outcome`).

The plain case's bounds check and reply packing are `regions.access_refusal`'s and
`read_reply`/`write_reply`'s, written out: calling them would cost 630 and 680
instructions of a 34.2k-instruction round trip (callgrind), more than the 3% the
session core may cost. The differential tests (`Server(fast_path=False)`) run the
same random streams with the hot path on and off and hold the two alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from muser.session.context import Context
from muser.session.outcome import Outcome, Sender, Sink
from muser.session.regions import ACCESS_SIZE, read_outcome, write_outcome
from muser.session.state import Lifecycle
from muser.wire import Frame, Framer
from muser.wire.constants import (
    FLAGS_COMMAND,
    FLAGS_POSTED_COMMAND,
    FLAGS_REPLY,
    HEADER_SIZE,
    NO_REPLY_BIT,
    Command,
)
from muser.wire.messages import ACCESS_MESSAGE, HEADER_CODEC

_unpack_access, _pack = ACCESS_MESSAGE.unpack_from, ACCESS_MESSAGE.pack
_REPLY = FLAGS_REPLY
_REGION_READ, _REGION_WRITE = int(Command.REGION_READ), int(Command.REGION_WRITE)
_LANE_COMMANDS = (_REGION_READ, _REGION_WRITE)
_PLAIN_COMMAND_FLAGS = (FLAGS_COMMAND, FLAGS_POSTED_COMMAND)
_READY = Lifecycle.READY


class LaneOwner(Protocol):
    """What the hot path needs of its server session."""

    state: Lifecycle
    framer: Framer
    handling: bool
    """Set while the hot path calls handlers (one may close the server)."""

    def receive(self, data: bytes, fds: list[int], fds_lost: bool = False) -> bool:
        """The general path."""

    def answer_handed_back(
        self, frame: Frame, result: Outcome | Awaitable[Outcome] | Exception
    ) -> None:
        """Answer a message the hot path served but could not answer plainly."""

    def lane_stopped(self) -> None:
        """The hot path ended early, with the rest (if any) gone the general way."""


class AccessLane:
    """One session's hot path, with what it works with gathered once."""

    __slots__ = ("_lane", "_owner")

    def __init__(
        self,
        owner: LaneOwner,
        context: Context,
        sizes: Sequence[int],
        *,
        send: Sender,
        sink: Sink,
        observe: Callable[[Frame], None] | None,
    ) -> None:
        self._owner = owner
        self._lane = (
            context, sizes, len(sizes), context.max_data_xfer_size, context.readers,
            context.write, send, sink, observe,
        )  # fmt: skip
        """All `receive` works with, in one tuple: one load per receive."""

    def receive(self, data: bytes, fds: list[int], fds_lost: bool = False) -> bool:
        """Take what one receive returned; whether a reply went out."""
        owner = self._owner
        if fds or fds_lost or owner.state is not _READY or owner.framer.buffered:
            return owner.receive(data, fds, fds_lost)
        context, sizes, regions, max_count, readers, write, send, sink, observe = self._lane
        position, end, answered = 0, len(data), False
        owner.handling = True
        while end - position >= ACCESS_SIZE:
            msg_id, command, size, flags, _error, offset, region, count = _unpack_access(
                data, position
            )
            if (
                command not in _LANE_COMMANDS
                or flags not in _PLAIN_COMMAND_FLAGS
                or size > end - position
                or region >= regions
                or not 0 < count <= max_count
                or offset + count > sizes[region]
                or sink.backlogged
                or context.stopping
            ):
                break
            start, position = position, position + size
            if observe is not None:
                observe(frame_at(data, start, size))
            try:
                if command == _REGION_READ and size == ACCESS_SIZE:
                    result = readers[region](offset, count)
                    if type(result) is bytes and len(result) == count:
                        if not flags & NO_REPLY_BIT:
                            answered = True
                            reply_size = size + count
                            header = _pack(
                                msg_id, command, reply_size, _REPLY, 0, offset, region, count
                            )
                            send((header + result,))
                        continue
                    outcome = read_outcome(msg_id, offset, region, count, result)
                elif command == _REGION_WRITE and size == ACCESS_SIZE + count:
                    done = write(region, offset, data[start + ACCESS_SIZE : position])
                    if done is None:
                        if not flags & NO_REPLY_BIT:
                            answered = True
                            reply = _pack(
                                msg_id, command, ACCESS_SIZE, _REPLY, 0, offset, region, count
                            )
                            send((reply,))
                        continue
                    outcome = write_outcome(msg_id, offset, region, count, done)
                else:  # a size that does not fit the command: the general path refuses it
                    position = start
                    break
            except Exception as exc:  # device code's: answered as the general path would
                owner.answer_handed_back(frame_at(data, start, size), exc)
            else:
                owner.answer_handed_back(frame_at(data, start, size), outcome)
            break
        owner.handling = False
        if position < end:
            owner.receive(data[position:] if position else data, fds, False)
            owner.lane_stopped()
        elif owner.state is not _READY:
            owner.lane_stopped()
        return answered


def frame_at(data: bytes, position: int, size: int) -> Frame:
    """The frame of a message in `data`, for the general path."""
    msg_id, command, _size, flags, error = HEADER_CODEC.unpack_from(data, position)
    return Frame(msg_id, command, flags, error, data[position + HEADER_SIZE : position + size])
