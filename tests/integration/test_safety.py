"""Running a device safely: hung and cancelled handlers, who may connect, what the
socket looks like on disk, and what a client can put into our logs."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat

import pytest
import structlog

from muser import Bar, Client, PciDevice, Server, VfioUserError
from muser.wire.constants import Command, PciRegion
from tests.helpers import RawPeer, RecordingDevice, message, open_fds, version_request


class StallingDevice(PciDevice):
    """BAR0 reads wait on a future that the test resolves, cancels, or never touches."""

    def __init__(self) -> None:
        self.pending: asyncio.Future[bytes] | None = None
        self.started = asyncio.Event()
        super().__init__(vendor_id=0x1AF4, device_id=0x10F1, bars={0: Bar(64, read=self.read)})

    async def read(self, offset: int, count: int) -> bytes:
        if offset:
            return bytes(count)
        self.pending = asyncio.get_running_loop().create_future()
        self.started.set()
        return await self.pending


async def test_hung_handler_is_answered_etimedout_and_the_connection_goes_on(
    sock_path: str,
) -> None:
    device = StallingDevice()
    async with (
        Server(device, sock_path, handler_timeout=0.2),
        await Client.connect(sock_path) as client,
    ):
        with pytest.raises(VfioUserError) as refused:
            await client.region_read(PciRegion.BAR0, 0, 4)
        assert refused.value.errno == errno.ETIMEDOUT
        assert device.pending is not None
        assert device.pending.cancelled()
        assert await client.region_read(PciRegion.BAR0, 8, 4) == bytes(4)


async def test_handler_cancelled_by_device_code_is_answered_eio(sock_path: str) -> None:
    device = StallingDevice()
    async with Server(device, sock_path), await Client.connect(sock_path) as client:
        read = asyncio.create_task(client.region_read(PciRegion.BAR0, 0, 4))
        await device.started.wait()
        assert device.pending is not None
        device.pending.cancel()
        with pytest.raises(VfioUserError) as refused:
            await read
        assert refused.value.errno == errno.EIO
        assert await client.region_read(PciRegion.BAR0, 8, 4) == bytes(4)


async def test_socket_mode_can_open_the_device_to_a_group(sock_path: str) -> None:
    async with Server(RecordingDevice(), sock_path, mode=0o660):
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660


async def test_peer_not_on_the_allow_list_is_closed_and_the_next_is_served(
    sock_path: str,
) -> None:
    uid = os.getuid()
    device = RecordingDevice()
    async with Server(device, sock_path, allowed_uids={uid + 1}):
        peer = await RawPeer.connect(sock_path)
        try:
            assert await peer.expect_closed() == b""
        finally:
            peer.close()
    allowed = Server(device, sock_path, allowed_uids={uid}, allowed_gids={os.getgid()})
    async with allowed, await Client.connect(sock_path) as client:
        assert (await client.get_device_info()).num_regions == 9


async def test_client_strings_never_reach_the_log(sock_path: str) -> None:
    """An unknown capability name and a bad value are refused or ignored without
    echoing the client's bytes, so a client cannot forge log lines or terminal escapes."""
    marker = "\x1b[31mFORGED\nlevel=error"
    capabilities = json.dumps({"capabilities": {marker: 1, "max_msg_fds": marker}})
    with structlog.testing.capture_logs() as logs:
        async with Server(RecordingDevice(), sock_path):
            peer = await RawPeer.connect(sock_path)
            peer.send(version_request(capabilities=capabilities.encode() + b"\0"))
            header, _ = await peer.receive()
            assert header.error == errno.EINVAL
            peer.close()
    assert logs, "the server logged nothing at all"
    assert "FORGED" not in repr(logs)


async def test_half_a_message_holds_only_its_own_connection(sock_dir: str) -> None:
    """A client that announces a 1 MiB request, sends 40 bytes of it with an fd and
    stops: the other device on the loop is served meanwhile, and when the client goes
    its fd is closed and the device takes the next client."""
    stalled_path, busy_path = os.path.join(sock_dir, "a.sock"), os.path.join(sock_dir, "b.sock")
    before = open_fds()
    async with Server(RecordingDevice("a"), stalled_path), Server(RecordingDevice("b"), busy_path):
        peer = await RawPeer.connect(stalled_path)
        await peer.negotiate()
        eventfd = os.eventfd(0)
        peer.send(message(1, Command.REGION_WRITE, bytes(40), size=16 + (1 << 20)), [eventfd])
        os.close(eventfd)
        async with await Client.connect(busy_path) as bystander:
            for index in range(20):
                await bystander.region_write(0, 0, bytes([index]))
                assert await bystander.region_read(0, 0, 1) == bytes([index])
        peer.close()
        async with asyncio.timeout(5), await Client.connect(stalled_path) as successor:
            assert (await successor.get_device_info()).num_regions == 9
    assert open_fds() == before
