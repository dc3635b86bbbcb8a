"""Region access at speed: BAR memory the client maps, doorbells (ioeventfds),
REGION_WRITE_MULTI and long streams of posted writes."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import struct
from collections.abc import AsyncIterator, Callable

import pytest

import muser
from muser import Bar, BarKind, Client, Server
from muser.device.regions import Doorbell, SharedMemory
from muser.wire.constants import Command, IoEventFdFlag, RegionFlag
from muser.wire.messages import (
    IoFdsRequest,
    RegionInfo,
    SparseMmapCap,
    io_fd_entries,
    region_caps,
)
from tests.helpers import open_fds

AREAS = ((0x1000, 0x1000), (0x3000, 0x1000))


class FastDevice(muser.PciDevice):
    """BAR0: 16 KiB, two pages mappable, registers elsewhere, doorbells at 0x0 (any
    value) and 0x8 (value 0x42 only). BAR2: I/O with a doorbell."""

    def __init__(self) -> None:
        self.registers = bytearray(0x4000)
        self.writes: list[tuple[int, bytes]] = []
        self.rings: list[tuple[str, int | None, int]] = []
        self.woken = asyncio.Event()
        super().__init__(
            vendor_id=0x1234,
            device_id=0xFA57,
            bars={
                0: Bar(
                    0x4000,
                    read=self.read,
                    write=self.write,
                    shared=SharedMemory(areas=AREAS),
                    doorbells=(
                        Doorbell(0x0, 4, self.doorbell("any")),
                        Doorbell(0x8, 4, self.async_doorbell, datamatch=0x42),
                    ),
                ),
                2: Bar(
                    16,
                    kind=BarKind.IO,
                    read=self.read,
                    write=self.write,
                    doorbells=(Doorbell(0x4, 2, self.doorbell("io")),),
                ),
            },
        )

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.registers[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))
        self.registers[offset : offset + len(data)] = data

    def doorbell(self, name: str) -> muser.device.regions.DoorbellHandler:
        def ring(value: int | None, count: int) -> None:
            self.rings.append((name, value, count))
            self.woken.set()

        return ring

    async def async_doorbell(self, value: int | None, count: int) -> None:
        await asyncio.sleep(0)
        self.rings.append(("match", value, count))
        self.woken.set()


@pytest.fixture
def device() -> FastDevice:
    return FastDevice()


@pytest.fixture
async def client(device: FastDevice, sock_path: str) -> AsyncIterator[Client]:
    async with Server(device, sock_path), await Client.connect(sock_path) as connected:
        yield connected


async def full_region_info(client: Client, index: int) -> tuple[RegionInfo, list[int]]:
    first, fds = await client.get_region_info(index)
    assert fds == [], "the short reply carries no fd"
    return await client.get_region_info(index, argsz=first.argsz)


class TestSharedMemory:
    async def test_region_info_truncation_and_retry(self, client: Client) -> None:
        short, fds = await client.get_region_info(0)
        assert (short.argsz, short.flags, short.cap_offset, short.caps) == (
            32 + 16 + 32,
            RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP,
            0,
            b"",
        )
        assert fds == []
        info, fds = await client.get_region_info(0, argsz=short.argsz)
        assert info.flags == RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP | RegionFlag.CAPS
        assert (info.argsz, info.cap_offset, info.size) == (80, 32, 0x4000)
        assert len(fds) == 1
        (cap,) = region_caps(info)
        assert isinstance(cap, SparseMmapCap)
        assert [(area.offset, area.size) for area in cap.areas] == list(AREAS)
        os.close(fds[0])

    async def test_client_mapping_and_device_memory_are_one(
        self, client: Client, device: FastDevice
    ) -> None:
        before = open_fds()
        info, (fd,) = await full_region_info(client, 0)
        mappings = [mmap.mmap(fd, size, offset=info.offset + offset) for offset, size in AREAS]
        os.close(fd)
        mappings[0][0:5] = b"guest"
        mappings[1][8:12] = b"\xaa\xbb\xcc\xdd"
        memory = device.shared_memory(0)
        assert bytes(memory[0x1000:0x1005]) == b"guest"
        assert bytes(memory[0x3008:0x300C]) == b"\xaa\xbb\xcc\xdd"
        memory[0x1010:0x1016] = b"device"
        assert mappings[0][0x10:0x16] == b"device"
        assert await client.region_read(0, 0x1000, 5) == b"guest", "messages hit the memory"
        await client.region_write(0, 0x3000, b"msg!")
        assert mappings[1][0:4] == b"msg!"
        assert device.writes == []
        await client.region_write(0, 0x2000, b"reg")
        assert device.writes == [(0x2000, b"reg")], "outside the areas: the handler"
        straddle = await client.region_read(0, 0x0FFE, 4)
        assert straddle == b"\0\0gu"
        for mapping in mappings:
            mapping.close()
        assert open_fds() == before

    async def test_watch_memory_reports_changes(self, client: Client, device: FastDevice) -> None:
        info, (fd,) = await full_region_info(client, 0)
        mapping = mmap.mmap(fd, 0x1000, offset=info.offset + 0x3000)
        os.close(fd)
        changes = device.watch_memory(0, 0x3100, 4, interval=0.001)
        waiting = asyncio.ensure_future(anext(changes))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        mapping[0x100:0x104] = b"ping"
        assert await asyncio.wait_for(waiting, 2) == b"ping"
        await changes.aclose()  # type: ignore[attr-defined]
        mapping.close()

    @pytest.mark.parametrize(
        ("declare", "match"),
        [
            (lambda: Bar(16, kind=BarKind.IO, shared=SharedMemory()), "memory BARs"),
            (lambda: Bar(0x2000, shared=SharedMemory(areas=((0x1000, 0x2000),))), "leaves"),
            (
                lambda: Bar(0x2000, shared=SharedMemory(areas=((0, 0x2000), (0x1000, 0x1000)))),
                "overlaps",
            ),
            (
                lambda: Bar(0x2000, shared=SharedMemory(), doorbells=(Doorbell(8, 4, print),)),
                "mmap area",
            ),
            (lambda: Bar(0x1000, doorbells=(Doorbell(0x1000, 4, print),)), "outside the BAR"),
            (
                lambda: Bar(
                    0x4000,
                    shared=SharedMemory(areas=((0, 0x1000),)),
                    doorbells=(Doorbell(0x3FFC, 4, print),),
                ),
                None,
            ),
        ],
    )
    def test_declarations(self, declare: Callable[[], Bar], match: str | None) -> None:
        if match is None:
            muser.PciDevice(vendor_id=1, device_id=1, bars={0: declare()})
            return
        with pytest.raises(ValueError, match=match):
            muser.PciDevice(vendor_id=1, device_id=1, bars={0: declare()})

    def test_msix_must_stay_out_of_the_areas(self) -> None:
        with pytest.raises(ValueError, match="MSI-X"):
            muser.PciDevice(
                vendor_id=1,
                device_id=1,
                bars={0: Bar(0x4000, shared=SharedMemory())},
                capabilities=[
                    muser.MsiX(
                        table_size=1, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x1000
                    )
                ],
            )

    def test_unaligned_areas(self) -> None:
        with pytest.raises(ValueError, match="whole pages"):
            SharedMemory(areas=((0x800, 0x1000),))


class TestDoorbells:
    async def io_fds(self, client: Client, index: int) -> tuple[list[object], list[int]]:
        short, fds = await client.get_region_io_fds(index)
        assert fds == []
        reply, fds = await client.get_region_io_fds(index, argsz=short.argsz)
        return list(io_fd_entries(reply)), fds

    async def test_io_fds_layout(self, client: Client) -> None:
        short, fds = await client.get_region_io_fds(0)
        assert (short.argsz, short.count, fds) == (16 + 2 * 48, 2, [])
        entries, fds = await self.io_fds(client, 0)
        assert len(fds) == 2
        assert [
            (e.offset, e.size, e.fd_index, e.type, e.flags, e.datamatch)  # type: ignore[attr-defined]
            for e in entries
        ] == [(0, 4, 0, 0, 0, 0), (8, 4, 1, 0, 1, 0x42)]
        io_entries, io_fds = await self.io_fds(client, 2)
        assert io_entries[0].flags == IoEventFdFlag.PIO  # type: ignore[attr-defined]
        empty, none = await client.get_region_io_fds(7)
        assert (empty.count, empty.argsz, none) == (0, 16, [])
        for fd in fds + io_fds:
            os.close(fd)

    async def test_eventfds_wake_the_handlers(self, client: Client, device: FastDevice) -> None:
        _entries, (plain, matched) = await self.io_fds(client, 0)
        os.eventfd_write(plain, 1)
        await asyncio.wait_for(device.woken.wait(), 2)
        device.woken.clear()
        os.eventfd_write(matched, 1)
        os.eventfd_write(matched, 1)
        await asyncio.wait_for(device.woken.wait(), 2)
        assert device.rings[0] == ("any", None, 1), "no datamatch: the value is unknown"
        assert device.rings[1][:2] == ("match", 0x42)
        assert sum(count for _name, _value, count in device.rings[1:]) == 2
        assert device.writes == []
        os.close(plain)
        os.close(matched)

    async def test_messages_ring_the_same_doorbells(
        self, client: Client, device: FastDevice
    ) -> None:
        await client.region_write(0, 0x0, (7).to_bytes(4, "little"))
        await client.region_write(0, 0x8, (0x42).to_bytes(4, "little"))
        await client.region_write(0, 0x8, (0x43).to_bytes(4, "little"))
        await client.region_write(0, 0x0, b"\1\0")
        await client.region_write(2, 0x4, b"\5\0", posted=True)
        await client.region_read(2, 0, 1)
        assert device.rings == [("any", 7, 1), ("match", 0x42, 1), ("io", 5, 1)]
        assert device.writes == [(0x8, b"\x43\0\0\0"), (0x0, b"\1\0")], (
            "no match: the register's handler"
        )

    @pytest.mark.parametrize(
        ("payload", "name"),
        [
            (IoFdsRequest(16, 1, 0, 0).build(), "flags"),
            (IoFdsRequest(16, 0, 0, 1).build(), "count"),
            (IoFdsRequest(15, 0, 0, 0).build(), "argsz"),
            (IoFdsRequest(16, 0, 9, 0).build(), "index 9"),
            (IoFdsRequest(16, 0, 3, 0).build(), "absent region"),
            (IoFdsRequest(16, 0, 0, 0).build()[:12], "short"),
        ],
    )
    async def test_invalid_requests(self, client: Client, payload: bytes, name: str) -> None:
        reply = await client.exchange(Command.DEVICE_GET_REGION_IO_FDS, payload)
        assert (reply.is_error, reply.error, reply.fds) == (True, errno.EINVAL, [])


class TestWriteMulti:
    async def test_negotiated_only_when_offered(self, device: FastDevice, sock_path: str) -> None:
        async with Server(device, sock_path):
            async with await Client.connect(
                sock_path, capabilities={"max_msg_fds": 8, "write_multiple": True}
            ) as client:
                assert client.server is not None
                assert client.server.write_multiple
            async with await Client.connect(sock_path) as client:
                assert client.server is not None
                assert not client.server.write_multiple

    async def test_writes_apply_in_order(self, client: Client, device: FastDevice) -> None:
        await client.region_write_multi(
            [
                (0, 0x2000, b"ab"),
                (0, 0x2001, b"XYZ"),
                (0, 0x1000, b"shared"),
                (0, 0x0, b"\1\0\0\0"),
            ]
        )
        await client.region_write_multi([(0, 0x2100, b"12345678")], posted=False)
        assert device.writes == [(0x2000, b"ab"), (0x2001, b"XYZ"), (0x2100, b"12345678")]
        assert device.registers[0x2000:0x2004] == b"aXYZ"
        assert bytes(device.shared_memory(0)[0x1000:0x1006]) == b"shared"
        assert device.rings == [("any", 1, 1)]

    async def test_a_bad_entry_applies_none(self, client: Client, device: FastDevice) -> None:
        for bad in ([(0, 0x2000, b"ok"), (0, 0x4000, b"x")], [(0, 0x2000, b"")], [(9, 0, b"x")]):
            with pytest.raises(muser.VfioUserError) as caught:
                await client.region_write_multi(bad, posted=False)
            assert caught.value.errno == errno.EINVAL
        client.post(Command.REGION_WRITE_MULTI, struct.pack("<Q", 5) + bytes(24))
        assert await client.region_read(0, 0x2000, 2) == b"\0\0"
        assert device.writes == []


async def test_ten_thousand_posted_writes_then_a_read(client: Client, device: FastDevice) -> None:
    for value in range(10_000):
        await client.region_write(
            0, 0x2000 + value % 256 * 4, value.to_bytes(4, "little"), posted=True
        )
    last = await client.region_read(0, 0x2000 + 9_999 % 256 * 4, 4)
    assert int.from_bytes(last, "little") == 9_999
    assert len(device.writes) == 10_000
    assert [int.from_bytes(data, "little") for _offset, data in device.writes] == list(
        range(10_000)
    )


def test_close_releases_what_muser_made() -> None:
    before = open_fds()
    device = FastDevice()
    assert len(open_fds()) == len(before) + 3 + 2, "3 doorbell eventfds, a memfd, its map's"
    device.close()
    assert open_fds() == before
    FastDevice()
    assert open_fds() == before, "a dropped device releases them too"
