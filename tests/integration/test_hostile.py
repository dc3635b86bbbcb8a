"""Every kind of bad input, one harness: the exact errno or a clean close, another
device on the same loop still served, and not one descriptor leaked."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

import muser
from muser import Bar, BarKind, Client, Server
from muser.device.regions import Doorbell, SharedMemory
from muser.wire import build_capabilities
from muser.wire.constants import Command, FeatureFlag
from muser.wire.messages import (
    DeviceFeature,
    DmaLoggingReport,
    IoFdsRequest,
    MigData,
    MigDataRead,
    RegionAccess,
    RegionData,
    RegionInfo,
    Version,
)
from tests.helpers import RawPeer, message, open_fds
from tests.integration.test_dma import GUEST, MAP_INVALID, UNMAP_INVALID
from tests.integration.test_interrupts import INVALID as SET_IRQS_INVALID

CLOSE = "close"
"""The protocol cannot go on: the server closes, sending at most one EINVAL first."""


@dataclass(frozen=True)
class Row:
    name: str
    data: bytes
    expect: int | str
    fds: int = 0
    """How many fds go with it: eventfds, or one fd that is not an eventfd if -1."""
    negotiate: bool = True
    dma_window: bool = False


def command(number: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return message(9, number, payload, flags=flags)


def version(capabilities: bytes) -> bytes:
    return command(Command.VERSION, Version(0, 0, capabilities).build())


def region_access(offset: int, region: int, count: int) -> bytes:
    return RegionAccess(offset, region, count).build()


def feature(flags: int, data: bytes = b"", argsz: int | None = None) -> bytes:
    return command(
        Command.DEVICE_FEATURE,
        DeviceFeature(8 + len(data) if argsz is None else argsz, flags, data).build(),
    )


ROWS = [
    # framing: nothing can follow
    Row("message type 2", message(1, 1, bytes(4), flags=2), CLOSE, negotiate=False),
    Row("message type 7 after negotiation", command(4, bytes(16), flags=7), CLOSE),
    Row("size 0", message(1, 1, size=0), CLOSE),
    Row("size 15", message(1, 4, size=15), CLOSE),
    Row("size over the limit", message(1, 10, size=(1 << 20) + 33)[:16], CLOSE),
    Row("size 4 GiB", message(1, 10, size=0xFFFFFFFF)[:16], CLOSE),
    Row("17 fds", command(Command.DEVICE_SET_IRQS, bytes(20)), CLOSE, fds=17),
    # negotiation
    Row(
        "first message not VERSION",
        command(Command.DEVICE_GET_INFO, bytes(16)),
        CLOSE,
        negotiate=False,
    ),
    Row("VERSION short", command(Command.VERSION, b"\0\0"), CLOSE, negotiate=False),
    Row(
        "VERSION major 1",
        command(Command.VERSION, Version(1, 0, b"").build()),
        CLOSE,
        negotiate=False,
    ),
    Row("VERSION without NUL", version(b"{}"), CLOSE, negotiate=False),
    Row("VERSION not JSON", version(b"{{\0"), CLOSE, negotiate=False),
    Row("VERSION JSON list", version(b"[]\0"), CLOSE, negotiate=False),
    Row(
        "VERSION max_msg_fds 2048",
        version(build_capabilities({"max_msg_fds": 2048})),
        CLOSE,
        negotiate=False,
    ),
    Row(
        "VERSION max_data_xfer_size -1",
        version(build_capabilities({"max_data_xfer_size": -1})),
        CLOSE,
        negotiate=False,
    ),
    Row(
        "VERSION pgsizes 512",
        version(build_capabilities({"pgsizes": 512})),
        CLOSE,
        negotiate=False,
    ),
    Row(
        "VERSION write_multiple 1",
        version(build_capabilities({"write_multiple": 1})),
        CLOSE,
        negotiate=False,
    ),
    Row("VERSION with an fd", version(b""), CLOSE, fds=1, negotiate=False),
    Row("second VERSION", version(b""), errno.EINVAL),
    # unknown and server-only commands
    *(
        Row(f"command {number}", command(number, bytes(16)), errno.EINVAL)
        for number in (
            0,
            Command.DMA_READ,
            Command.DMA_WRITE,
            Command.DIRTY_PAGES,
            19,
            255,
            0xFFFF,
        )
    ),
    Row("unsolicited reply", command(Command.DMA_READ, bytes(16), flags=1), errno.EINVAL),
    # device info
    Row("GET_INFO empty", command(Command.DEVICE_GET_INFO), errno.EINVAL),
    Row(
        "GET_INFO argsz 8",
        command(Command.DEVICE_GET_INFO, struct.pack("<4I", 8, 0, 0, 0)),
        errno.EINVAL,
    ),
    Row("GET_INFO 17 bytes", command(Command.DEVICE_GET_INFO, bytes(17)), errno.EINVAL),
    Row("REGION_INFO argsz 0", command(Command.DEVICE_GET_REGION_INFO, bytes(32)), errno.EINVAL),
    Row(
        "REGION_INFO index 9",
        command(Command.DEVICE_GET_REGION_INFO, RegionInfo(32, 0, 9, 0, 0, 0, b"").build()),
        errno.EINVAL,
    ),
    Row(
        "REGION_INFO index 2**32-1",
        command(
            Command.DEVICE_GET_REGION_INFO, RegionInfo(32, 0, 2**32 - 1, 0, 0, 0, b"").build()
        ),
        errno.EINVAL,
    ),
    Row("REGION_INFO short", command(Command.DEVICE_GET_REGION_INFO, bytes(20)), errno.EINVAL),
    Row(
        "IRQ_INFO index 5",
        command(Command.DEVICE_GET_IRQ_INFO, struct.pack("<4I", 16, 0, 5, 0)),
        errno.EINVAL,
    ),
    Row("IRQ_INFO argsz 0", command(Command.DEVICE_GET_IRQ_INFO, bytes(16)), errno.EINVAL),
    Row(
        "IO_FDS flags",
        command(Command.DEVICE_GET_REGION_IO_FDS, IoFdsRequest(16, 1, 0, 0).build()),
        errno.EINVAL,
    ),
    Row(
        "IO_FDS count",
        command(Command.DEVICE_GET_REGION_IO_FDS, IoFdsRequest(16, 0, 0, 3).build()),
        errno.EINVAL,
    ),
    Row(
        "IO_FDS index 2**32-1",
        command(Command.DEVICE_GET_REGION_IO_FDS, IoFdsRequest(16, 0, 2**32 - 1, 0).build()),
        errno.EINVAL,
    ),
    # region access
    Row("READ region 9", command(Command.REGION_READ, region_access(0, 9, 4)), errno.EINVAL),
    Row("READ past BAR0", command(Command.REGION_READ, region_access(0x3FFF, 0, 2)), errno.EINVAL),
    Row(
        "READ offset wraps",
        command(Command.REGION_READ, region_access(2**64 - 2, 0, 4)),
        errno.EINVAL,
    ),
    Row(
        "READ count 2**32-1",
        command(Command.REGION_READ, region_access(0, 7, 2**32 - 1)),
        errno.EINVAL,
    ),
    Row("READ absent BAR", command(Command.REGION_READ, region_access(0, 5, 1)), errno.EINVAL),
    Row(
        "READ config past the end",
        command(Command.REGION_READ, region_access(200, 7, 100)),
        errno.EINVAL,
    ),
    Row(
        "READ with a tail",
        command(Command.REGION_READ, region_access(0, 0, 4) + b"x"),
        errno.EINVAL,
    ),
    Row(
        "WRITE count over data",
        command(Command.REGION_WRITE, RegionData(0, 0, 9, b"12345678").build()),
        errno.EINVAL,
    ),
    Row(
        "WRITE past BAR2",
        command(Command.REGION_WRITE, RegionData(0x1FFF, 2, 2, b"ab").build()),
        errno.EINVAL,
    ),
    Row(
        "WRITE ROM", command(Command.REGION_WRITE, RegionData(0, 6, 1, b"a").build()), errno.EINVAL
    ),
    Row(
        "WRITE region 2**32-1",
        command(Command.REGION_WRITE, RegionData(0, 2**32 - 1, 1, b"a").build()),
        errno.EINVAL,
    ),
    Row(
        "WRITE handler refuses",
        command(Command.REGION_WRITE, RegionData(0x3F00, 0, 4, b"nope").build()),
        errno.EPERM,
    ),
    Row("WRITE_MULTI short", command(Command.REGION_WRITE_MULTI, bytes(7)), errno.EINVAL),
    Row(
        "WRITE_MULTI count over entries",
        command(Command.REGION_WRITE_MULTI, struct.pack("<Q", 3) + bytes(24)),
        errno.EINVAL,
    ),
    Row(
        "WRITE_MULTI entry of 9 bytes",
        command(Command.REGION_WRITE_MULTI, struct.pack("<QQII8s", 1, 0, 0, 9, bytes(8))),
        errno.EINVAL,
    ),
    Row(
        "WRITE_MULTI past the region",
        command(Command.REGION_WRITE_MULTI, struct.pack("<QQII8s", 1, 0x3FFE, 0, 4, bytes(8))),
        errno.EINVAL,
    ),
    Row("RESET with payload", command(Command.DEVICE_RESET, b"\0\0\0\0"), errno.EINVAL),
    # features and migration
    Row("FEATURE short", command(Command.DEVICE_FEATURE, bytes(4)), errno.EINVAL),
    Row("FEATURE no operation", feature(1), errno.EINVAL),
    Row("FEATURE unknown", feature(FeatureFlag.GET | 0x7FFF), errno.EINVAL),
    Row(
        "FEATURE GET and SET",
        feature(FeatureFlag.GET | FeatureFlag.SET | 2, bytes(8)),
        errno.EINVAL,
    ),
    Row("FEATURE SET MIGRATION", feature(FeatureFlag.SET | 1, bytes(8)), errno.EINVAL),
    Row("FEATURE GET MIGRATION argsz 8", feature(FeatureFlag.GET | 1, argsz=8), errno.EINVAL),
    Row(
        "FEATURE SET state 9", feature(FeatureFlag.SET | 2, struct.pack("<II", 9, 0)), errno.EINVAL
    ),
    Row(
        "FEATURE SET state ERROR",
        feature(FeatureFlag.SET | 2, struct.pack("<II", 0, 0)),
        errno.EINVAL,
    ),
    Row("FEATURE SET state short", feature(FeatureFlag.SET | 2, bytes(4)), errno.EINVAL),
    Row(
        "FEATURE report before start",
        feature(FeatureFlag.GET | 8, DmaLoggingReport(0, 4096, 4096, b"").build(), argsz=48),
        errno.EINVAL,
    ),
    Row("FEATURE reserved bit", feature(0x100000 | FeatureFlag.GET | 1, argsz=16), errno.EINVAL),
    Row(
        "MIG_DATA_READ while running",
        command(Command.MIG_DATA_READ, MigDataRead(72, 64).build()),
        errno.EINVAL,
    ),
    Row(
        "MIG_DATA_WRITE while running",
        command(Command.MIG_DATA_WRITE, MigData(12, 4, b"data").build()),
        errno.EINVAL,
    ),
    Row("MIG_DATA_READ short", command(Command.MIG_DATA_READ, bytes(4)), errno.EINVAL),
    Row(
        "MIG_DATA_WRITE size over data",
        command(Command.MIG_DATA_WRITE, MigData(16, 8, b"data").build()),
        errno.EINVAL,
    ),
    # DMA and interrupts: the tables of their own suites, run here too
    *(
        Row(f"DMA_MAP {name}", command(Command.DMA_MAP, payload), code, fds=nfds, dma_window=True)
        for name, payload, nfds, code in MAP_INVALID
    ),
    *(
        Row(f"DMA_UNMAP {name}", command(Command.DMA_UNMAP, payload), code, dma_window=True)
        for name, payload, code in UNMAP_INVALID
    ),
    *(
        Row(f"SET_IRQS {name}", command(Command.DEVICE_SET_IRQS, payload), errno.EINVAL, fds=nfds)
        for name, payload, nfds in SET_IRQS_INVALID
    ),
]


class Target(muser.PciDevice):
    """Everything muser has: the layout the DMA and SET_IRQS tables assume (MSI-X of
    4 vectors in BAR0, no MSI), a mappable BAR, a doorbell, migration."""

    def __init__(self) -> None:
        super().__init__(
            vendor_id=0x1234,
            device_id=0x4057,
            intx=True,
            bars={
                0: Bar(
                    0x4000,
                    read=self.read,
                    write=self.write,
                    doorbells=(Doorbell(0x2000, 4, lambda value, count: None),),
                ),
                2: Bar(0x2000, shared=SharedMemory()),
                4: Bar(32, kind=BarKind.IO, read=self.read),
            },
            capabilities=[
                muser.MsiX(table_size=4, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x1000)
            ],
            migration=muser.Migration(pre_copy=True),
        )

    def read(self, offset: int, count: int) -> bytes:
        return bytes(count)

    def write(self, offset: int, data: bytes) -> None:
        if offset >= 0x3F00:
            raise muser.VfioUserError(errno.EPERM, "read-only registers")


@pytest.fixture(scope="module")
def guest_fd() -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, GUEST)
    return fd


@pytest.fixture
async def servers(sock_dir: str) -> AsyncIterator[tuple[Server, Server]]:
    async with (
        Server(Target(), os.path.join(sock_dir, "target.sock")) as target,
        Server(
            muser.PciDevice(vendor_id=1, device_id=2), os.path.join(sock_dir, "bystander.sock")
        ) as bystander,
    ):
        yield target, bystander


def test_more_than_a_hundred_rows() -> None:
    assert len(ROWS) >= 100
    assert len({row.name for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
async def test_hostile_input(servers: tuple[Server, Server], row: Row, guest_fd: int) -> None:
    target, bystander = servers
    before = open_fds()
    peer = await RawPeer.connect(target.path)
    if row.negotiate:
        await peer.negotiate()
    if row.dma_window:
        peer.send(command(Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0x20000, 0x4000)))
        header, _ = await peer.receive()
        assert header.flags == 1
    if row.fds < 0:
        read_end, write_end = os.pipe()
        os.close(write_end)
        fds = [read_end]
    else:
        fds = [
            os.eventfd(0) if row.name.startswith("SET_IRQS") or row.fds > 2 else os.dup(guest_fd)
            for _ in range(row.fds)
        ]
    peer.send(row.data, fds)
    for fd in fds:
        os.close(fd)
    if row.expect == CLOSE:
        data = await peer.expect_closed()
        assert data in (
            b"",
            message(9, struct.unpack_from("<H", row.data, 2)[0], flags=0x21)[:12]
            + errno.EINVAL.to_bytes(4, "little"),
        )
    else:
        header, payload = await peer.receive()
        assert (header.flags, header.error, payload) == (0x21, row.expect, b""), row.name
        assert header.msg_id == 9
    peer.close()
    async with await Client.connect(bystander.path) as other:
        assert (await other.get_device_info()).num_regions == 9
    async with await Client.connect(target.path) as again:
        assert (await again.get_device_info()).num_irqs == 5
    while target.connection is not None:
        await asyncio.sleep(0.001)
    assert open_fds() == before
