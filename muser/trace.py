"""Replaying a wire trace (see `muser.recording`) against a device.

    python -m muser.trace replay session.jsonl DEVICE

serves DEVICE (a sample name or `package.module:factory`, as `muser.run` takes)
on a temporary socket, sends the recorded client messages with fresh eventfds and
memfds where fds went, and compares every reply with the recorded one. It prints
the differences and exits 1 if there are any, so a trace of a session that
worked becomes a regression test for the device that answered it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence

from muser.device import PciDevice
from muser.loading import configure_logging, load_device_factory
from muser.recording import CLIENT_TO_SERVER, SERVER_TO_CLIENT, Record, load, sessions
from muser.server import Server
from muser.transport import FdTransport
from muser.wire import Frame, Framer, FramingError, close_fds
from muser.wire.constants import DEFAULT_MAX_DATA_XFER_SIZE, HEADER_SIZE, Command
from muser.wire.messages import DmaMap

REPLY_TIMEOUT = 5.0
"""Seconds the replayer waits for a reply before calling it missing."""


def stand_in_fds(record: Record) -> list[int]:
    """Fresh fds for a recorded message's: a memfd covering the window for a DMA_MAP
    (its file offset plus its size), an eventfd for anything else (interrupts)."""
    if record.command == Command.DMA_MAP:
        request = DmaMap.parse(record.data[HEADER_SIZE:])
        fds = [
            os.memfd_create("trace-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            for _ in range(record.nfds)
        ]
        try:
            for fd in fds:
                os.ftruncate(fd, request.offset + request.size)
        except OSError:
            close_fds(fds)
            raise
        return fds
    return [os.eventfd(0) for _ in range(record.nfds)]


class _ReplayPeer:
    """The client side of a replay: raw messages out, whole frames in."""

    def __init__(self, sock: socket.socket) -> None:
        self._framer = Framer(DEFAULT_MAX_DATA_XFER_SIZE + 64)
        self.frames: asyncio.Queue[Frame | None] = asyncio.Queue()
        self.transport = FdTransport(sock, max_receive_fds=16)
        self.transport.start(self.data_received, self.connection_lost)

    def data_received(self, data: bytes, fds: list[int], fds_lost: bool = False) -> bool:
        try:
            frames = self._framer.feed(data, fds, fds_lost=fds_lost)
        except FramingError as exc:
            # The server's stream went bad: what came before counts, then it has ended.
            frames = exc.frames
            self.transport.close()
        for frame in frames:
            self.frames.put_nowait(frame)
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._framer.close()
        self.frames.put_nowait(None)


async def _connect(path: str) -> _ReplayPeer:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return _ReplayPeer(sock)


async def _replay_session(path: str, records: Sequence[Record], timeout: float) -> list[str]:
    differences: list[str] = []
    peer = await _connect(path)
    try:
        for position, record in enumerate(records):
            if record.direction == CLIENT_TO_SERVER:
                fds = stand_in_fds(record)
                try:
                    peer.transport.send((record.data,), fds)
                finally:
                    close_fds(fds)
                continue
            where = f"session {record.session} message {position} ({record.describe()})"
            try:
                frame = await asyncio.wait_for(peer.frames.get(), timeout)
            except TimeoutError:
                differences.append(f"{where}: no reply within {timeout} s")
                break
            if frame is None:
                differences.append(f"{where}: the server closed the connection")
                break
            got, nfds = frame.encode(), len(frame.fds)
            frame.close_fds()
            if got != record.data:
                differences.append(
                    f"{where}:\n  recorded {record.data.hex()}\n  replayed {got.hex()}"
                )
            if nfds != record.nfds:
                differences.append(f"{where}: recorded {record.nfds} fds, replayed {nfds}")
    finally:
        peer.transport.close()
        while not peer.frames.empty():
            unread = peer.frames.get_nowait()
            if unread is not None:
                unread.close_fds()
    return differences


@contextlib.contextmanager
def _socket_directory() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="muser-replay-", dir="/tmp") as directory:
        yield os.path.join(directory, "device.sock")


async def replay(
    records: Sequence[Record], device: PciDevice, *, timeout: float = REPLY_TIMEOUT
) -> list[str]:
    """Serve `device` on a temporary socket, replay each recorded session on its own
    connection (in order, against the same device, as they happened), and return
    a line per reply that differs from the recording (none if all match)."""
    differences: list[str] = []
    with _socket_directory() as path:
        async with Server(device, path):
            # The server takes one client at a time, so each session starts once the
            # one before has ended and the device has heard it leave.
            for session in sessions(records).values():
                differences += await _replay_session(path, session, timeout)
    return differences


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m muser.trace", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    replay_parser = commands.add_parser(
        "replay", help="replay a trace's client messages and compare the replies"
    )
    replay_parser.add_argument("trace", help="a JSON-lines trace (or a tests/vectors file)")
    replay_parser.add_argument("device", help="a sample name or package.module:factory")
    replay_parser.add_argument("--timeout", type=float, default=REPLY_TIMEOUT)
    args = parser.parse_args(argv)
    configure_logging("warning", "console")
    device = load_device_factory(args.device)()
    records = load(args.trace)
    differences = asyncio.run(replay(records, device, timeout=args.timeout))
    for difference in differences:
        print(difference)
    replies = sum(record.direction == SERVER_TO_CLIENT for record in records)
    if differences:
        print(f"{len(differences)} differences in {replies} replies", file=sys.stderr)
        raise SystemExit(1)
    print(f"{replies} replies identical", file=sys.stderr)


if __name__ == "__main__":
    main()
