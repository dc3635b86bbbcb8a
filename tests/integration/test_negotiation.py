"""VERSION negotiation (protocol.md §2) with the capabilities real clients send."""

from __future__ import annotations

import json

import pytest

from muser import Client, Server
from muser.wire import parse_capabilities
from muser.wire.constants import Command
from muser.wire.messages import Version
from tests.helpers import RawPeer, message
from tests.vectors import VECTOR_DIR, load

QEMU_JSON = (
    b'{"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576, "pgsizes": 4096, '
    b'"max_dma_maps": 65535, "write_multiple": true, "migration": {"pgsize": 4096, '
    b'"max_bitmap_size": 268435456}}}\0'
)


def recorded_version_request(file: str) -> bytes:
    return next(
        r.data
        for r in load(VECTOR_DIR / file)
        if r.command == Command.VERSION and r.direction == "c2s"
    )


async def negotiate_raw(path: str, request: bytes) -> tuple[Version, int]:
    peer = RawPeer.connect(path)
    raw = await peer
    try:
        raw.send(request)
        header, payload = await raw.receive()
        assert header.flags == 1, header
        return Version.parse(payload), header.size
    finally:
        raw.close()


async def test_qemu_capabilities(server: Server) -> None:
    request = message(0, Command.VERSION, Version(0, 0, QEMU_JSON).build())
    reply, size = await negotiate_raw(server.path, request)
    assert (reply.major, reply.minor) == (0, 0)
    assert size <= len(request), "QEMU rejects a reply larger than its request"
    assert reply.capabilities.endswith(b"\0")
    text = reply.capabilities[:-1].decode()
    assert " " not in text, "compact JSON"
    caps = json.loads(text)["capabilities"]
    assert caps == {
        "max_msg_fds": 8,
        "max_data_xfer_size": 1048576,
        "pgsizes": 4096,
        "max_dma_maps": 65535,
        "write_multiple": True,
    }


@pytest.mark.parametrize(
    "file", ["qemu-gpio-guest.json", "libvfio-user-client-server.json", "libvfio-user-gpio.json"]
)
async def test_recorded_clients_negotiate(server: Server, file: str) -> None:
    request = recorded_version_request(file)
    client_version = Version.parse(request[16:])
    reply, size = await negotiate_raw(server.path, request)
    assert reply.major == 0
    assert reply.minor == min(client_version.minor, 2)
    offered = parse_capabilities(client_version.capabilities).offered
    assert set(json.loads(reply.capabilities[:-1])["capabilities"]) <= offered
    if file.startswith("qemu"):
        assert size <= len(request)


async def test_reply_fits_a_small_request(server: Server) -> None:
    """Values equal to the spec defaults are left out to stay within the request's size."""
    small = b'{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":9,"pgsizes":4096}}\0'
    request = message(0, Command.VERSION, Version(0, 0, small).build())
    reply, size = await negotiate_raw(server.path, request)
    assert size <= len(request)
    assert json.loads(reply.capabilities[:-1])["capabilities"]["max_msg_fds"] == 8


async def test_no_json_gets_no_json(server: Server) -> None:
    reply, size = await negotiate_raw(server.path, message(0, Command.VERSION, b"\0\0\0\0"))
    assert reply.capabilities == b""
    assert size == 20


async def test_client_negotiates(client: Client) -> None:
    assert client.server_version == (0, 2)
    assert client.server is not None
    assert client.server.max_msg_fds == 8
    assert client.server.max_data_xfer_size == 1 << 20


async def test_client_negotiates_what_it_is_told(server: Server) -> None:
    async with await Client.connect(server.path, negotiate=False) as client:
        assert client.server is None
        reply = await client.negotiate({"max_msg_fds": 4}, minor=0)
        assert (reply.major, reply.minor) == (0, 0)
        assert client.server is not None
        assert client.server.offered == {"max_msg_fds"}
        assert (await client.get_device_info()).num_irqs == 5
