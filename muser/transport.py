"""A non-blocking AF_UNIX stream socket that carries file descriptors, on any loop.

asyncio's and uvloop's own transports drop ancillary data, so this drives the
socket directly with `loop.add_reader`/`add_writer`, `recvmsg` and `sendmsg`
(protocol.md §1.6, §1.11). It knows nothing about what the bytes mean.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import os
import select
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from muser.errors import ProtocolError
from muser.wire import close_fds, gather_piece

RECEIVE_SIZE = 124 * 1024
"""Bytes asked for per receive. The kernel fills a new bytes object of this size,
shrunk then to what came: no copy. It stays below glibc's default mmap threshold
(128 KiB), above which every receive would map and unmap its buffer (5x slower
for a small message), and holds a 64 KiB transfer with its header."""
WRITE_HIGH_WATER = 4 * 1024 * 1024
"""Above this many queued bytes, `drain` waits for the peer to read."""
WRITE_LOW_WATER = 1024 * 1024
_COALESCE_BELOW = 64 * 1024
"""Queued pieces smaller than this are copied together, so a backlog of small
replies leaves in few sendmsg calls; larger ones are queued as they are: copying
megabytes costs more than a system call."""
_MAX_SEND_BUFFERS = 512
"""Buffers per sendmsg, within Linux's IOV_MAX of 1024."""
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
"""A plain int: socket's IntFlag arithmetic costs microseconds per receive."""
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
RECEIVES_PER_CALL = 16
"""Receives per readiness callback before other callbacks get their turn."""


class DataReceiver(Protocol):
    def __call__(self, data: bytes, fds: list[int], fds_lost: bool = False) -> bool | None:
        """Bytes in arrival order, with the fds that came with them (now owned by the
        callee); `fds_lost` when some of those fds could not be received because this
        process had no descriptors left. True when it sent something in answer: had
        the peer gone, that send failed, so the transport need not look for more."""


ConnectionLost = Callable[[BaseException | None], None]
"""The socket is closed: peer EOF (None), an OS error, or a protocol error."""


def _not_started(data: bytes, fds: list[int], fds_lost: bool = False) -> bool:
    raise RuntimeError("the transport was not started")


class _PendingWrite:
    """Queued bytes, with the fds that go with their first byte. Later messages
    without fds are appended to an entry whose fds are sent (or that had none), so
    a backlog goes out in few sendmsg calls; never to one whose fds are still
    waiting, since a receiver gives fds to the last message that starts in its read."""

    __slots__ = ("buffers", "fds")

    def __init__(self, fds: list[int]) -> None:
        self.buffers: deque[bytes | bytearray | memoryview] = deque()
        """Large pieces as given (immutable), small ones gathered into bytearrays."""
        self.fds = fds

    def consume(self, sent: int) -> None:
        """Drop the first `sent` bytes, which the socket took."""
        buffers = self.buffers
        while sent:
            first = buffers[0]
            if sent >= len(first):
                buffers.popleft()
                sent -= len(first)
            elif type(first) is bytearray:
                del first[:sent]  # in place: bytes may still be added behind them
                return
            else:
                buffers[0] = memoryview(first)[sent:]
                return


def _scm_rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds


class FdTransport:
    """One connected socket: receives (bytes, fds), sends each message with one sendmsg."""

    def __init__(
        self, sock: socket.socket, *, max_receive_fds: int, read_while_backlogged: bool = True
    ) -> None:
        """With `read_while_backlogged` False (a server's choice), nothing is read
        while more than WRITE_HIGH_WATER bytes wait for the peer, until it has read
        them down to WRITE_LOW_WATER: whatever would answer the next message, its
        answer cannot grow the queue without bound. Nothing is read before `start`."""
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._on_data: DataReceiver = _not_started
        self._on_lost: ConnectionLost | None = None
        self._max_receive_fds = max(max_receive_fds, 1)
        self._ancillary_size = socket.CMSG_SPACE(4 * self._max_receive_fds)
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN | select.POLLRDHUP)
        self._writes: deque[_PendingWrite] = deque()
        self.write_buffer_size = 0
        """Bytes queued for the peer that the socket has not taken yet (read only)."""
        self._drained: asyncio.Event | None = None
        self._read_while_backlogged = read_while_backlogged
        self._wants_reading = False
        """What the owner asked for last (start, pause_reading, resume_reading)."""
        self.backlogged = False
        """Whether more than WRITE_HIGH_WATER bytes wait for the peer, and have not yet
        been read down to WRITE_LOW_WATER (read only)."""
        self.reading = False
        """Whether the socket is being read now (read only)."""
        self._closing = False
        self.closed = False
        """Whether the socket is closed (read only)."""

    def start(self, on_data: DataReceiver, on_lost: ConnectionLost) -> None:
        """Read from now on: what arrives goes to `on_data`, and `on_lost` hears once
        that the socket closed. Both are called from the loop's thread."""
        self._on_data, self._on_lost = on_data, on_lost
        self.resume_reading()

    def peer_pid(self) -> int | None:
        """The connecting process, from SO_PEERCRED (Linux)."""
        try:
            creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        except OSError:
            return None
        return int.from_bytes(creds[:4], "little")

    def pause_reading(self) -> None:
        self._wants_reading = False
        self._update_reading()

    def resume_reading(self) -> None:
        self._wants_reading = True
        self._update_reading()

    def _update_reading(self) -> None:
        """Read exactly while the protocol wants it, nothing holds it back, and the
        socket is open."""
        wanted = self._wants_reading and not self.closed
        if self.backlogged and not self._read_while_backlogged:
            wanted = False
        if wanted and not self.reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self.reading = True
        elif self.reading and not wanted:
            self._loop.remove_reader(self._fd)
            self.reading = False

    def _on_readable(self) -> None:
        """Receive until the protocol answers, the socket has nothing more, reading
        stops, or the socket closes; after RECEIVES_PER_CALL receives, go on in a
        later callback.

        Reading on, rather than once per callback, is what makes a peer's close
        reach us on every loop: a peer that closes with our reply unread makes epoll
        report EPOLLERR, and uvloop then calls the reader once and stops watching
        the socket, so a single receive that returned data would never learn of the
        close. A receive the protocol answered needs no more: had the peer gone, the
        answer's send failed. After any other, a poll of no time says whether there
        is more (cheaper than a receive that fails with EAGAIN, an exception). The
        later callback is scheduled here, not left to epoll, for the same reason;
        the bound keeps a flooding peer from starving the loop."""
        receives = 0
        while True:
            try:
                data, ancdata, msg_flags, _ = self._sock.recvmsg(
                    RECEIVE_SIZE, self._ancillary_size, _MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._abort(exc)
                return
            if data and not ancdata and not msg_flags & _MSG_CTRUNC:
                if self._on_data(data, []):  # bytes alone: almost every receive
                    return
            elif self._deliver(data, ancdata, msg_flags):
                return
            receives += 1
            if receives == RECEIVES_PER_CALL:
                self._loop.call_soon(self._read_on)
                return
            if not self.reading or not self._poller.poll(0):
                return

    def _read_on(self) -> None:
        if self.reading and self._poller.poll(0):
            self._on_readable()

    def _deliver(self, data: bytes, ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> bool:
        """A receive that is not bytes alone: the peer's EOF, fds, or fds that did not
        all arrive. Returns whether to stop reading now."""
        fds = _received_fds(ancdata)
        if not data:
            close_fds(fds)
            self._abort(None)
            return True
        if not msg_flags & _MSG_CTRUNC:
            return bool(self._on_data(data, fds))
        if len(fds) >= self._max_receive_fds:
            close_fds(fds)
            message = "more file descriptors than advertised: control data truncated"
            self._abort(ProtocolError(message))
            return True
        # Fewer fds than there was room for: the kernel could not install the rest
        # because this process is out of descriptors (EMFILE/ENFILE). The message
        # goes on, marked, to be refused with EMFILE.
        return bool(self._on_data(data, fds, True))

    def send(self, buffers: Sequence[bytes], fds: Sequence[int] = ()) -> None:
        """Send one message (its buffers in order) with `fds` attached to its first byte.

        Never blocks: what the socket does not take now is queued (fds duplicated,
        so the caller may close its own copies at once) and sent when it can. A
        connection that is closed or closing drops it, as a message to a peer that
        is gone; one whose socket fails is closed (the owner hears connection_lost).
        """
        if self.closed or self._closing:
            return
        sent = 0
        if not self._writes:
            single = len(buffers) == 1 and not fds
            try:
                if single:  # one buffer, no fds: almost every reply, sent the cheap way
                    sent = self._sock.send(buffers[0])
                else:
                    sent = self._sock.sendmsg(buffers, _scm_rights(fds))
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                self._abort(exc)
                return
            total = len(buffers[0]) if single else sum(map(len, buffers))
            if sent == total:
                return
            if sent:
                fds = ()
        self._queue(buffers, sent, fds)

    def _queue(self, buffers: Sequence[bytes], sent: int, fds: Sequence[int]) -> None:
        """Keep what the socket did not take (all but the first `sent` bytes) until
        it is writable; the caller's fds are duplicated, so it may close its own."""
        if not fds and self._writes and not self._writes[-1].fds:
            pending = self._writes[-1]
        else:
            pending = _PendingWrite([os.dup(fd) for fd in fds])
            self._writes.append(pending)
            if len(self._writes) == 1:
                self._loop.add_writer(self._fd, self._on_writable)
        for buffer in buffers:
            # the caller may change a buffer of its own once we return: keep bytes
            piece = buffer if type(buffer) is bytes else bytes(buffer)
            size = len(piece)
            if sent >= size:
                sent -= size
                continue
            gather_piece(
                pending.buffers, memoryview(piece)[sent:] if sent else piece, _COALESCE_BELOW
            )
            self.write_buffer_size += size - sent
            sent = 0
        if self.write_buffer_size > WRITE_HIGH_WATER and not self.backlogged:
            self.backlogged = True
            self._update_reading()

    def _on_writable(self) -> None:
        while self._writes:
            pending = self._writes[0]
            buffers = pending.buffers
            if len(buffers) > _MAX_SEND_BUFFERS:
                buffers = deque(itertools.islice(buffers, _MAX_SEND_BUFFERS))
            try:
                sent = self._sock.sendmsg(buffers, _scm_rights(pending.fds))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._abort(exc)
                return
            close_fds(pending.fds)
            pending.fds = []
            pending.consume(sent)
            self.write_buffer_size -= sent
            self._wake_drain()
            if pending.buffers:
                return
            self._writes.popleft()
        self._loop.remove_writer(self._fd)
        if self._closing:
            self._abort(None)

    def _wake_drain(self) -> None:
        """The peer has read down to the low-water mark (or is gone): wake `drain`
        and read again if the backlog was what stopped it."""
        if self.write_buffer_size > WRITE_LOW_WATER and not self.closed:
            return
        if self._drained is not None:
            self._drained.set()
            self._drained = None
        if self.backlogged:
            self.backlogged = False
            self._update_reading()

    async def drain(self) -> None:
        """Wait while the peer is backlogged (see `backlogged`)."""
        if not self.backlogged or self.closed:
            return
        if self._drained is None:
            self._drained = asyncio.Event()
        await self._drained.wait()

    def close(self) -> None:
        """Close now, dropping unsent data; the protocol hears connection_lost(None)."""
        self._abort(None)

    def close_when_sent(self) -> None:
        """Stop reading, send what is queued (e.g. a final error reply), then close."""
        self.pause_reading()
        self._closing = True
        if not self._writes:
            self._abort(None)

    def _abort(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._update_reading()
        if self._writes:
            self._loop.remove_writer(self._fd)
        for pending in self._writes:
            close_fds(pending.fds)
        self._writes.clear()
        self.write_buffer_size = 0
        self._wake_drain()
        self._sock.close()
        if self._on_lost is not None:
            self._loop.call_soon(self._on_lost, exc)
