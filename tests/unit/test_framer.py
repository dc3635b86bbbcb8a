"""The framer on its own: no sockets, real fds only where ownership is the point."""

from __future__ import annotations

import itertools
import os
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from muser.errors import ProtocolError
from muser.wire import Framer, FramingError, encode_header
from muser.wire.constants import Command
from muser.wire.framer import GATHER_FROM
from tests.helpers import message, open_fds

LIMIT = 4096


def stream(count: int) -> bytes:
    return b"".join(
        message(i, Command.REGION_WRITE, bytes([i]) * (i * 7 % 50)) for i in range(count)
    )


@given(st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=40))
def test_any_split_gives_the_same_frames(cuts: list[int]) -> None:
    data = stream(20)
    framer = Framer(LIMIT)
    frames = []
    position = 0
    for cut in cuts:
        frames += framer.feed(data[position : position + cut])
        position += cut
    frames += framer.feed(data[position:])
    assert b"".join(frame.encode() for frame in frames) == data
    assert [frame.msg_id for frame in frames] == list(range(20))
    assert framer.buffered == 0


def test_header_is_checked_before_the_payload_arrives() -> None:
    framer = Framer(LIMIT)
    with pytest.raises(FramingError, match="exceeds"):
        framer.feed(encode_header(1, Command.REGION_WRITE, LIMIT, 0))
    assert framer.buffered == 0


@pytest.mark.parametrize(
    ("size", "flags", "match"),
    [
        (15, 0, "smaller than its header"),
        (16, 2, "type 2"),
        (16, 0x3F, "type 15"),
        (LIMIT + 1, 0, "exceeds"),
    ],
)
def test_bad_headers(size: int, flags: int, match: str) -> None:
    header = message(1, 1, size=size, flags=flags)
    with pytest.raises(FramingError, match=match) as caught:
        Framer(LIMIT).feed(header)
    assert isinstance(caught.value, ProtocolError)


def test_frames_before_a_bad_header_are_kept() -> None:
    good = message(1, Command.DEVICE_RESET)
    with pytest.raises(FramingError) as caught:
        Framer(LIMIT).feed(good + message(2, 1, size=3))
    assert [frame.msg_id for frame in caught.value.frames] == [1]


def test_reserved_flag_bits_are_ignored() -> None:
    (frame,) = Framer(LIMIT).feed(message(1, Command.DEVICE_RESET, flags=0xFFFF_FF00 | 0x10))
    assert frame.no_reply
    assert not frame.is_reply


def test_fds_go_to_the_message_that_starts_in_their_chunk() -> None:
    """A receive can end a previous message and start the fd-carrying one."""
    first, second = message(1, Command.REGION_WRITE, b"x" * 40), message(2, 2, bytes(32))
    framer = Framer(LIMIT)
    assert framer.feed(first[:30]) == []
    fd = os.eventfd(0)
    frames = framer.feed(first[30:] + second[:10], [fd])
    assert [frame.msg_id for frame in frames] == [1]
    assert frames[0].fds == []
    (carrier,) = framer.feed(second[10:])
    assert carrier.fds == [fd]
    carrier.close_fds()


def test_fds_with_only_body_bytes_are_refused_and_closed() -> None:
    before = open_fds()
    data = message(1, Command.REGION_WRITE, b"x" * 40)
    framer = Framer(LIMIT)
    framer.feed(data[:20])
    with pytest.raises(FramingError, match="body") as caught:
        framer.feed(data[20:], [os.eventfd(0), os.memfd_create("x")])
    assert caught.value.frames == []
    assert open_fds() == before


def test_close_releases_a_partial_messages_fds() -> None:
    before = open_fds()
    framer = Framer(LIMIT)
    framer.feed(message(1, 2, bytes(32))[:20], [os.eventfd(0)])
    assert open_fds() != before
    framer.close()
    assert open_fds() == before
    assert framer.buffered == 0


def test_frame_take_fds_transfers_ownership() -> None:
    fd = os.eventfd(0)
    (frame,) = Framer(LIMIT).feed(message(1, 2, bytes(32)), [fd])
    assert frame.take_fds() == [fd]
    frame.close_fds()
    os.fstat(fd)
    os.close(fd)


@st.composite
def split_stream(draw: st.DrawFn) -> tuple[list[tuple[bytes, list[int]]], list[bytes], set[int]]:
    """Messages small and large (gathered), cut anywhere; some receives carry an fd,
    which belongs to the last message that starts in that receive."""
    sizes = draw(
        st.lists(
            st.sampled_from([0, 7, 100, GATHER_FROM - 16, GATHER_FROM + 5, 200_000]),
            min_size=1,
            max_size=8,
        )
    )
    messages = [
        message(i, Command.REGION_WRITE, bytes([i + 1]) * size) for i, size in enumerate(sizes)
    ]
    data = b"".join(messages)
    starts = [sum(map(len, messages[:i])) for i in range(len(messages))]
    cuts = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=12))))
    bounds = [0, *cuts, len(data)]
    receives: list[tuple[bytes, list[int]]] = []
    carriers: set[int] = set()
    for low, high in itertools.pairwise(bounds):
        starting = [i for i, start in enumerate(starts) if low <= start < high]
        with_fd = bool(starting) and draw(st.booleans())
        if with_fd:
            carriers.add(starting[-1])
        receives.append((data[low:high], [os.eventfd(0)] if with_fd else []))
    return receives, messages, carriers


@given(split_stream())
def test_gathered_large_messages_keep_their_bytes_and_fds(
    case: tuple[list[tuple[bytes, list[int]]], list[bytes], set[int]],
) -> None:
    receives, messages, carriers = case
    framer = Framer(1 << 20)
    frames = []
    for data, fds in receives:
        frames += framer.feed(data, fds)
    assert [frame.encode() for frame in frames] == messages
    assert {frame.msg_id for frame in frames if frame.fds} == carriers
    assert framer.buffered == 0
    for frame in frames:
        frame.close_fds()


def test_fds_with_a_large_messages_body_are_refused_and_closed() -> None:
    before = open_fds()
    data = message(1, Command.REGION_WRITE, bytes(GATHER_FROM * 3))
    framer = Framer(1 << 20)
    assert framer.feed(data[:1000]) == []
    assert framer.buffered == 1000
    assert framer.feed(data[1000:GATHER_FROM]) == []
    assert framer.buffered == GATHER_FROM
    with pytest.raises(FramingError, match="body") as caught:
        framer.feed(data[GATHER_FROM : 2 * GATHER_FROM], [os.eventfd(0)])
    assert caught.value.frames == []
    assert framer.buffered == 0
    assert open_fds() == before


def test_a_bad_header_after_a_large_message_keeps_it() -> None:
    large = message(1, Command.REGION_WRITE, bytes(GATHER_FROM))
    framer = Framer(1 << 20)
    framer.feed(large[:100])
    with pytest.raises(FramingError, match="smaller") as caught:
        framer.feed(large[100:] + message(2, 1, size=3))
    assert [frame.payload for frame in caught.value.frames] == [bytes(GATHER_FROM)]


def test_a_large_message_sent_a_few_bytes_at_a_time_is_held_once() -> None:
    """Tiny receives of a gathered message are kept together, not an object each:
    holding it costs about its size, however it is cut."""
    data = message(1, Command.REGION_WRITE, bytes(range(256)) * (GATHER_FROM // 256))
    framer = Framer(1 << 20)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for position in range(0, len(data) - 3, 3):
            assert framer.feed(data[position : position + 3]) == []
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2 * len(data)
    (frame,) = framer.feed(data[position + 3 :])
    assert frame.encode() == data
