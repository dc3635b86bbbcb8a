"""libvfio-user's sample client, replayed against the `timer` sample from its recorded
session with libvfio-user's own server (tests/vectors/libvfio-user-client-server.json).

What does not depend on the clock or on random bytes is compared with what the C
server sent: negotiation, the region and IRQ descriptions, every header-only reply,
the migration data with its padding (the client reads exactly 16 + 8 + the size it
asked for), and a destination that resumes from the STOP_COPY part alone, as this
client delivers it, and then reads back BAR1 byte for byte.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from muser import Server
from muser.recording import Record as TraceRecord
from muser.trace import stand_in_fds
from muser.wire import Capabilities, close_fds, parse_capabilities
from muser.wire.constants import HEADER_SIZE, Command, IrqInfoFlag, MigrationState, PciRegion
from muser.wire.messages import (
    DeviceFeature,
    Header,
    IrqInfo,
    MigData,
    MigDeviceState,
    RegionAccess,
    RegionData,
    Version,
)
from muser_samples.timer import BAR1_SIZE, IMAGE_SIZE, Timer
from tests.helpers import RawPeer
from tests.vectors import VECTOR_DIR, Record, load

RECORDS = load(VECTOR_DIR / "libvfio-user-client-server.json")
CHUNK = 1024
"""The client's max_data_xfer_size: every migration read and write is this big."""
LATER = int(time.time()) + 3600
"""A BAR0 deadline that does not fire during the test (the recorded one has passed)."""


def requests_and_replies(session: str) -> list[tuple[Record, Record]]:
    """The session's client requests with the server's replies, in order; the
    server's own DMA requests (the recorded timer firing) and their answers left out."""
    records = [record for record in RECORDS if record.session == session]
    replies = {
        (record.msg_id, record.command, index): record
        for index, record in enumerate(records)
        if record.direction == "s2c" and record.flags & 1
    }
    pairs = []
    for index, record in enumerate(records):
        if record.direction != "c2s" or record.flags & 1:
            continue
        reply = next(
            reply
            for (msg_id, command, at), reply in replies.items()
            if (msg_id, command) == (record.msg_id, record.command) and at > index
        )
        pairs.append((record, reply))
    return pairs


def payload(record: Record) -> bytes:
    return record.data[HEADER_SIZE:]


async def ask(peer: RawPeer, request: Record | bytes, nfds: int = 0) -> bytes:
    """Send a recorded request (with stand-in fds, as the replay command does) and
    return the whole reply message."""
    data = request.data if isinstance(request, Record) else request
    trace_record = TraceRecord("c2s", data, nfds, "replay")
    fds = stand_in_fds(trace_record)
    try:
        peer.send(data, fds)
    finally:
        close_fds(fds)
    header, body = await peer.receive()
    return header.build() + body


def capabilities(version_message: bytes) -> Capabilities:
    """What a VERSION message says, the spec's defaults where it says nothing."""
    return parse_capabilities(Version.parse(version_message[HEADER_SIZE:]).capabilities)


def with_deadline(record: Record, deadline: int) -> bytes:
    """A recorded BAR0 write, with another deadline."""
    access = RegionData.parse(payload(record))
    data = deadline.to_bytes(8, "little")
    return Header(record.msg_id, record.command, len(record.data), 0, 0).build() + (
        RegionData(access.offset, access.region, access.count, data).build()
    )


@pytest.fixture
async def timer(sock_path: str) -> AsyncIterator[Server]:
    async with Server(Timer(), sock_path) as server:
        yield server


def check_reply(request: Record, recorded: Record, got: bytes) -> None:
    """Our reply against libvfio-user's, exactly where nothing differs by design."""
    command = request.command
    if command == Command.VERSION:
        ours, theirs = capabilities(got), capabilities(recorded.data)
        assert (ours.max_msg_fds, ours.max_data_xfer_size, ours.pgsizes) == (
            theirs.max_msg_fds,
            theirs.max_data_xfer_size,
            theirs.pgsizes,
        )
        return
    if command == Command.DEVICE_GET_IRQ_INFO:
        # counts as libvfio-user's; flags as Linux's vfio-pci (it reports EVENTFD alone)
        ours_info, theirs_info = IrqInfo.parse(got[HEADER_SIZE:]), IrqInfo.parse(payload(recorded))
        assert (ours_info.argsz, ours_info.index, ours_info.count) == (
            theirs_info.argsz,
            theirs_info.index,
            theirs_info.count,
        )
        assert ours_info.flags & IrqInfoFlag.EVENTFD
        return
    if command == Command.REGION_READ and not recorded.flags & 0x20:
        access = RegionAccess.parse(payload(request))
        assert len(got) == len(recorded.data)
        if access.region == PciRegion.CONFIG:
            # the identity; the rest of the header is each library's own
            assert got[HEADER_SIZE + 16 :][:4] == recorded.data[HEADER_SIZE + 16 :][:4]
            assert (
                got[HEADER_SIZE + 16 + 0x2C :][:4] == recorded.data[HEADER_SIZE + 16 + 0x2C :][:4]
            )
        return
    if command == Command.DEVICE_FEATURE and DeviceFeature.parse(payload(request)).feature == 8:
        # a dirty-page report: the recorded one saw the timer's DMA, which is not replayed
        assert got[: HEADER_SIZE + 32] == recorded.data[: HEADER_SIZE + 32]
        return
    assert got == recorded.data, f"{Command(command).name} msg_id {request.msg_id:#x}"


async def test_source_session(timer: Server) -> None:
    """The client's session with its source server, to the end of STOP_COPY."""
    peer = await RawPeer.connect(timer.path)
    stop_copy: list[bytes] = []
    state = MigrationState.RUNNING
    try:
        for request, recorded in requests_and_replies("src"):
            command = request.command
            if command == Command.REGION_WRITE and RegionData.parse(payload(request)).region == 0:
                await ask(peer, with_deadline(request, LATER))
                continue
            got = await ask(peer, request, request.nfds)
            if command == Command.DEVICE_FEATURE:
                feature = DeviceFeature.parse(payload(request))
                if feature.feature == 2:
                    state = MigrationState(MigDeviceState.parse(feature.data).device_state)
            if command == Command.MIG_DATA_READ and state == MigrationState.STOP_COPY:
                reply = MigData.parse(got[HEADER_SIZE:])
                assert len(got) == HEADER_SIZE + 8 + CHUNK, "padded to the size asked for"
                assert reply.argsz == 8 + reply.size
                stop_copy.append(reply.data[: reply.size])
                continue
            check_reply(request, recorded, got)
    finally:
        peer.close()
    # STOP_COPY is 12 whole chunks and one of 8 bytes: BAR1 as the client last wrote it,
    # then BAR0's deadline, as server.c lays it out
    assert [len(chunk) for chunk in stop_copy] == [CHUNK] * 12 + [8]
    image = b"".join(stop_copy)
    written = next(
        r
        for r in RECORDS
        if r.session == "src"
        and r.command == Command.REGION_WRITE
        and RegionData.parse(payload(r)).region == 1
    )
    assert image[:BAR1_SIZE] == RegionData.parse(payload(written)).data
    assert int.from_bytes(image[BAR1_SIZE:], "little") == LATER


async def test_destination_resumes_from_stop_copy_alone(timer: Server) -> None:
    """The client writes the destination the STOP_COPY chunks alone: 0x3008 bytes, a
    complete image; BAR1 then reads back as the source's, byte for byte."""
    peer = await RawPeer.connect(timer.path)
    written = 0
    try:
        for request, recorded in requests_and_replies("dst"):
            got = await ask(peer, request, request.nfds)
            if request.command == Command.MIG_DATA_WRITE:
                written += MigData.parse(payload(request)).size
            check_reply(request, recorded, got)
    finally:
        peer.close()
    assert written == IMAGE_SIZE
    device = timer.device
    assert isinstance(device, Timer)
    assert device.deadline == 0x6B0B463F, "BAR0's value came with the image"
