"""Embedding muser in a program that already runs: sockets it made, fds it inherited,
a graceful stop, and the status_http sample."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from muser import Bar, Client, PciDevice, ResetReason, Server
from muser.session import server as server_session
from muser.wire.constants import Command
from muser.wire.messages import RegionAccess
from muser_samples import gpio, null
from muser_samples.status_http import StatusService
from tests.helpers import TIMEOUT, RawPeer, RecordingDevice, message, open_fds

ROOT = Path(__file__).resolve().parents[2]
one_loop = pytest.mark.asyncio(loop_factories=["asyncio"])
"""The process under test picks its own loop; one loop on our side is enough."""
GPIO_BAR = 2


def listening_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(path)
    sock.listen()
    return sock


async def test_serves_a_prebound_socket_and_leaves_its_file(
    device: RecordingDevice, sock_path: str
) -> None:
    before = open_fds()
    listener = listening_socket(sock_path)
    async with Server(device, sock=listener) as server:
        assert server.path == sock_path
        async with await Client.connect(sock_path) as client:
            await client.region_write(0, 8, b"embedded")
            assert await client.region_read(0, 8, 8) == b"embedded"
    assert listener.fileno() == -1
    assert os.path.exists(sock_path)
    assert open_fds() == before


async def test_serves_a_connected_socket_until_its_client_leaves(
    device: RecordingDevice,
) -> None:
    before = open_fds()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = Server(device, sock=ours)
    serving = asyncio.ensure_future(server.serve_forever())
    async with Client.on_socket(theirs) as client:
        await client.negotiate()
        await client.region_write(0, 0, b"pair")
        assert server.is_serving()
        assert server.path == ""
    await asyncio.wait_for(serving, TIMEOUT)
    assert not server.is_serving()
    await asyncio.wait_for(server.serve_forever(), TIMEOUT)  # served once: done at once
    assert not server.is_serving()
    assert device.memory[:4] == b"pair"
    assert device.resets == [ResetReason.LOST_CONNECTION]
    assert open_fds() == before


async def test_a_connected_peer_off_the_allow_list_ends_the_server(
    device: RecordingDevice,
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = Server(device, sock=ours, allowed_uids=[os.getuid() + 1])
    await server.start_serving()
    assert not server.is_serving()
    assert ours.fileno() == -1
    assert theirs.recv(1) == b""
    theirs.close()


async def test_unstarted_server_closes_the_socket_it_was_given(device: RecordingDevice) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    Server(device, sock=ours).close()
    assert ours.fileno() == -1
    theirs.close()


def test_takes_a_path_or_a_socket(device: RecordingDevice, sock_path: str) -> None:
    with pytest.raises(TypeError, match="needs a socket path or a socket"):
        Server(device)
    with socket.socket(socket.AF_UNIX) as sock, pytest.raises(TypeError, match="not both"):
        Server(device, sock_path, sock=sock)
    with socket.socket(socket.AF_INET) as sock, pytest.raises(ValueError, match="AF_UNIX"):
        Server(device, sock=sock)


class SlowDevice(PciDevice):
    """BAR0 takes a while to write, long enough for a close to arrive meanwhile."""

    def __init__(self) -> None:
        self.writing = asyncio.Event()
        self.written = b""
        self.resets: list[ResetReason] = []
        super().__init__(
            vendor_id=0x1AF4, device_id=0x10F1, class_code=0xFF0000, name="slow",
            bars={0: Bar(16, write=self.write)},
        )  # fmt: skip

    async def write(self, offset: int, data: bytes) -> None:
        self.writing.set()
        await asyncio.sleep(0.2)
        self.written = data

    def reset(self, reason: ResetReason) -> None:
        self.resets.append(reason)


async def test_close_answers_the_request_in_flight_then_drops_the_client(
    sock_path: str,
) -> None:
    before = open_fds()
    device = SlowDevice()
    server = Server(device, sock_path)
    await server.start_serving()
    client = await Client.connect(sock_path)
    in_flight = asyncio.ensure_future(client.region_write(0, 0, b"last"))
    await asyncio.wait_for(device.writing.wait(), TIMEOUT)
    server.close()
    assert not os.path.exists(sock_path)
    await asyncio.wait_for(in_flight, TIMEOUT)
    assert device.written == b"last"
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    await asyncio.wait_for(client.wait_closed(), TIMEOUT)
    assert device.resets == [ResetReason.LOST_CONNECTION]
    assert open_fds() == before


async def test_a_client_that_stops_reading_cannot_hold_a_graceful_close(
    device: RecordingDevice, sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_session, "SHUTDOWN_GRACE", 0.3)
    before = open_fds()
    server = Server(device, sock_path)
    await server.start_serving()
    peer = await RawPeer.connect(sock_path)
    await peer.negotiate()
    read = RegionAccess(0, 0, 4096).build()
    flood = b"".join(message(msg_id, Command.REGION_READ, read) for msg_id in range(1, 3000))
    with contextlib.suppress(TimeoutError):  # replies pile up: we never read them
        await asyncio.wait_for(peer.send_all(flood), 0.3)
    server.close()
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    assert device.resets == [ResetReason.LOST_CONNECTION]
    peer.close()
    assert open_fds() == before


async def start_with_fd(sock: socket.socket, device: str) -> asyncio.subprocess.Process:
    """`python -m muser.run DEVICE --fd N` with `sock` inherited as fd N."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "muser.run", device, "--fd", str(sock.fileno()),
        cwd=ROOT, pass_fds=(sock.fileno(),),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


@one_loop
async def test_run_serves_an_inherited_listening_fd(sock_path: str) -> None:
    with listening_socket(sock_path) as listener:
        process = await start_with_fd(listener, "null")
    async with await Client.connect(sock_path) as client:
        vendor = await client.region_read(7, 0, 2)
    assert int.from_bytes(vendor, "little") == null.VENDOR_ID
    process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, stderr.decode()
    assert f"serving on {sock_path}" in stderr.decode()
    assert os.path.exists(sock_path)


@one_loop
async def test_run_serves_an_inherited_connection_and_exits_when_it_ends() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        process = await start_with_fd(theirs, "gpio")
    async with Client.on_socket(ours) as client:
        await client.negotiate()
        vendor = await client.region_read(7, 0, 2)
    assert int.from_bytes(vendor, "little") == gpio.VENDOR_ID
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, stderr.decode()
    assert "serving its connected client" in stderr.decode()


@one_loop
async def test_run_refuses_an_inherited_fd_that_is_not_a_unix_stream_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        process = await start_with_fd(tcp, "null")
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 1
    assert "not a UNIX stream socket" in stderr.decode()
    assert "Traceback" not in stderr.decode()


async def get_status(port: int) -> dict[str, object]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /status HTTP/1.0\r\nHost: localhost\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"Content-Type: application/json" in head
    status: dict[str, object] = json.loads(body)
    return status


async def first_listen_on_this_loop() -> None:
    """uvloop (libuv) keeps a spare fd for EMFILE the first time a loop listens on
    TCP; let it take that before counting fds."""
    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    server.close()
    await server.wait_closed()


async def test_status_http_reports_the_devices_live_state(sock_path: str) -> None:
    await first_listen_on_this_loop()
    before = open_fds()
    async with StatusService(sock_path) as service:
        assert (await get_status(service.port))["client"] is None
        async with await Client.connect(sock_path) as client:
            await client.region_read(GPIO_BAR, gpio.IRQ_CONTROL, 1)
            await client.region_write(GPIO_BAR, gpio.OUT_0_7, b"\x05")
            status = await get_status(service.port)
        assert status["client"] == {"pid": os.getpid(), "version": "0.2"}
        async with asyncio.timeout(5):  # the device hears its client leave
            while (after := await get_status(service.port))["client"] is not None:
                await asyncio.sleep(0.01)
        assert after["last_disconnect"] == "the client closed the connection"
        assert status["outputs"] == 0x05
        assert status["inputs"] == 0xFFFA
        assert status["irq_pending"] is True
        assert status["interrupts"] == 1
    assert not os.path.exists(sock_path)
    assert open_fds() == before
