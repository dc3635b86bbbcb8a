"""The fd-passing transport on real sockets: fds stay with their message, too many
or misplaced fds close the connection, and a stalled reader holds back the writer."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest

from muser import Bar, Client, PciDevice, Server
from muser.transport import WRITE_HIGH_WATER, FdTransport
from muser.wire import Frame, Framer, close_fds
from muser.wire.constants import Command
from muser.wire.messages import RegionAccess
from tests.helpers import RawPeer, message, open_fds


class Collector:
    """A transport protocol that frames what arrives."""

    def __init__(self) -> None:
        self.framer = Framer(1 << 21)
        self.frames: list[Frame] = []
        self.lost: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future()
        )
        self.arrived = asyncio.Event()

    def data_received(self, data: bytes, fds: list[int], fds_lost: bool = False) -> None:
        self.frames += self.framer.feed(data, fds, fds_lost=fds_lost)
        self.arrived.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)

    async def wait_for(self, count: int) -> None:
        while len(self.frames) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 5)


def started(sock: socket.socket, collector: Collector, max_receive_fds: int) -> FdTransport:
    transport = FdTransport(sock, max_receive_fds=max_receive_fds)
    transport.start(collector.data_received, collector.connection_lost)
    return transport


def same_file(left: int, right: int) -> bool:
    a, b = os.fstat(left), os.fstat(right)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


async def test_fds_arrive_with_their_message() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    collector = Collector()
    receiver = started(ours, collector, 8)
    sender = RawPeer(theirs)
    first, second = os.memfd_create("a"), os.eventfd(0)
    sender.send(message(1, Command.DEVICE_GET_INFO, bytes(16)))
    sender.send(message(2, Command.DMA_MAP, bytes(32)), [first, second])
    sender.send(message(3, Command.DEVICE_RESET))
    await collector.wait_for(3)
    assert [len(frame.fds) for frame in collector.frames] == [0, 2, 0]
    assert same_file(collector.frames[1].fds[0], first)
    assert same_file(collector.frames[1].fds[1], second)
    for frame in collector.frames:
        frame.close_fds()
    close_fds([first, second])
    receiver.close()
    theirs.close()
    assert await collector.lost is None


async def test_queued_message_keeps_its_fds() -> None:
    """A message sent while earlier bytes are still queued gets its fds when it goes."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    collector = Collector()
    sender = started(ours, Collector(), 1)
    big = message(1, Command.REGION_WRITE, bytes(1 << 20))
    sender.send((big,))
    assert sender.write_buffer_size > 0, "the socket cannot take 1 MiB at once"
    fd = os.eventfd(0)
    sender.send((message(2, Command.DEVICE_RESET),), [fd])
    os.close(fd)
    receiver = started(theirs, collector, 4)
    await collector.wait_for(2)
    assert [len(frame.fds) for frame in collector.frames] == [0, 1]
    assert collector.frames[0].payload == bytes(1 << 20)
    collector.frames[1].close_fds()
    sender.close()
    receiver.close()


async def test_too_many_fds_close_the_connection(server: Server) -> None:
    before = open_fds()
    peer = await RawPeer.connect(server.path)
    await peer.negotiate()
    fds = [os.eventfd(0) for _ in range(17)]
    peer.send(message(1, Command.DEVICE_SET_IRQS, bytes(20)), fds)
    close_fds(fds)
    assert await peer.expect_closed() == b""
    peer.close()
    while server.connection is not None:
        await asyncio.sleep(0.01)
    assert open_fds() == before


async def test_fds_with_body_bytes_close_the_connection(server: Server) -> None:
    before = open_fds()
    peer = await RawPeer.connect(server.path)
    await peer.negotiate()
    write = message(1, Command.REGION_WRITE, RegionAccess(0, 0, 4).build() + b"abcd")
    peer.send(write[:20])
    await asyncio.sleep(0.05)
    fd = os.memfd_create("stray")
    peer.send(write[20:], [fd])
    os.close(fd)
    assert await peer.expect_closed() == b""
    peer.close()
    while server.connection is not None:
        await asyncio.sleep(0.01)
    assert open_fds() == before


@pytest.fixture
def big_device() -> PciDevice:
    memory = bytes(range(256)) * 4096
    return PciDevice(
        vendor_id=1,
        device_id=2,
        bars={0: Bar(1 << 20, read=lambda offset, count: memory[offset:][:count])},
    )


async def test_stalled_client_holds_back_the_server(big_device: PciDevice, sock_path: str) -> None:
    """A client that sends requests but reads no replies makes the server stop, not
    buffer without bound; once it reads, every reply arrives, in order."""
    async with Server(big_device, sock_path) as server:
        peer = await RawPeer.connect(sock_path)
        await peer.negotiate()
        requests = 40
        for msg_id in range(requests):
            peer.send(message(msg_id, Command.REGION_READ, RegionAccess(0, 0, 1 << 20).build()))
        await asyncio.sleep(0.2)
        assert server.connection is not None
        queued = server.connection.transport.write_buffer_size
        assert 0 < queued <= WRITE_HIGH_WATER + (1 << 20) + 64
        expected = bytes(range(256)) * 4096
        for msg_id in range(requests):
            header, payload = await peer.receive()
            assert (header.msg_id, header.flags) == (msg_id, 1)
            assert payload[16:] == expected
        peer.close()


async def test_large_read_through_the_client(big_device: PciDevice, sock_path: str) -> None:
    async with Server(big_device, sock_path), await Client.connect(sock_path) as client:
        data = await client.region_read(0, 0, 1 << 20)
        assert data == bytes(range(256)) * 4096


async def test_a_coalesced_backlog_keeps_fds_on_their_message() -> None:
    """Queued messages without fds share sendmsg calls; one with fds never lends its
    fds to a neighbour."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender = started(ours, Collector(), 1)
    sender.send((message(0, Command.REGION_WRITE, bytes(64 * 1024)),))
    fd = os.eventfd(0)
    for msg_id in range(1, 200):
        sender.send((message(msg_id, Command.DEVICE_RESET),), [fd] if msg_id == 100 else ())
    os.close(fd)
    collector = Collector()
    receiver = started(theirs, collector, 4)
    await collector.wait_for(200)
    assert [frame.msg_id for frame in collector.frames] == list(range(200))
    assert [frame.msg_id for frame in collector.frames if frame.fds] == [100]
    collector.frames[100].close_fds()
    sender.close()
    receiver.close()


async def test_fast_lane_sends_keep_their_place_in_the_backlog() -> None:
    """A single-buffer send (the cheap way every reply goes) queues behind what the
    socket did not take, in order with the others; once closing, it drops its message."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender = started(ours, Collector(), 1)
    sender.send((message(0, Command.REGION_WRITE, bytes(64 * 1024)),))
    assert sender.write_buffer_size > 0
    fd = os.eventfd(0)
    sender.send((message(1, Command.DEVICE_RESET),), [fd])
    os.close(fd)
    sender.send((message(2, Command.DEVICE_RESET),))
    sender.close_when_sent()
    sender.send((message(3, Command.DEVICE_RESET),))
    collector = Collector()
    receiver = started(theirs, collector, 4)
    await collector.wait_for(3)
    assert await asyncio.wait_for(collector.lost, 5) is None
    assert [frame.msg_id for frame in collector.frames] == [0, 1, 2]
    assert [len(frame.fds) for frame in collector.frames] == [0, 1, 0]
    collector.frames[1].close_fds()
    receiver.close()


async def test_a_backlog_of_large_and_small_pieces_arrives_intact() -> None:
    """What the socket does not take is queued without copying large pieces and
    gathering small ones; the bytes arrive in order, whole, and as they were when
    sent, even if the caller reuses its buffers at once."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender = started(ours, Collector(), 1)
    large = bytes(range(256)) * 1024
    reused = bytearray(b"\xaa" * 70_000)
    sent = []
    for msg_id in range(600):
        if msg_id % 50 == 0:
            payload = large[msg_id:]
        elif msg_id % 50 == 25:
            payload = bytes(reused)
            header = message(msg_id, Command.REGION_WRITE, payload)[:16]
            sender.send((header[:8], memoryview(header)[8:], reused), ())
            reused[:] = b"\x55" * len(reused)  # changed once sent
            sent.append((msg_id, payload))
            continue
        else:
            payload = msg_id.to_bytes(2, "little") * (msg_id % 7)
        sender.send((message(msg_id, Command.REGION_WRITE, payload),), ())
        sent.append((msg_id, payload))
    assert sender.write_buffer_size > 0
    collector = Collector()
    receiver = started(theirs, collector, 4)
    await collector.wait_for(len(sent))
    assert [(frame.msg_id, frame.payload) for frame in collector.frames] == sent
    assert sender.write_buffer_size == 0
    sender.close()
    receiver.close()


@pytest.mark.parametrize(
    "kind",
    [bytes, bytearray, memoryview, lambda data: memoryview(data).cast("I")],
    ids=["bytes", "bytearray", "memoryview", "memoryview-of-u32"],
)
async def test_a_request_payload_may_be_any_bytes_like(
    big_device: PciDevice, sock_path: str, kind: Callable[[bytes], Any]
) -> None:
    async with Server(big_device, sock_path), await Client.connect(sock_path) as client:
        request = kind(RegionAccess(0, 0, 4).build())
        reply = await client.request(Command.REGION_READ, request)
        assert reply.payload == RegionAccess(0, 0, 4).build() + bytes(range(4))
