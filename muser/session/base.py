"""What both ends of a vfio-user connection share, without any I/O: framing, message
ids, the requests this end sent (kept by id until their replies come), and the
one way out for every message.

Replies are matched as soon as they arrive, never behind queued commands, so a
reply can't be stuck waiting for the command it is needed by.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from muser.log_limit import LogLimiter
from muser.session.outcome import Observer, Receiver, SessionEvents, Sink
from muser.session.state import Lifecycle, check_transition
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

MSG_ID_MODULUS = 1 << 16

Payload = bytes | tuple[bytes, ...]
"""A message's payload: its bytes, or parts sent back to back without joining
them (`Layout.build_parts`), so that bulk data is not copied into a new buffer."""


class Session:
    """One end of a connection, driven by bytes in and a sender and events out."""

    def __init__(
        self,
        sink: Sink,
        events: SessionEvents,
        *,
        max_message_size: int,
        clock: Callable[[], float],
        observer: Observer | None = None,
    ) -> None:
        self.sink = sink
        self._send = sink.send
        self.events = events
        self.clock = clock
        """The time, for deadlines: whatever clock the driver's timers use."""
        self.observer = observer
        self.framer = Framer(max_message_size)
        self.state = Lifecycle.READY
        self.pending: dict[int, int] = {}
        """Requests this end sent and awaits: msg_id -> command."""
        self._next_msg_id = 0
        self._limiter = LogLimiter(clock=clock)
        self.data_received: Receiver = self.receive
        """Where the driver hands each receive: `receive`, or a server's hot path."""

    def _enter(self, state: Lifecycle) -> None:
        check_transition(self.state, state)
        self.state = state

    # In

    def receive(self, data: bytes, fds: list[int], fds_lost: bool = False) -> bool:
        """Take what one receive returned (the fds are now the session's). Whether
        it sent an answer is not followed here (False: look for more)."""
        framer = self.framer
        if not fds and not fds_lost and not framer.buffered and len(data) >= HEADER_SIZE:
            # One whole message, as a peer waiting on each answer sends them: taken
            # without the framer, whose header checks these are.
            msg_id, command, size, flags, error = HEADER_CODEC.unpack_from(data)
            message_type = flags & MESSAGE_TYPE_MASK
            if size == len(data) <= framer.max_message_size and message_type in _WHOLE_TYPES:
                frame = Frame(msg_id, command, flags, error, data[HEADER_SIZE:])
                self._take(frame)
                return False
        try:
            frames = framer.feed(data, fds, fds_lost=fds_lost)
            broken: FramingError | None = None
        except FramingError as exc:
            frames, broken = exc.frames, exc
        for frame in frames:
            self._take(frame)
        if broken is not None:
            self.events.log(
                "warning", "protocol violation; closing the connection", error=str(broken)
            )
            self._stream_broken()
        return False

    def _take(self, frame: Frame) -> None:
        if self.observer is not None:
            self.observer.received(frame)
        if frame.flags & MESSAGE_TYPE_MASK == FLAGS_REPLY:
            self._reply_received(frame)
        else:
            self._command_received(frame)

    def _reply_received(self, frame: Frame) -> None:
        if self.pending.get(frame.msg_id) != frame.command:
            self._unexpected_reply(frame)
            return
        del self.pending[frame.msg_id]
        self.events.reply_arrived(frame.msg_id, frame)

    def _unexpected_reply(self, frame: Frame) -> None:
        frame.close_fds()
        command = command_name(frame.command)
        self.log_limited("warning", "unexpected reply", command, command=command)

    def _command_received(self, frame: Frame) -> None:
        raise NotImplementedError

    def _stream_broken(self) -> None:
        """The input cannot be followed any more."""
        self.events.close(flush=False)

    def tick(self) -> None:
        """The timer asked for through `events.set_timer` is due (only a server's
        session keeps deadlines)."""

    def connection_lost(self) -> None:
        """The connection is gone: forget a partial message (closing its fds) and the
        requests that will never be answered."""
        self.framer.close()
        self.pending.clear()
        if self.state is not Lifecycle.CLOSED:
            self._enter(Lifecycle.CLOSED)
        for event, held in self._limiter.held_back().items():
            self.events.log("warning", "log lines held back", line=event, count=held)

    # Out

    def send(
        self,
        msg_id: int,
        command: int,
        flags: int,
        payload: Payload = b"",
        *,
        fds: Sequence[int] = (),
        error: int = 0,
    ) -> None:
        """The one way a message leaves: header, payload (bytes or parts), fds."""
        if not isinstance(payload, tuple):  # one buffer: bytes, or any bytes-like
            if type(payload) is not bytes:
                payload = bytes(payload)  # len() of a view counts items, not bytes
            header = encode_header(msg_id, command, len(payload), flags, error)
            buffers: tuple[bytes, ...] = (header, payload) if payload else (header,)
        else:
            header = encode_header(msg_id, command, sum(map(len, payload)), flags, error)
            buffers = (header, *payload)
        self.send_message(buffers, fds)

    def send_message(self, buffers: Sequence[bytes], fds: Sequence[int] = ()) -> None:
        """A whole message already laid out (the hot path's packed replies)."""
        self._send(buffers, fds)
        if self.observer is not None:
            self.observer.sent(b"".join(buffers), len(fds))

    def send_request(
        self,
        command: int,
        payload: Payload = b"",
        fds: Sequence[int] = (),
        *,
        posted: bool = False,
    ) -> int:
        """Send a command of ours; unless it is posted (no reply), its reply is
        expected by the msg_id returned."""
        msg_id = self._next_msg_id
        while msg_id in self.pending:
            msg_id = (msg_id + 1) % MSG_ID_MODULUS
        self._next_msg_id = (msg_id + 1) % MSG_ID_MODULUS
        if not posted:
            self.pending[msg_id] = command
        flags = FLAGS_POSTED_COMMAND if posted else FLAGS_COMMAND
        self.send(msg_id, command, flags, payload, fds=fds)
        return msg_id

    def forget_request(self, msg_id: int) -> None:
        """Nobody waits for this request's reply any more (it will be refused as
        unexpected if it comes)."""
        self.pending.pop(msg_id, None)

    # Logs

    def log_limited(self, level: str, event: str, kind: Hashable, **fields: object) -> None:
        """Log at `level`, unless this peer repeats itself (see LogLimiter)."""
        held = self._limiter.allow(event, kind)
        if held is None:
            return
        if held:
            fields["repeats_held_back"] = held
        self.events.log(level, event, **fields)


_WHOLE_TYPES = (FLAGS_COMMAND, FLAGS_REPLY)
"""The message types a whole message may be taken as without the framer (whose
header check refuses the others)."""
