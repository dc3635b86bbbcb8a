"""The server's fast lane answers REGION_READ/REGION_WRITE exactly as the general path.

The same random stream of region accesses — valid and refused, posted and not,
several to a `sendmsg`, on plain, async, refusing and crashing handlers — goes to
two servers: one with the fast lane off (`Server(fast_path=False)`), which takes
every message the general way, and one that takes what it can through the fast
lane (and records a trace, which must not stop it). Their reply bytes and what
their devices saw must be identical.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from muser import Bar, PciDevice, Server
from muser.session import server as server_session
from muser.session.context import Context
from muser.wire.constants import FLAGS_REPLY, HEADER_SIZE, Command, HeaderFlag, PciRegion
from muser.wire.messages import Header, RegionAccess, RegionData
from tests.helpers import RawPeer, RecordingDevice, message

FENCE_ID = 0xFFFF
MESSAGES = 600
REGIONS = {
    (PciRegion.BAR0, 4096): 24,
    (PciRegion.CONFIG, 256): 8,
    (PciRegion.BAR1, 16): 2,
    (PciRegion.BAR2, 256): 2,
    (PciRegion.BAR4, 0x4000): 2,
    (PciRegion.BAR3, 0): 1,
    (PciRegion.ROM, 0): 1,
    (PciRegion.VGA, 0): 1,
    (12, 0): 1,
}
"""RecordingDevice's regions and sizes, and some it does not have, weighted so that
most accesses are the plain memory and config reads a guest makes."""


def random_access(rng: random.Random, msg_id: int) -> bytes:
    """One REGION_READ or REGION_WRITE, mostly valid, sometimes not in one field."""
    ((region, size),) = rng.choices(list(REGIONS), weights=list(REGIONS.values()))
    count = rng.choice((1, 2, 4, 8, 4, 4, 4, 4, 0, 64))
    offset = rng.randrange(0, max(size - count, 0) + 1) if rng.random() < 0.95 else size
    flags = int(HeaderFlag.NO_REPLY) if rng.random() < 0.2 else 0
    if rng.random() < 0.5:
        payload = RegionAccess(offset, region, count).build()
        if rng.random() < 0.05:
            payload += b"\0"
        return message(msg_id, Command.REGION_READ, payload, flags)
    data = rng.randbytes(count + (1 if rng.random() < 0.05 else 0))
    return message(
        msg_id, Command.REGION_WRITE, RegionData(offset, region, count, data).build(), flags
    )


def batches(seed: int) -> list[bytes]:
    """The stream, cut into sends of 1-5 messages, each followed by a fence: a read
    whose reply says everything before it is answered."""
    rng = random.Random(seed)
    fence = message(FENCE_ID, Command.REGION_READ, RegionAccess(0, PciRegion.CONFIG, 4).build())
    out, msg_id = [], 0
    while msg_id < MESSAGES:
        batch = b""
        for _ in range(rng.randint(1, 5)):
            batch += random_access(rng, msg_id)
            msg_id += 1
        out.append(batch + fence)
    return out


async def replies_until_fence(peer: RawPeer) -> bytes:
    received = b""
    while True:
        header, payload = await peer.receive()
        received += header.build() + payload
        if header.msg_id == FENCE_ID:
            return received


@pytest.fixture
def dispatched(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """How many frames each session (by its context's id) ran through the general
    dispatcher."""
    counts: dict[int, int] = {}
    general = server_session.dispatch

    def counting(context: Context, frame: Any) -> Any:
        counts[id(context)] = counts.get(id(context), 0) + 1
        return general(context, frame)

    monkeypatch.setattr(server_session, "dispatch", counting)
    return counts


async def session(path: str, stream: list[bytes]) -> bytes:
    peer = await RawPeer.connect(path)
    try:
        await peer.negotiate()
        replies = b""
        for batch in stream:
            peer.send(batch)
            replies += await replies_until_fence(peer)
        return replies
    finally:
        peer.close()


@pytest.fixture
async def two_servers(sock_dir: str) -> AsyncIterator[tuple[Server, Server]]:
    general_device, fast_device = RecordingDevice(), RecordingDevice()
    trace = os.path.join(sock_dir, "trace.jsonl")
    async with (
        Server(general_device, os.path.join(sock_dir, "general.sock"), fast_path=False) as general,
        Server(fast_device, os.path.join(sock_dir, "fast.sock"), trace=trace) as fast,
    ):
        yield general, fast


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_fast_lane_answers_as_the_general_path(
    two_servers: tuple[Server, Server], dispatched: dict[int, int], seed: int
) -> None:
    general, fast = two_servers
    stream = batches(seed)
    general_replies = await session(general.path, stream)
    fast_replies = await session(fast.path, stream)

    assert fast_replies == general_replies
    general_device, fast_device = general.device, fast.device
    assert isinstance(general_device, RecordingDevice)
    assert isinstance(fast_device, RecordingDevice)
    assert fast_device.log == general_device.log
    assert fast_device.memory == general_device.memory
    assert fast_device.io == general_device.io
    # Both saw the same refusals, and the fast lane really carried the valid accesses.
    errors = sum(
        1
        for start in _offsets(general_replies)
        if Header.parse(general_replies[start : start + HEADER_SIZE]).flags & HeaderFlag.ERROR
    )
    assert errors > 20
    general_count, fast_count = sorted(dispatched.values(), reverse=True)
    assert general_count > MESSAGES + len(stream)
    assert fast_count < general_count - MESSAGES / 4


async def test_plain_accesses_skip_the_general_path(
    server: Server, device: RecordingDevice, dispatched: dict[int, int]
) -> None:
    """Valid reads and writes of plain handlers, posted or not, one per send as QEMU
    sends them, never reach the dispatcher; a refused one does."""
    peer = await RawPeer.connect(server.path)
    try:
        await peer.negotiate()
        (after_version,) = dispatched.values()
        for msg_id in range(50):
            write = RegionData(msg_id * 4, PciRegion.BAR0, 4, msg_id.to_bytes(4, "little"))
            peer.send(message(msg_id, Command.REGION_WRITE, write.build()))
            assert (await peer.receive())[0].flags == FLAGS_REPLY
            read = RegionAccess(msg_id * 4, PciRegion.BAR0, 4).build()
            peer.send(message(msg_id, Command.REGION_READ, read))
            assert (await peer.receive())[1][-4:] == msg_id.to_bytes(4, "little")
        posted = RegionData(4, PciRegion.CONFIG, 2, b"\x06\x00").build()  # COMMAND
        peer.send(message(99, Command.REGION_WRITE, posted, HeaderFlag.NO_REPLY))
        assert list(dispatched.values()) == [after_version]
        peer.send(message(100, Command.REGION_READ, RegionAccess(0, PciRegion.ROM, 4).build()))
        assert (await peer.receive())[0].flags & HeaderFlag.ERROR
        assert list(dispatched.values()) == [after_version + 1]
        assert device.config.read(4, 2) == b"\x06\x00"
    finally:
        peer.close()


def _offsets(replies: bytes) -> list[int]:
    """Where each message starts in a stream of replies."""
    starts, position = [], 0
    while position < len(replies):
        starts.append(position)
        position += Header.parse(replies[position : position + HEADER_SIZE]).size
    return starts


class PowerSwitch(PciDevice):
    """BAR0 offset 0 is a power switch: writing it closes the server serving the
    device; every write is logged by offset."""

    def __init__(self) -> None:
        self.server: Server | None = None
        self.writes: list[int] = []
        super().__init__(vendor_id=0x1234, device_id=0x0001, bars={0: Bar(4096, write=self.write)})

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append(offset)
        if offset == 0 and self.server is not None:
            self.server.close()


@pytest.mark.parametrize("fast_path", [False, True], ids=["general", "fast"])
async def test_a_handler_that_closes_the_server_is_still_answered(
    sock_dir: str, fast_path: bool
) -> None:
    """As in the general path, the write that switches the device off gets its reply,
    and a write behind it in the same send is dropped, not run."""
    device = PowerSwitch()
    path = os.path.join(sock_dir, "dev.sock")
    async with Server(device, path, fast_path=fast_path) as server:
        device.server = server
        peer = await RawPeer.connect(server.path)
        await peer.negotiate()
        writes = [RegionData(offset, 0, 4, bytes(4)).build() for offset in (0, 8)]
        peer.send(b"".join(message(1 + i, Command.REGION_WRITE, w) for i, w in enumerate(writes)))
        header, _payload = await peer.receive()
        assert (header.msg_id, header.flags) == (1, FLAGS_REPLY)
        assert await peer.expect_closed() == b""
        peer.close()
        await server.wait_closed()
    assert device.writes == [0]


class Overriding(RecordingDevice):
    """A subclass that answers reads of BAR0 itself."""

    def read_region(self, index: int, offset: int, count: int) -> bytes | Awaitable[bytes]:
        if index == PciRegion.BAR0:
            return b"\xab" * count
        return super().read_region(index, offset, count)


async def test_an_overridden_read_region_is_honoured(sock_dir: str) -> None:
    device = Overriding()
    async with Server(device, os.path.join(sock_dir, "dev.sock")) as server:
        peer = await RawPeer.connect(server.path)
        await peer.negotiate()
        for region, expected in ((PciRegion.BAR0, b"\xab" * 4), (PciRegion.CONFIG, b"\xf4\x1a")):
            read = RegionAccess(0, region, len(expected)).build()
            peer.send(message(7, Command.REGION_READ, read))
            assert (await peer.receive())[1][16:] == expected
        peer.close()
