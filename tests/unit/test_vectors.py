"""Every message of every golden transcript parses with our declarations and builds
back to the same bytes."""

from __future__ import annotations

import pytest

from muser.wire import Framer, parse_capabilities
from muser.wire.constants import Command, FeatureFlag, RegionFlag
from muser.wire.messages import (
    FEATURE_DATA,
    REPLIES,
    REQUESTS,
    DeviceFeature,
    RegionInfo,
    SparseMmapCap,
    Version,
    region_caps,
    region_caps_bytes,
)
from tests.vectors import VECTOR_FILES, all_records, load

RECORDS = all_records()


def test_vector_counts() -> None:
    counts = {path.name: len(load(path)) for path in VECTOR_FILES}
    assert counts == {
        "libvfio-user-client-server.json": 288,
        "libvfio-user-gpio.json": 66,
        "qemu-gpio-guest-nofd.json": 798,
        "qemu-gpio-guest.json": 798,
    }


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_every_message_round_trips(path) -> None:
    for record in load(path):
        framer = Framer(max_message_size=1 << 21)
        frames = framer.feed(record.data, ())
        assert len(frames) == 1
        assert framer.buffered == 0
        frame = frames[0]
        assert (frame.msg_id, frame.command, frame.flags) == (
            record.msg_id,
            record.command,
            record.flags,
        )
        assert frame.encode() == record.data
        if frame.is_error:
            assert frame.payload == b""
            continue
        table = REPLIES if frame.is_reply else REQUESTS
        message = table[Command(frame.command)].parse(frame.payload)
        assert message.build() == frame.payload, (record.file, record.index)
        if isinstance(message, DeviceFeature) and message.data:
            data_layout = FEATURE_DATA.get(message.feature)
            if data_layout is not None and not message.flags & FeatureFlag.PROBE:
                assert data_layout.parse(message.data).build() == message.data
        if isinstance(message, Version):
            parse_capabilities(message.capabilities)
        if isinstance(message, RegionInfo) and message.flags & RegionFlag.CAPS:
            caps = region_caps(message)
            assert region_caps_bytes(caps) == message.caps


def test_sparse_mmap_capability_decodes() -> None:
    replies = [
        RegionInfo.parse(r.data[16:])
        for r in RECORDS
        if r.command == Command.DEVICE_GET_REGION_INFO and r.flags == 1 and r.nfds == 1
    ]
    assert len(replies) == 1
    (cap,) = region_caps(replies[0])
    assert isinstance(cap, SparseMmapCap)
    assert [(a.offset, a.size) for a in cap.areas] == [(0, 0x1000), (0x2000, 0x1000)]


def test_whole_transcript_through_one_framer() -> None:
    """Feeding each direction of a session as one stream yields the same messages."""
    for path in VECTOR_FILES:
        records = [r for r in load(path) if r.direction == "c2s"]
        stream = b"".join(r.data for r in records)
        framer = Framer(max_message_size=1 << 21)
        frames = []
        for start in range(0, len(stream), 7):
            frames += framer.feed(stream[start : start + 7], ())
        assert [f.encode() for f in frames] == [r.data for r in records]
