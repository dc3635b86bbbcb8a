"""Region access: reads, writes, posted writes, ordering, reset, and config space."""

from __future__ import annotations

import asyncio
import struct

from muser import Client, ResetReason
from muser.wire.constants import Command, DeviceFlag, PciRegion, RegionFlag
from muser.wire.messages import RegionAccess, RegionData
from tests.helpers import RecordingDevice


async def test_device_info(client: Client) -> None:
    info = await client.get_device_info()
    assert info.argsz == 16
    assert info.flags == DeviceFlag.PCI | DeviceFlag.RESET
    assert (info.num_regions, info.num_irqs) == (9, 5)


async def test_region_info(client: Client) -> None:
    expected = {
        0: (RegionFlag.READ | RegionFlag.WRITE, 4096),
        1: (RegionFlag.READ | RegionFlag.WRITE, 16),
        2: (RegionFlag.READ | RegionFlag.WRITE, 256),
        3: (0, 0),
        4: (RegionFlag.READ, 0x4000),
        5: (0, 0),
        6: (0, 0),
        7: (RegionFlag.READ | RegionFlag.WRITE, 256),
        8: (0, 0),
    }
    for index, (flags, size) in expected.items():
        info, fds = await client.get_region_info(index)
        assert fds == []
        assert (info.argsz, info.index, info.flags, info.size, info.cap_offset) == (
            32,
            index,
            flags,
            size,
            0,
        )


async def test_region_info_with_larger_argsz(client: Client) -> None:
    """A client may pad the request up to argsz; the reply is still 32 bytes."""
    info, _ = await client.get_region_info(0, argsz=80)
    assert info.argsz == 32
    assert info.caps == b""


async def test_config_space_identity_and_bars(client: Client) -> None:
    config = await client.region_read(PciRegion.CONFIG, 0, 256)
    vendor, device_id, command, status = struct.unpack_from("<4H", config, 0)
    assert (vendor, device_id, command, status) == (0x1AF4, 0x10F0, 0, 0)
    assert config[8] == 0x02
    assert config[9:12] == b"\x00\x00\xff"
    assert struct.unpack_from("<6I", config, 0x10) == (0, 0, 1, 0, 0xC, 0)
    assert struct.unpack_from("<HH", config, 0x2C) == (0x1AF4, 0x1100)


async def test_bar_sizing(client: Client) -> None:
    for register in range(0x10, 0x28, 4):
        await client.region_write(7, register, b"\xff\xff\xff\xff")
    bars = struct.unpack("<6I", await client.region_read(7, 0x10, 24))
    assert bars == (0xFFFFF000, 0xFFFFFFF0, 0xFFFFFF01, 0, 0xFFFFC00C, 0xFFFFFFFF)


async def test_config_writes_respect_masks(client: Client) -> None:
    await client.region_write(7, 0, b"\xff" * 8)
    await client.region_write(7, 0x3C, b"\x0b\xff")
    config = await client.region_read(7, 0, 64)
    assert config[0:4] == b"\xf4\x1a\xf0\x10", "IDs are read-only"
    assert struct.unpack_from("<HH", config, 4) == (0x0547, 0), "writable command bits only"
    assert config[0x3C:0x3E] == b"\x0b\x01", "line is writable, pin is not"
    await client.region_write(7, 0x05, b"\x00")
    assert await client.region_read(7, 4, 2) == b"\x47\x00", "a byte write to the high half"


async def test_read_and_write_memory(client: Client, device: RecordingDevice) -> None:
    await client.region_write(0, 100, b"hello")
    assert device.memory[100:105] == b"hello"
    assert await client.region_read(0, 98, 9) == b"\0\0hello\0\0"
    assert await client.region_read(0, 0, 4096) == bytes(device.memory)


async def test_async_handlers(client: Client, device: RecordingDevice) -> None:
    device.io_delay = 0.001
    await client.region_write(2, 0x10, b"\x01\x02")
    assert await client.region_read(2, 0x10, 2) == b"\x01\x02"


async def test_zero_count_access(client: Client, device: RecordingDevice) -> None:
    reply = await client.exchange(Command.REGION_READ, RegionAccess(4096, 0, 0).build())
    assert RegionData.parse(reply.payload) == RegionData(4096, 0, 0, b"")
    reply = await client.exchange(Command.REGION_WRITE, RegionData(0, 3, 0, b"").build())
    assert RegionAccess.parse(reply.payload) == RegionAccess(0, 3, 0)
    assert device.log == []


async def test_write_reply_echoes_access(client: Client) -> None:
    reply = await client.exchange(Command.REGION_WRITE, RegionData(8, 0, 2, b"ab").build())
    assert reply.flags == 1
    assert RegionAccess.parse(reply.payload) == RegionAccess(8, 0, 2)


async def test_posted_writes_apply_before_later_reads(
    client: Client, device: RecordingDevice
) -> None:
    device.io_delay = 0.002
    for value in range(20):
        await client.region_write(2, value, bytes([value]), posted=True)
        await client.region_write(0, value, bytes([value + 1]), posted=True)
    assert await client.region_read(2, 0, 20) == bytes(range(20))
    assert await client.region_read(0, 0, 20) == bytes(range(1, 21))


async def test_pipelined_commands_complete_in_arrival_order(
    client: Client, device: RecordingDevice
) -> None:
    """Slow async handlers and instant ones, all in flight at once: the device sees
    them in order and every reply carries what its own request asked for."""
    device.io_delay = 0.001
    requests = []
    for index in range(30):
        if index % 3 == 0:
            requests.append(client.region_write(2, index, bytes([index])))
        elif index % 3 == 1:
            requests.append(client.region_write(0, index, bytes([index])))
        else:
            requests.append(client.region_read(2, index - 2, 1))
    results = await asyncio.gather(*requests)
    for index in range(2, 30, 3):
        assert results[index] == bytes([index - 2])
    assert [offset for _kind, offset, _data in device.log] == [
        index if index % 3 != 2 else index - 2 for index in range(30)
    ]


async def test_device_reset(client: Client, device: RecordingDevice) -> None:
    await client.region_write(0, 0, b"data")
    await client.region_write(7, 0x04, b"\x06\x00")
    await client.region_write(7, 0x10, b"\x00\x00\x0f\xfe")
    await client.reset()
    assert device.resets == [ResetReason.DEVICE_RESET]
    assert device.memory[:4] == bytes(4)
    config = await client.region_read(7, 0, 0x14)
    assert config[4:6] == b"\0\0"
    assert config[0x10:0x14] == bytes(4)


async def test_async_reset_hook(client: Client, device: RecordingDevice) -> None:
    seen = []

    async def slow_reset(reason: ResetReason) -> None:
        await asyncio.sleep(0.01)
        seen.append(reason)

    device.reset = slow_reset  # type: ignore[method-assign]
    await client.reset()
    assert seen == [ResetReason.DEVICE_RESET]


async def test_short_read_from_handler_is_eio(client: Client, device: RecordingDevice) -> None:
    device.bars[0].read.__self__.memory = bytearray(2)  # type: ignore[union-attr]
    reply = await client.exchange(Command.REGION_READ, RegionAccess(0, 0, 4).build())
    assert reply.is_error
    assert reply.error == 5


async def test_largest_read_and_write(client: Client) -> None:
    await client.region_write(7, 0x3C, b"\x05")
    data = await client.region_read(7, 0, 256)
    assert len(data) == 256
    assert data[0x3C] == 5
