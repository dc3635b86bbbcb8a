"""Server lifecycle: the socket file, one client at a time, reconnects, many devices."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat

import pytest
import structlog

import muser
import muser.server
from muser import Client, ConnectionClosedError, ResetReason, Server
from muser.wire.constants import Command
from muser.wire.messages import DmaMap, IrqSet
from tests.helpers import RecordingDevice, open_fds


async def test_socket_file_mode_and_removal(device: RecordingDevice, sock_path: str) -> None:
    server = Server(device, sock_path)
    await server.start_serving()
    assert server.is_serving()
    mode = os.stat(sock_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    server.close()
    await server.wait_closed()
    assert not os.path.exists(sock_path)
    assert not server.is_serving()


@pytest.mark.parametrize("name_length", [8, 1], ids=["staged", "too long to stage"])
def test_socket_file_appears_listening(
    sock_dir: str, monkeypatch: pytest.MonkeyPatch, name_length: int
) -> None:
    """The file at the path is a listening socket from the moment it exists, so a
    client that waits for it never finds it refusing connections; only a path too
    near the 107-byte limit for a staging name beside it is bound in place."""
    directory = os.path.join(sock_dir, "d" * (107 - len(sock_dir) - name_length - 2))
    os.mkdir(directory)
    path = os.path.join(directory, "s" * name_length)
    link = os.link
    linked = []

    def checked_link(staging: str, target: str) -> None:
        assert target == path
        assert not os.path.exists(path)
        assert stat.S_IMODE(os.stat(staging).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(staging)  # refused unless the socket already listens
        link(staging, target)
        linked.append(staging)

    monkeypatch.setattr(os, "link", checked_link)
    sock, _identity = muser.server.bind_unix_socket(path)
    with sock:
        assert os.listdir(directory) == [os.path.basename(path)], "staging name removed"
        assert muser.server.is_listening(sock)
    assert len(linked) == (1 if name_length == 8 else 0)


def test_refuses_a_path_too_long_for_a_unix_socket(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "s" * (108 - len(sock_dir)))
    with pytest.raises(OSError, match="at most 107 bytes") as caught:
        muser.server.bind_unix_socket(path)
    assert caught.value.errno == errno.ENAMETOOLONG
    assert os.listdir(sock_dir) == []


async def test_refuses_a_live_servers_socket(server: Server) -> None:
    with pytest.raises(OSError, match="another live server"):
        await Server(RecordingDevice(), server.path).start_serving()
    assert await (await Client.connect(server.path)).get_device_info()


async def test_replaces_a_stale_socket(device: RecordingDevice, sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()
    assert os.path.exists(sock_path)
    async with Server(device, sock_path), await Client.connect(sock_path) as client:
        assert (await client.get_device_info()).num_regions == 9


async def test_refuses_to_replace_a_regular_file(device: RecordingDevice, sock_path: str) -> None:
    with open(sock_path, "w") as file:
        file.write("precious")
    with pytest.raises(FileExistsError):
        await Server(device, sock_path).start_serving()
    with open(sock_path) as file:
        assert file.read() == "precious"


async def test_close_leaves_a_successors_socket(device: RecordingDevice, sock_path: str) -> None:
    server = Server(device, sock_path)
    await server.start_serving()
    os.unlink(sock_path)
    async with Server(RecordingDevice(), sock_path):
        server.close()
        await server.wait_closed()
        assert os.path.exists(sock_path)


async def test_reconnect_keeps_state_and_drops_fds(
    server: Server, device: RecordingDevice
) -> None:
    before = open_fds()
    async with await Client.connect(server.path) as first:
        await first.region_write(0, 0, b"kept")
        await first.region_write(7, 0x3C, b"\x0a")
        memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, 4096)
        eventfd = os.eventfd(0)
        await first.exchange(Command.DMA_MAP, DmaMap(32, 3, 0, 0, 4096).build(), [memfd])
        await first.exchange(
            Command.DEVICE_SET_IRQS, IrqSet(20, 0x24, 0, 0, 1, b"").build(), [eventfd]
        )
        os.close(memfd)
        os.close(eventfd)
    async with await Client.connect(server.path) as second:
        assert await second.region_read(0, 0, 4) == b"kept"
        assert await second.region_read(7, 0x3C, 1) == b"\x0a"
    await server.wait_closed()
    assert device.resets == [ResetReason.LOST_CONNECTION, ResetReason.LOST_CONNECTION]
    assert open_fds() == before


async def test_second_client_waits_for_the_first(server: Server) -> None:
    first = await Client.connect(server.path)
    waiting = asyncio.ensure_future(Client.connect(server.path))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "one client per device at a time"
    first.close()
    second = await asyncio.wait_for(waiting, 5)
    assert (await second.get_device_info()).num_regions == 9
    second.close()
    await second.wait_closed()


async def test_close_drops_the_attached_client(device: RecordingDevice, sock_path: str) -> None:
    server = Server(device, sock_path)
    await server.start_serving()
    client = await Client.connect(sock_path)
    assert not client.is_closed
    server.close()
    await server.wait_closed()
    await asyncio.wait_for(client.wait_closed(), 5)
    assert client.is_closed
    with pytest.raises(ConnectionClosedError):
        await client.get_device_info()
    assert device.resets == [ResetReason.LOST_CONNECTION]


async def test_serve_forever_until_closed(device: RecordingDevice, sock_path: str) -> None:
    server = Server(device, sock_path)
    task = asyncio.ensure_future(server.serve_forever())
    while not os.path.exists(sock_path):
        await asyncio.sleep(0.005)
    async with await Client.connect(sock_path) as client:
        await client.get_device_info()
    server.close()
    await asyncio.wait_for(task, 5)
    assert not os.path.exists(sock_path)


async def test_serve_forever_cancelled_cleans_up(device: RecordingDevice, sock_path: str) -> None:
    task = asyncio.ensure_future(Server(device, sock_path).serve_forever())
    while not os.path.exists(sock_path):
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not os.path.exists(sock_path)


async def test_two_devices_on_one_loop(sock_dir: str) -> None:
    """A slow handler of one device does not stall the other device."""
    slow, fast = RecordingDevice("slow"), RecordingDevice("fast")
    slow.io_delay = 0.5
    async with (
        Server(slow, os.path.join(sock_dir, "slow.sock")) as slow_server,
        Server(fast, os.path.join(sock_dir, "fast.sock")) as fast_server,
        await Client.connect(slow_server.path) as slow_client,
        await Client.connect(fast_server.path) as fast_client,
    ):
        stalled = asyncio.ensure_future(slow_client.region_read(2, 0, 4))
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index in range(50):
            await fast_client.region_write(0, index, b"x")
        assert loop.time() - started < 0.4
        assert not stalled.done()
        assert await stalled == bytes(4)


async def test_lost_connection_waits_for_in_flight_handler(
    server: Server, device: RecordingDevice
) -> None:
    """The device hears of the lost client only after its running handler finished."""
    device.io_delay = 0.05
    client = await Client.connect(server.path)
    client.post(
        Command.REGION_WRITE,
        bytes(8) + (2).to_bytes(4, "little") + (1).to_bytes(4, "little") + b"z",
    )
    await asyncio.sleep(0.01)
    client.close()
    while server.connection is not None:
        await asyncio.sleep(0.01)
    assert device.log == [("write_io", 0, b"z")]
    assert device.resets == [ResetReason.LOST_CONNECTION]


async def test_a_cancelled_waiter_does_not_spoil_the_end_of_a_session(
    server: Server, device: RecordingDevice
) -> None:
    """Tasks that wait for a session's end can be cancelled (asyncio.run cancels
    every task when the program ends) without muser's own teardown failing: the
    device still hears of the lost client and the end is still announced."""
    client = await Client.connect(server.path)
    await client.get_device_info()
    connection = server.connection
    assert connection is not None
    waiters = [asyncio.create_task(connection.finished.wait()), *server._sessions]
    await asyncio.sleep(0)
    for waiter in waiters:
        waiter.cancel()
    failures: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    try:
        client.close()
        await asyncio.wait_for(connection.finished.wait(), 5)
        await asyncio.sleep(0.01)
    finally:
        loop.set_exception_handler(None)
    assert device.resets == [ResetReason.LOST_CONNECTION]
    assert failures == []


async def test_a_failing_connection_setup_keeps_the_server_accepting(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = muser.server.ServerConnection
    calls = []

    def fail_once(*args: object, **kwargs: object) -> object:
        if not calls:
            calls.append(1)
            raise RuntimeError("boom")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(muser.server, "ServerConnection", fail_once)
    before = open_fds()
    with pytest.raises((ConnectionError, OSError)):
        await asyncio.wait_for(Client.connect(server.path), 5)
    assert open_fds() == before
    async with await asyncio.wait_for(Client.connect(server.path), 5) as client:
        assert (await client.get_device_info()).num_regions == 9


class HookedDevice(muser.PciDevice):
    """Starts a ticking task when a client negotiates, stops it when it leaves,
    and records what it was told, in order."""

    def __init__(self, *, fail_connected: bool = False) -> None:
        super().__init__(vendor_id=0x1234, device_id=0x0001)
        self.calls: list[object] = []
        self.ticks = 0
        self.ticker: asyncio.Task[None] | None = None
        self.fail_connected = fail_connected

    async def connected(self, client: muser.ClientInfo) -> None:
        await asyncio.sleep(0)  # an async hook: it runs as a task of its own
        self.calls.append(client)
        if self.fail_connected:
            raise RuntimeError("connected hook broke")
        self.ticker = asyncio.get_running_loop().create_task(self.tick())

    async def tick(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0.001)

    async def disconnected(self, reason: muser.DisconnectReason) -> None:
        self.calls.append(reason)
        if self.ticker is not None:
            self.ticker.cancel()

    def reset(self, reason: ResetReason) -> None:
        self.calls.append(reason)


async def test_lifecycle_hooks_start_and_stop_work_with_each_client(sock_path: str) -> None:
    device = HookedDevice()
    async with Server(device, sock_path) as server:
        for _ in range(2):
            async with await Client.connect(sock_path) as client:
                await client.get_device_info()
                async with asyncio.timeout(5):
                    while device.ticks < 3:
                        await asyncio.sleep(0.001)
            connection = server.connection
            assert connection is not None
            await connection.finished.wait()
            assert device.ticker is not None
            assert device.ticker.cancelled() or device.ticker.done()
            info, reason, reset = device.calls[-3:]
            assert info == muser.ClientInfo(
                pid=os.getpid(), version="0.2", max_data_xfer_size=1 << 20, max_msg_fds=16
            )
            assert reason is muser.DisconnectReason.CLIENT_LEFT
            assert reset is ResetReason.LOST_CONNECTION
        assert len(device.calls) == 6


async def test_a_server_closing_tells_the_device_why(sock_path: str) -> None:
    device = HookedDevice()
    server = Server(device, sock_path)
    await server.start_serving()
    client = await Client.connect(sock_path)
    await client.get_device_info()
    connection = server.connection
    assert connection is not None
    server.close()
    await server.wait_closed()
    await connection.finished.wait()
    client.close()
    assert device.calls[1:] == [muser.DisconnectReason.SERVER_CLOSING, ResetReason.LOST_CONNECTION]


async def test_a_client_that_never_negotiates_runs_no_hook(sock_path: str) -> None:
    device = HookedDevice()
    async with Server(device, sock_path) as server:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(sock_path)
            async with asyncio.timeout(5):
                while server.connection is None:
                    await asyncio.sleep(0.001)
            connection = server.connection
        await connection.finished.wait()
    assert device.calls == [ResetReason.LOST_CONNECTION]


async def test_a_failing_hook_is_logged_and_the_session_goes_on(sock_path: str) -> None:
    device = HookedDevice(fail_connected=True)
    with structlog.testing.capture_logs() as logs:
        async with Server(device, sock_path), await Client.connect(sock_path) as client:
            async with asyncio.timeout(5):
                while not device.calls:
                    await asyncio.sleep(0.001)
            assert (await client.get_device_info()).num_regions == device.num_regions
    assert any(entry["event"] == "device's connected hook failed" for entry in logs)


async def test_a_connected_hook_still_running_is_cancelled_when_the_client_leaves(
    sock_path: str,
) -> None:
    class Stuck(muser.PciDevice):
        def __init__(self) -> None:
            super().__init__(vendor_id=0x1234, device_id=0x0002)
            self.told: list[object] = []

        async def connected(self, client: muser.ClientInfo) -> None:
            try:
                await asyncio.Event().wait()  # never set
            except asyncio.CancelledError:
                self.told.append("cancelled")
                raise

        def disconnected(self, reason: muser.DisconnectReason) -> None:
            self.told.append(reason)

    device = Stuck()
    async with Server(device, sock_path) as server:
        async with await Client.connect(sock_path) as client:
            await client.get_device_info()
        connection = server.connection
        assert connection is not None
        async with asyncio.timeout(5):
            await connection.finished.wait()
    assert device.told == ["cancelled", muser.DisconnectReason.CLIENT_LEFT]
