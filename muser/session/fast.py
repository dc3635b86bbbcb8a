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

The loop itself, `serve_plain`, has a C twin in `muser._speedups` (an optional
extension; `MUSER_PURE_PYTHON=1` declines it): both take the bytes and one `Lane`
tuple and return where they stopped, whether they replied, and the message they
served but could not answer plainly, which the code here answers for both. The
same random streams run through both and must give the same bytes.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Protocol

from muser.device.bars import Reader, Writer
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


def _accelerator() -> ModuleType | None:
    """muser._speedups, unless it was not built or MUSER_PURE_PYTHON is set (CI
    runs the suite both ways)."""
    if os.environ.get("MUSER_PURE_PYTHON"):
        return None
    try:
        return importlib.import_module("muser._speedups")
    except ImportError:
        return None


ACCELERATOR = _accelerator()
"""The C plain loop's module, or None: the Python one serves."""


class AccessLane:
    """One session's hot path, with what it works with gathered once."""

    __slots__ = ("_lane", "_owner", "_serve")

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
        self._serve: Callable[[bytes, Lane], tuple[int, bool, Pending | None]] = serve_plain
        """The plain loop: muser._speedups' where it was built and nothing observes
        each message, else `serve_plain`."""
        if ACCELERATOR is not None and observe is None:
            self._serve = ACCELERATOR.serve_plain
        self._lane: Lane = (
            sizes, context.max_data_xfer_size, context.readers, context.writers, send, sink,
            context, observe,
        )  # fmt: skip
        """What the plain loop works with, in one tuple: one load per receive."""

    def receive(self, data: bytes, fds: list[int], fds_lost: bool = False) -> bool:
        """Take what one receive returned; whether a reply went out."""
        owner = self._owner
        if fds or fds_lost or owner.state is not _READY or owner.framer.buffered:
            return owner.receive(data, fds, fds_lost)
        owner.handling = True
        position, answered, pending = self._serve(data, self._lane)
        if pending is not None:
            start, kind, value = pending
            owner.answer_handed_back(frame_at(data, start), _outcome(data, start, kind, value))
        owner.handling = False
        if position < len(data):
            owner.receive(data[position:] if position else data, fds, False)
            owner.lane_stopped()
        elif owner.state is not _READY:
            owner.lane_stopped()
        return answered


Lane = tuple[
    Sequence[int], int, Sequence[Reader], Sequence[Writer], Sender, Sink, Context,
    Callable[[Frame], None] | None,
]  # fmt: skip
"""What the plain loop works with: region sizes, the largest count, readers, writers,
send, the sink (for backlog), the context (for stopping), and what observes each
message (None for nothing)."""
PENDING_READ, PENDING_WRITE, PENDING_RAISED = 0, 1, 2
"""What `serve_plain` hands back for a message it served but could not answer
plainly: a read's result, a write's result, or what the handler raised."""
Pending = tuple[int, int, object]
"""(where the message starts in the receive, kind, value)"""


def serve_plain(data: bytes, lane: Lane) -> tuple[int, bool, Pending | None]:
    """Serve the plain REGION_READ/REGION_WRITE messages at the start of `data`:
    where it stopped, whether a reply went out, and the message it served but could
    not answer plainly, if any. muser._speedups has the same function in C (for a
    lane that observes nothing)."""
    sizes, max_count, readers, writers, send, sink, context, observe = lane
    position, end, answered, regions = 0, len(data), False, len(sizes)
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
        start = position
        if observe is not None:
            observe(frame_at(data, start))
        try:
            if command == _REGION_READ and size == ACCESS_SIZE:
                position += size
                result = readers[region](offset, count)
                if type(result) is not bytes or len(result) != count:
                    return position, answered, (start, PENDING_READ, result)
                if not flags & NO_REPLY_BIT:
                    answered = True
                    header = _pack(msg_id, command, size + count, _REPLY, 0, offset, region, count)
                    send((header + result,))
            elif command == _REGION_WRITE and size == ACCESS_SIZE + count:
                position += size
                done = writers[region](offset, data[start + ACCESS_SIZE : position])
                if done is not None:
                    return position, answered, (start, PENDING_WRITE, done)
                if not flags & NO_REPLY_BIT:
                    answered = True
                    send((_pack(msg_id, command, ACCESS_SIZE, _REPLY, 0, offset, region, count),))
            else:  # a size that does not fit the command: the general path refuses it
                break
        except Exception as exc:  # device code's: answered as the general path would
            return position, answered, (start, PENDING_RAISED, exc)
    return position, answered, None


def _outcome(
    data: bytes, start: int, kind: int, value: object
) -> Outcome | Awaitable[Outcome] | Exception:
    """How the general path answers a message `serve_plain` handed back: its
    outcome, or the exception that refuses it (a handler's, or a result's check)."""
    if kind == PENDING_RAISED:
        assert isinstance(value, Exception)
        return value
    msg_id, _command, _size, _flags, _error, offset, region, count = _unpack_access(data, start)
    try:
        if kind == PENDING_READ:
            return read_outcome(msg_id, offset, region, count, value)  # type: ignore[arg-type]
        return write_outcome(msg_id, offset, region, count, value)  # type: ignore[arg-type]
    except Exception as exc:  # a read of the wrong length, say
        return exc


def frame_at(data: bytes, position: int) -> Frame:
    """The frame of the message at `position` in `data`, for the general path."""
    msg_id, command, size, flags, error = HEADER_CODEC.unpack_from(data, position)
    return Frame(msg_id, command, flags, error, data[position + HEADER_SIZE : position + size])
