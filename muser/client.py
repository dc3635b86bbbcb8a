"""An async vfio-user client: the same wire layer, from the other side.

muser's tests and benchmarks drive servers with it, and device authors can use it
to test their own devices. Besides one awaitable method per command it offers
`exchange` (any reply frame, errors included) and `send_raw` (exact bytes).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import structlog

from muser.device.dma_messages import DmaLayout
from muser.endpoint import Endpoint
from muser.errors import ProtocolError
from muser.session import ClientSession
from muser.transport import FdTransport
from muser.wire import Capabilities, build_capabilities, parse_capabilities
from muser.wire.constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    Command,
    DmaMapFlag,
    DmaUnmapFlag,
    Feature,
    FeatureFlag,
    MigrationFlag,
    MigrationState,
)
from muser.wire.messages import (
    ACCESS_CODEC,
    DeviceFeature,
    DeviceInfo,
    DmaMap,
    DmaUnmap,
    DmaUnmapReply,
    Empty,
    IoFdsReply,
    IoFdsRequest,
    IrqInfo,
    IrqSet,
    MigData,
    MigDataRead,
    MigDeviceState,
    MigrationFeature,
    RegionInfo,
    Version,
    WriteOne,
    build_write_multi,
)

CLIENT_MAX_MSG_FDS = 16


class Client(Endpoint):
    """A connected vfio-user client. Use `Client.connect(path)` to get a negotiated
    one, or `Client.on_socket(sock)` for a socket already connected."""

    session: ClientSession

    def __init__(
        self,
        transport: FdTransport,
        *,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
        dma_layout: DmaLayout = DmaLayout.SPEC,
    ) -> None:
        super().__init__(transport, logger=structlog.get_logger("muser.client"))
        self.max_data_xfer_size = max_data_xfer_size
        self.server: Capabilities | None = None
        """What the server announced in its VERSION reply."""
        self.server_version: tuple[int, int] | None = None
        self.dma_layout = dma_layout
        """The DMA_READ/DMA_WRITE layout this client speaks (QEMU's, or the spec's)."""
        self.session = ClientSession(
            transport,
            self,
            max_data_xfer_size=max_data_xfer_size,
            dma_layout=dma_layout,
            clock=self._loop.time,
            observer=self.observer(None),
        )
        self._start()

    @classmethod
    def on_socket(
        cls,
        sock: socket.socket,
        *,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
        dma_layout: DmaLayout = DmaLayout.SPEC,
    ) -> Self:
        """A client over a socket already connected to a server (not negotiated)."""
        if dma_layout is DmaLayout.AUTO:
            raise ValueError("a client speaks one DMA layout: SPEC or QEMU")
        transport = FdTransport(sock, max_receive_fds=CLIENT_MAX_MSG_FDS)
        return cls(transport, max_data_xfer_size=max_data_xfer_size, dma_layout=dma_layout)

    @classmethod
    async def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        negotiate: bool = True,
        capabilities: Mapping[str, Any] | None = None,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
        dma_layout: DmaLayout = DmaLayout.SPEC,
    ) -> Self:
        """Connect to a server's socket and, unless told not to, negotiate VERSION."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, os.fspath(path))
            client = cls.on_socket(
                sock, max_data_xfer_size=max_data_xfer_size, dma_layout=dma_layout
            )
        except BaseException:
            sock.close()
            raise
        if negotiate:
            try:
                await client.negotiate(capabilities)
            except BaseException:
                client.close()
                raise
        return client

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    # Raw access, for tests that send what a well-behaved client would not

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Put bytes on the socket as they are, with `fds` attached to the first byte."""
        self.transport.send((data,), fds)

    # Commands

    async def negotiate(
        self,
        capabilities: Mapping[str, Any] | None = None,
        *,
        major: int = PROTOCOL_MAJOR,
        minor: int = PROTOCOL_MINOR,
    ) -> Version:
        """Send VERSION with our capabilities; every other command needs it first."""
        if capabilities is None:
            capabilities = {
                "max_msg_fds": CLIENT_MAX_MSG_FDS,
                "max_data_xfer_size": self.max_data_xfer_size,
            }
        request = Version(major, minor, build_capabilities(capabilities))
        reply = Version.parse((await self.request(Command.VERSION, request.build())).payload)
        if reply.major != major or reply.minor > minor:
            raise ProtocolError(f"server answered version {reply.major}.{reply.minor}")
        self.server = parse_capabilities(reply.capabilities)
        self.server_version = (reply.major, reply.minor)
        return reply

    async def get_device_info(self) -> DeviceInfo:
        """DEVICE_GET_INFO: the device's flags and region and IRQ counts."""
        request = DeviceInfo(16, 0, 0, 0).build()
        return DeviceInfo.parse((await self.request(Command.DEVICE_GET_INFO, request)).payload)

    async def get_region_info(
        self, index: int, *, argsz: int = RegionInfo.SIZE
    ) -> tuple[RegionInfo, list[int]]:
        """The region's description and the fds that came with it (now the caller's)."""
        request = RegionInfo(argsz, 0, index, 0, 0, 0, b"").build()
        reply = await self.request(Command.DEVICE_GET_REGION_INFO, request)
        return RegionInfo.parse(reply.payload), reply.take_fds()

    async def get_region_io_fds(
        self, index: int, *, argsz: int = 16
    ) -> tuple[IoFdsReply, list[int]]:
        """DEVICE_GET_REGION_IO_FDS: the doorbell eventfds of a region, and the fds."""
        request = IoFdsRequest(argsz, 0, index, 0).build()
        reply = await self.request(Command.DEVICE_GET_REGION_IO_FDS, request)
        return IoFdsReply.parse(reply.payload), reply.take_fds()

    async def get_irq_info(self, index: int) -> IrqInfo:
        """DEVICE_GET_IRQ_INFO: the flags and vector count of one IRQ index."""
        request = IrqInfo(16, 0, index, 0).build()
        return IrqInfo.parse((await self.request(Command.DEVICE_GET_IRQ_INFO, request)).payload)

    async def set_irqs(
        self,
        index: int,
        flags: int,
        start: int,
        count: int,
        *,
        data: bytes = b"",
        fds: Sequence[int] = (),
    ) -> None:
        """DEVICE_SET_IRQS: wire, trigger, mask or unmask vectors, as the kernel's ioctl."""
        request = IrqSet(20 + len(data), flags, index, start, count, data)
        await self.request(Command.DEVICE_SET_IRQS, request.build(), fds)

    async def region_read(self, region: int, offset: int, count: int) -> bytes:
        """REGION_READ: `count` bytes of a region, checked to be what was asked."""
        request = ACCESS_CODEC.pack(offset, region, count)
        payload = (await self.request(Command.REGION_READ, request)).payload
        if len(payload) < ACCESS_CODEC.size:
            raise ProtocolError(f"REGION_READ reply of {len(payload)} bytes")
        *_access, got = ACCESS_CODEC.unpack_from(payload)
        data = payload[ACCESS_CODEC.size :]
        if got != count or len(data) != count:
            raise ProtocolError(f"asked for {count} bytes, got {len(data)}")
        return data

    async def region_write(
        self, region: int, offset: int, data: bytes, *, posted: bool = False
    ) -> None:
        """Write to a region; a posted write (NO_REPLY) returns once it is sent."""
        request = ACCESS_CODEC.pack(offset, region, len(data)) + data
        if posted:
            self.post(Command.REGION_WRITE, request)
            await self.transport.drain()
        else:
            await self.request(Command.REGION_WRITE, request)

    async def region_write_multi(
        self, writes: Iterable[tuple[int, int, bytes]], *, posted: bool = True
    ) -> None:
        """REGION_WRITE_MULTI of (region, offset, data of 1-8 bytes) writes, posted as
        QEMU sends it unless `posted` is False."""
        entries = tuple(
            WriteOne(offset, region, len(data), data.ljust(8, b"\0"))
            for region, offset, data in writes
        )
        request = build_write_multi(entries)
        if posted:
            self.post(Command.REGION_WRITE_MULTI, request)
            await self.transport.drain()
        else:
            await self.request(Command.REGION_WRITE_MULTI, request)

    async def dma_map(
        self,
        address: int,
        size: int,
        *,
        fd: int | None = None,
        offset: int = 0,
        flags: int = DmaMapFlag.READ | DmaMapFlag.WRITE,
        backing: bytearray | memoryview | None = None,
    ) -> None:
        """Map a window of guest memory, shared through `fd` or not. The server's
        DMA_READ/DMA_WRITE to it are served from `backing` (the same memory as the fd's,
        when there is one: a server may use messages even then)."""
        if backing is not None and len(backing) < size:
            raise ValueError("backing memory must cover the window")
        request = DmaMap(32, flags, offset, address, size).build()
        await self.request(Command.DMA_MAP, request, () if fd is None else (fd,))
        if backing is not None:
            self.session.guest[address] = memoryview(backing)[:size]

    async def dma_unmap(self, address: int, size: int, *, flags: int = 0) -> DmaUnmapReply:
        """DMA_UNMAP: remove a window (or all, with UNMAP_ALL); the server quiesces it."""
        request = DmaUnmap(24, flags, address, size, None).build()
        reply = DmaUnmapReply.parse((await self.request(Command.DMA_UNMAP, request)).payload)
        if flags & DmaUnmapFlag.UNMAP_ALL:
            self.session.guest.clear()
        else:
            self.session.guest.pop(address, None)
        return reply

    async def migration_flags(self) -> MigrationFlag:
        """What migration the device offers (DEVICE_FEATURE MIGRATION)."""
        reply = await self.device_feature(
            FeatureFlag.GET | Feature.MIGRATION, argsz=DeviceFeature.SIZE + MigrationFeature.SIZE
        )
        return MigrationFlag(MigrationFeature.parse(reply.data).flags)

    async def migration_state(self) -> MigrationState:
        """The device's migration state (DEVICE_FEATURE MIG_DEVICE_STATE GET)."""
        reply = await self.device_feature(
            FeatureFlag.GET | Feature.MIG_DEVICE_STATE,
            argsz=DeviceFeature.SIZE + MigDeviceState.SIZE,
        )
        return MigrationState(MigDeviceState.parse(reply.data).device_state)

    async def set_migration_state(self, state: MigrationState) -> None:
        """Move the device to `state` (DEVICE_FEATURE MIG_DEVICE_STATE SET)."""
        await self.device_feature(
            FeatureFlag.SET | Feature.MIG_DEVICE_STATE, MigDeviceState(state, 0).build()
        )

    async def reset(self) -> None:
        """DEVICE_RESET: the device's reset hook runs with ResetReason.DEVICE_RESET."""
        await self.request(Command.DEVICE_RESET, Empty().build())

    async def device_feature(
        self, flags: int, data: bytes = b"", *, argsz: int | None = None
    ) -> DeviceFeature:
        """DEVICE_FEATURE with raw flags and data, for what the helpers don't cover."""
        request = DeviceFeature(8 + len(data) if argsz is None else argsz, flags, data)
        reply = await self.request(Command.DEVICE_FEATURE, request.build())
        return DeviceFeature.parse(reply.payload)

    async def mig_data_read(self, size: int) -> bytes:
        """MIG_DATA_READ: up to `size` bytes of migration data; empty at the end."""
        request = MigDataRead(8 + size, size).build()
        reply = MigData.parse((await self.request(Command.MIG_DATA_READ, request)).payload)
        return reply.data[: reply.size]

    async def mig_data_write(self, data: bytes) -> None:
        """MIG_DATA_WRITE: hand migration data to a resuming device."""
        request = MigData(8 + len(data), len(data), data).build_parts()
        await self.request(Command.MIG_DATA_WRITE, request)


@dataclass(frozen=True)
class MigrationReport:
    """What `migrate` moved."""

    pre_copy_bytes: int
    stop_copy_bytes: int
    pre_copy_rounds: int


async def migrate(
    source: Client, destination: Client, *, pre_copy_rounds: int = 2, chunk_size: int | None = None
) -> MigrationReport:
    """Move a device's state from the server `source` talks to, to `destination`'s,
    as a VMM does: pre-copy rounds while the source runs (if it supports them), then
    stop-and-copy; the destination loads it, the source stays stopped, the
    destination runs. DMA windows and interrupts are the caller's to set up."""
    size = chunk_size or min(source.max_data_xfer_size, destination.max_data_xfer_size)
    if source.server is not None:
        size = min(size, source.server.max_data_xfer_size)
    flags = await source.migration_flags()
    await destination.set_migration_state(MigrationState.RESUMING)
    pre_copy = rounds = 0
    if flags & MigrationFlag.PRE_COPY and pre_copy_rounds:
        await source.set_migration_state(MigrationState.PRE_COPY)
        for rounds in range(1, pre_copy_rounds + 1):  # noqa: B007 - reported
            moved = await _copy(source, destination, size)
            pre_copy += moved
            if not moved:
                break
    await source.set_migration_state(MigrationState.STOP_COPY)
    stop_copy = await _copy(source, destination, size)
    await destination.set_migration_state(MigrationState.STOP)
    await source.set_migration_state(MigrationState.STOP)
    await destination.set_migration_state(MigrationState.RUNNING)
    return MigrationReport(pre_copy, stop_copy, rounds)


async def _copy(source: Client, destination: Client, size: int) -> int:
    """Move data until the source has none for now; the bytes moved."""
    moved = 0
    while True:
        data = await source.mig_data_read(size)
        if not data:
            return moved
        await destination.mig_data_write(data)
        moved += len(data)
