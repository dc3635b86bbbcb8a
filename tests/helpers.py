"""A device that records what happens to it, and a raw peer that sends anything."""

from __future__ import annotations

import array
import asyncio
import errno
import gc
import os
import socket
from collections.abc import Sequence

from muser import Bar, BarKind, PciDevice, ResetReason, VfioUserError
from muser.wire import build_capabilities, encode_header
from muser.wire.constants import HEADER_SIZE, Command
from muser.wire.messages import Header, Version

TIMEOUT = 5.0


def open_fds() -> set[int]:
    """This process's fds, once garbage holding any (an mmap's own dup) is collected."""
    gc.collect()
    return {int(name) for name in os.listdir("/proc/self/fd")}


def version_request(msg_id: int = 0, capabilities: bytes | None = None) -> bytes:
    if capabilities is None:
        capabilities = build_capabilities({"max_msg_fds": 8, "max_data_xfer_size": 1 << 20})
    return message(msg_id, Command.VERSION, Version(0, 0, capabilities).build())


def message(
    msg_id: int, command: int, payload: bytes = b"", flags: int = 0, size: int | None = None
) -> bytes:
    header = encode_header(msg_id, command, len(payload), flags)
    if size is not None:
        header = Header(msg_id, command, size, flags, 0).build()
    return header + payload


class RecordingDevice(PciDevice):
    """BAR0: 4 KiB of memory (plain handlers). BAR1: 16 bytes whose reads are refused
    (EPERM) and whose async writes crash. BAR2: 256 bytes of I/O with async handlers
    that can be slowed down. BAR4: 64-bit prefetchable 16 KiB whose reads crash."""

    def __init__(self, name: str = "recording") -> None:
        self.memory = bytearray(4096)
        self.io = bytearray(256)
        self.io_delay = 0.0
        self.resets: list[ResetReason] = []
        self.log: list[tuple[str, int, bytes]] = []
        super().__init__(
            vendor_id=0x1AF4,
            device_id=0x10F0,
            subsystem_vendor_id=0x1AF4,
            subsystem_id=0x1100,
            revision=0x02,
            class_code=0xFF0000,
            name=name,
            intx=True,
            bars={
                0: Bar(4096, read=self.read_memory, write=self.write_memory),
                1: Bar(16, read=self.refuse, write=self.crash_async),
                2: Bar(256, kind=BarKind.IO, read=self.read_io, write=self.write_io),
                4: Bar(0x4000, kind=BarKind.PREFETCHABLE_64, read=self.crash),
            },
        )

    def read_memory(self, offset: int, count: int) -> bytes:
        self.log.append(("read", offset, b""))
        return bytes(self.memory[offset : offset + count])

    def write_memory(self, offset: int, data: bytes) -> None:
        self.log.append(("write", offset, data))
        self.memory[offset : offset + len(data)] = data

    async def read_io(self, offset: int, count: int) -> bytes:
        await asyncio.sleep(self.io_delay)
        self.log.append(("read_io", offset, b""))
        return bytes(self.io[offset : offset + count])

    async def write_io(self, offset: int, data: bytes) -> None:
        await asyncio.sleep(self.io_delay)
        self.log.append(("write_io", offset, data))
        self.io[offset : offset + len(data)] = data

    def refuse(self, offset: int, count: int) -> bytes:
        raise VfioUserError(errno.EPERM, "not now")

    async def crash_async(self, offset: int, data: bytes) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("device bug (async)")

    def crash(self, offset: int, count: int) -> bytes:
        raise RuntimeError("device bug")

    def reset(self, reason: ResetReason) -> None:
        self.resets.append(reason)
        if reason is ResetReason.DEVICE_RESET:
            self.memory[:] = bytes(len(self.memory))


class RawPeer:
    """A client socket that sends exactly what a test gives it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, path: str) -> RawPeer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
        return cls(sock)

    async def negotiate(self) -> None:
        self.send(version_request())
        reply = await self.receive()
        assert reply[0].flags == 1

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = self.sock.sendmsg([data], ancillary)
        assert sent == len(data)

    async def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = await asyncio.wait_for(
                self.loop.sock_recv(self.sock, size - len(data)), TIMEOUT
            )
            if not chunk:
                raise ConnectionResetError("server closed the connection")
            data += chunk
        return data

    async def send_all(self, data: bytes) -> None:
        """Send a burst larger than the socket takes at once."""
        await self.loop.sock_sendall(self.sock, data)

    async def receive_bytes(self, size: int) -> bytes:
        """Exactly `size` bytes of whatever the server sends (a burst of replies)."""
        return await self._exactly(size)

    async def receive(self) -> tuple[Header, bytes]:
        header = Header.parse(await self._exactly(HEADER_SIZE))
        return header, await self._exactly(header.size - HEADER_SIZE)

    async def expect_closed(self) -> bytes:
        """Everything the server sent before closing the connection."""
        data = b""
        while True:
            chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), TIMEOUT)
            if not chunk:
                return data
            data += chunk

    def close(self) -> None:
        self.sock.close()
