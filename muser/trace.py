"""Wire traces: record every message of a server's sessions, and replay them.

`Server(device, path, trace="session.jsonl")` appends one JSON object per message,
in and out, in the shape of the golden transcripts in `tests/vectors` (`dir`,
`hex`, `nfds`, `command`, `name`, `session`, `msg_id`, `flags`, `error`), one
object per line so a trace survives a crash up to its last message. Tracing is
off unless asked for; off, it costs one `is None` test per message.

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
import itertools
import json
import os
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import structlog

from muser.device import PciDevice
from muser.endpoint import command_name
from muser.run import configure_logging, load_device_factory
from muser.server import Server
from muser.transport import FdTransport
from muser.wire import Frame, Framer, FramingError, close_fds
from muser.wire.constants import DEFAULT_MAX_DATA_XFER_SIZE, HEADER_SIZE, Command
from muser.wire.messages import DmaMap

CLIENT_TO_SERVER = "c2s"
SERVER_TO_CLIENT = "s2c"
REPLY_TIMEOUT = 5.0
"""Seconds the replayer waits for a reply before calling it missing."""
_sessions = itertools.count(1)


def _vector_name(command: int) -> str:
    name = command_name(command)
    return f"VFIO_USER_{name}" if not name.isdigit() else name


class WireTrace:
    """Records one server connection's messages to a JSON-lines file (appending, so
    several sessions can share a file; each is labelled `session`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.session = f"{uuid.uuid4().hex[:12]}-{next(_sessions)}"
        """Unique across processes, so runs appending to one file stay apart."""
        self._file: IO[str] | None = open(path, "a", encoding="ascii")  # noqa: SIM115

    def received(self, frame: Frame) -> None:
        self._write(CLIENT_TO_SERVER, frame.encode(), len(frame.fds))

    def sent(self, message: bytes, nfds: int) -> None:
        self._write(SERVER_TO_CLIENT, message, nfds)

    def _write(self, direction: str, message: bytes, nfds: int) -> None:
        if self._file is None:
            return
        record = Record(direction, message, nfds, self.session)
        try:
            self._file.write(json.dumps(record.to_json()) + "\n")
            self._file.flush()
        except OSError as exc:
            # A full disk ends the trace, never the session it was recording.
            structlog.get_logger("muser").error("wire trace stopped", error=exc.strerror)
            self.close()

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()


@dataclass(frozen=True)
class Record:
    """One message as it went over the socket."""

    direction: str
    data: bytes
    nfds: int
    session: str

    @property
    def msg_id(self) -> int:
        return int.from_bytes(self.data[0:2], "little")

    @property
    def command(self) -> int:
        return int.from_bytes(self.data[2:4], "little")

    @property
    def flags(self) -> int:
        return int.from_bytes(self.data[8:12], "little")

    @property
    def error(self) -> int:
        return int.from_bytes(self.data[12:16], "little")

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": self.direction,
            "hex": self.data.hex(),
            "nfds": self.nfds,
            "command": self.command,
            "name": _vector_name(self.command),
            "session": self.session,
            "msg_id": self.msg_id,
            "flags": self.flags,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Record:
        return cls(raw["dir"], bytes.fromhex(raw["hex"]), raw["nfds"], str(raw["session"]))

    def describe(self) -> str:
        return f"{_vector_name(self.command)} msg_id {self.msg_id}"


def load(path: str | os.PathLike[str]) -> list[Record]:
    """A trace's records, from JSON lines (what `WireTrace` writes) or a JSON list
    (the golden transcripts in tests/vectors)."""
    text = Path(path).read_text(encoding="ascii")
    if text.lstrip().startswith("["):
        raws = json.loads(text)
    else:
        raws = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Record.from_json(raw) for raw in raws]


def sessions(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Records grouped by session, sessions in the order they started."""
    grouped: dict[str, list[Record]] = {}
    for record in records:
        grouped.setdefault(record.session, []).append(record)
    return grouped


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
        self.transport = FdTransport(sock, self, max_receive_fds=16)

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
