"""Bad input from a client (protocol.md §1.8): the errno the protocol asks for, or a
clean close, and never a crash, a hang or a leaked descriptor."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from muser import Client, ResetReason, Server
from muser.wire.constants import Command
from muser.wire.messages import Header, RegionAccess, RegionData, Version
from tests.helpers import RawPeer, RecordingDevice, message, open_fds, version_request

EINVAL_REPLY_FLAGS = 0x21


async def expect_error_then_close(peer: RawPeer, msg_id: int, command: int) -> None:
    data = await peer.expect_closed()
    header = Header.parse(data[:16])
    assert len(data) == 16
    assert (header.msg_id, header.command, header.flags, header.error) == (
        msg_id,
        command,
        EINVAL_REPLY_FLAGS,
        errno.EINVAL,
    )


async def still_serving(server: Server) -> None:
    async with await Client.connect(server.path) as client:
        assert (await client.get_device_info()).num_regions == 9


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("short payload", b"\0\0\0"),
        ("wrong major", Version(1, 0, b"").build()),
        ("not NUL-terminated", Version(0, 0, b'{"capabilities":{}}').build()),
        ("not JSON", Version(0, 0, b"{nope\0").build()),
        ("not UTF-8", Version(0, 0, b'{"a":"\xff"}\0').build()),
        ("JSON not an object", Version(0, 0, b"[1]\0").build()),
        ("capabilities not an object", Version(0, 0, b'{"capabilities":3}\0').build()),
        ("max_msg_fds a string", Version(0, 0, b'{"capabilities":{"max_msg_fds":"8"}}\0').build()),
        ("max_msg_fds too big", Version(0, 0, b'{"capabilities":{"max_msg_fds":1025}}\0').build()),
        ("max_msg_fds negative", Version(0, 0, b'{"capabilities":{"max_msg_fds":-1}}\0').build()),
        (
            "max_data_xfer_size 0",
            Version(0, 0, b'{"capabilities":{"max_data_xfer_size":0}}\0').build(),
        ),
        ("pgsizes below 4 KiB", Version(0, 0, b'{"capabilities":{"pgsizes":4097}}\0').build()),
        (
            "write_multiple not bool",
            Version(0, 0, b'{"capabilities":{"write_multiple":1}}\0').build(),
        ),
        (
            "twin_socket not object",
            Version(0, 0, b'{"capabilities":{"twin_socket":true}}\0').build(),
        ),
        ("deep nesting", Version(0, 0, b"[" * 100000 + b"\0").build()),
    ],
)
async def test_bad_version_gets_einval_and_close(
    server: Server, name: str, payload: bytes
) -> None:
    peer = await RawPeer.connect(server.path)
    peer.send(message(7, Command.VERSION, payload))
    await expect_error_then_close(peer, 7, Command.VERSION)
    peer.close()
    await still_serving(server)


async def test_first_message_not_version(server: Server) -> None:
    peer = await RawPeer.connect(server.path)
    peer.send(message(3, Command.DEVICE_GET_INFO, bytes(16)) + version_request(4))
    await expect_error_then_close(peer, 3, Command.DEVICE_GET_INFO)
    peer.close()
    await still_serving(server)


async def test_version_with_fds_is_refused_and_fd_closed(server: Server) -> None:
    before = open_fds()
    peer = await RawPeer.connect(server.path)
    fd = os.eventfd(0)
    peer.send(version_request(1), [fd])
    os.close(fd)
    await expect_error_then_close(peer, 1, Command.VERSION)
    peer.close()
    await still_serving(server)
    assert open_fds() == before


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("message type 2", message(0, Command.VERSION, b"\0" * 4, flags=2)),
        ("message type 15", message(0, Command.VERSION, b"\0" * 4, flags=0xF)),
        ("size below header", message(0, Command.VERSION, size=15)),
        ("size zero", message(0, Command.VERSION, size=0)),
        ("size above limit", message(0, Command.REGION_WRITE, size=(1 << 20) + 33)),
        ("size 4 GiB", message(0, Command.REGION_WRITE, size=0xFFFFFFFF)),
    ],
)
async def test_bad_header_closes_without_reply(server: Server, name: str, data: bytes) -> None:
    peer = await RawPeer.connect(server.path)
    peer.send(data)
    assert await peer.expect_closed() == b""
    peer.close()
    await still_serving(server)


async def test_bad_header_after_negotiation_answers_earlier_commands(
    server: Server, device: RecordingDevice
) -> None:
    peer = await RawPeer.connect(server.path)
    await peer.negotiate()
    write = RegionData(0, 0, 4, b"abcd").build()
    peer.send(message(1, Command.REGION_WRITE, write) + message(2, 0, size=3))
    data = await peer.expect_closed()
    assert Header.parse(data[:16]).flags == 1
    assert len(data) == 32
    assert device.memory[:4] == b"abcd"
    peer.close()


async def test_oversized_message_is_not_buffered(server: Server) -> None:
    """The header alone decides: nothing of the announced 1 GiB is read."""
    peer = await RawPeer.connect(server.path)
    await peer.negotiate()
    peer.send(message(1, Command.REGION_WRITE, size=1 << 30)[:16])
    assert await peer.expect_closed() == b""
    peer.close()


@pytest.mark.parametrize(
    ("name", "command", "payload", "expected"),
    [
        ("second VERSION", Command.VERSION, Version(0, 0, b"").build(), errno.EINVAL),
        ("unknown command 0", 0, b"", errno.EINVAL),
        ("legacy DIRTY_PAGES", Command.DIRTY_PAGES, bytes(8), errno.EINVAL),
        ("command 19", 19, bytes(24), errno.EINVAL),
        ("command 0xffff", 0xFFFF, b"", errno.EINVAL),
        ("GET_INFO without payload", Command.DEVICE_GET_INFO, b"", errno.EINVAL),
        ("GET_INFO short", Command.DEVICE_GET_INFO, bytes(15), errno.EINVAL),
        ("GET_INFO argsz too small", Command.DEVICE_GET_INFO, bytes(16), errno.EINVAL),
        (
            "GET_INFO too long",
            Command.DEVICE_GET_INFO,
            struct.pack("<4I", 16, 0, 0, 0) + b"x",
            errno.EINVAL,
        ),
        ("REGION_INFO short", Command.DEVICE_GET_REGION_INFO, bytes(31), errno.EINVAL),
        (
            "REGION_INFO argsz 31",
            Command.DEVICE_GET_REGION_INFO,
            struct.pack("<IIIIQQ", 31, 0, 0, 0, 0, 0),
            errno.EINVAL,
        ),
        (
            "REGION_INFO index 9",
            Command.DEVICE_GET_REGION_INFO,
            struct.pack("<IIIIQQ", 32, 0, 9, 0, 0, 0),
            errno.EINVAL,
        ),
        (
            "REGION_INFO index 2**32-1",
            Command.DEVICE_GET_REGION_INFO,
            struct.pack("<IIIIQQ", 32, 0, 0xFFFFFFFF, 0, 0, 0),
            errno.EINVAL,
        ),
        ("READ without payload", Command.REGION_READ, b"", errno.EINVAL),
        ("READ short", Command.REGION_READ, bytes(15), errno.EINVAL),
        (
            "READ with data",
            Command.REGION_READ,
            RegionAccess(0, 0, 4).build() + b"x",
            errno.EINVAL,
        ),
        ("READ region 9", Command.REGION_READ, RegionAccess(0, 9, 4).build(), errno.EINVAL),
        (
            "READ region 2**32-1",
            Command.REGION_READ,
            RegionAccess(0, 0xFFFFFFFF, 4).build(),
            errno.EINVAL,
        ),
        ("READ past end", Command.REGION_READ, RegionAccess(4093, 0, 4).build(), errno.EINVAL),
        (
            "READ offset overflow",
            Command.REGION_READ,
            RegionAccess(0xFFFFFFFFFFFFFFFC, 0, 8).build(),
            errno.EINVAL,
        ),
        (
            "READ count over max",
            Command.REGION_READ,
            RegionAccess(0, 7, (1 << 20) + 1).build(),
            errno.EINVAL,
        ),
        ("READ absent region", Command.REGION_READ, RegionAccess(0, 3, 4).build(), errno.EINVAL),
        ("READ ROM (none)", Command.REGION_READ, RegionAccess(0, 6, 1).build(), errno.EINVAL),
        (
            "READ config past 256",
            Command.REGION_READ,
            RegionAccess(255, 7, 2).build(),
            errno.EINVAL,
        ),
        (
            "WRITE count > data",
            Command.REGION_WRITE,
            RegionData(0, 0, 5, b"abcd").build(),
            errno.EINVAL,
        ),
        (
            "WRITE count < data",
            Command.REGION_WRITE,
            RegionData(0, 0, 3, b"abcd").build(),
            errno.EINVAL,
        ),
        (
            "WRITE past end",
            Command.REGION_WRITE,
            RegionData(4095, 0, 2, b"ab").build(),
            errno.EINVAL,
        ),
        (
            "WRITE read-only BAR",
            Command.REGION_WRITE,
            RegionData(0, 4, 1, b"a").build(),
            errno.EINVAL,
        ),
        ("WRITE short", Command.REGION_WRITE, bytes(12), errno.EINVAL),
        ("RESET with payload", Command.DEVICE_RESET, b"\0", errno.EINVAL),
        ("handler refuses", Command.REGION_READ, RegionAccess(0, 1, 4).build(), errno.EPERM),
        ("handler crashes", Command.REGION_READ, RegionAccess(0, 4, 4).build(), errno.EIO),
        (
            "async handler crashes",
            Command.REGION_WRITE,
            RegionData(0, 1, 1, b"x").build(),
            errno.EIO,
        ),
        ("DMA_MAP argsz 0", Command.DMA_MAP, bytes(32), errno.EINVAL),
        ("SET_IRQS without flags", Command.DEVICE_SET_IRQS, bytes(20), errno.EINVAL),
        ("FEATURE without operation", Command.DEVICE_FEATURE, bytes(8), errno.EINVAL),
    ],
)
async def test_bad_request_gets_errno_and_connection_goes_on(
    client: Client, name: str, command: int, payload: bytes, expected: int
) -> None:
    reply = await client.exchange(command, payload)
    assert reply.is_error
    assert reply.flags == EINVAL_REPLY_FLAGS
    assert reply.error == expected
    assert reply.payload == b""
    assert await client.region_read(7, 0, 2) == b"\xf4\x1a"


async def test_failing_posted_command_gets_no_reply(client: Client) -> None:
    """NO_REPLY: nothing is sent, not even an error; the next reply is the next request's."""
    client.post(Command.REGION_READ, RegionAccess(0, 9, 4).build())
    client.post(Command.REGION_WRITE, RegionData(0, 4, 1, b"a").build())
    client.post(0x77)
    assert await client.region_read(7, 0, 2) == b"\xf4\x1a"


async def test_unsolicited_reply_is_answered_with_einval_frame(server: Server) -> None:
    peer = await RawPeer.connect(server.path)
    await peer.negotiate()
    peer.send(message(123, Command.DMA_READ, bytes(16), flags=1))
    header, payload = await peer.receive()
    assert payload == b""
    assert (header.msg_id, header.command, header.flags, header.error) == (
        123,
        Command.DMA_READ,
        EINVAL_REPLY_FLAGS,
        errno.EINVAL,
    )
    peer.close()


@pytest.mark.parametrize("cut", [1, 8, 15, 16, 20, 31])
async def test_disconnect_mid_message(server: Server, device: RecordingDevice, cut: int) -> None:
    peer = await RawPeer.connect(server.path)
    await peer.negotiate()
    peer.send(message(1, Command.REGION_WRITE, RegionData(0, 0, 4, b"abcd").build())[:cut])
    peer.close()
    await still_serving(server)
    assert device.resets[:1] == [ResetReason.LOST_CONNECTION]
    assert device.memory[:4] == bytes(4)


async def test_fds_on_commands_that_carry_none_are_closed(client: Client) -> None:
    before = open_fds()
    for command, payload in [
        (Command.DEVICE_GET_INFO, struct.pack("<4I", 16, 0, 0, 0)),
        (Command.REGION_READ, RegionAccess(0, 0, 4).build()),
        (Command.REGION_READ, RegionAccess(0, 9, 4).build()),
        (Command.DMA_MAP, bytes(32)),
        (Command.DEVICE_SET_IRQS, bytes(20)),
        (Command.DEVICE_SET_IRQS, struct.pack("<5I", 20, 0x21, 0, 0, 1)),
        (0x99, b""),
    ]:
        fds = [os.eventfd(0), os.memfd_create("x")]
        await client.exchange(command, payload, fds)
        for fd in fds:
            os.close(fd)
    assert open_fds() == before
