"""Random client streams through the session core in memory: however the stream is
cut into receives, whether the hot path is on or off, and whether its loop is C or
Python, the server answers the same bytes, the device sees the same calls, and the
session ends in the same state, with every fd it was given closed. Streams carry
valid and refused accesses, posted and not, other commands, fds, unknown flag bits,
and may stop mid-message."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muser.session import SessionSettings, fast
from muser.session.regions import ACCESS_SIZE
from muser.wire.constants import (
    FLAGS_POSTED_COMMAND,
    FLAGS_REPLY,
    HEADER_SIZE,
    Command,
    HeaderFlag,
    PciRegion,
)
from muser.wire.messages import (
    DeviceInfo,
    RegionAccess,
    RegionData,
    RegionInfo,
    WriteMulti,
    WriteOne,
)
from tests.helpers import RecordingDevice, message, open_fds, version_request
from tests.session_pair import SessionPair

REGIONS = [
    (PciRegion.BAR0, 4096),
    (PciRegion.CONFIG, 256),
    (PciRegion.BAR1, 16),
    (PciRegion.BAR2, 256),
    (PciRegion.BAR4, 0x4000),
    (PciRegion.BAR3, 0),
    (12, 0),
]
"""RecordingDevice's regions (plain, async, refusing and crashing handlers) and some
it does not have."""


ONE_WRITE = WriteMulti(1, (WriteOne(8, 0, 4, bytes(8)),)).build()


@dataclass(frozen=True)
class Piece:
    data: bytes
    with_fd: bool


@st.composite
def accesses(draw: st.DrawFn, msg_id: int) -> Piece:
    region, size = draw(st.sampled_from(REGIONS))
    count = draw(st.sampled_from([1, 2, 4, 8, 0, 64]))
    last = max(size - count, 0)  # the last offset in bounds, and those just past it
    offset = draw(st.integers(0, last) | st.sampled_from([last, last + 1, size, 1 << 63]))
    flags = draw(st.sampled_from([0, 0, 0, int(HeaderFlag.NO_REPLY), 0x100, 0x10 | 0x200]))
    if draw(st.booleans()):
        excess = draw(st.sampled_from([b"", b"", b"\0"]))
        payload = RegionAccess(offset, region, count).build() + excess
        command = Command.REGION_READ
    else:
        data = draw(st.binary(min_size=count, max_size=count + 1))
        payload = RegionData(offset, region, count, data).build()
        command = Command.REGION_WRITE
    with_fd = draw(st.integers(0, 15)) == 0
    return Piece(message(msg_id, command, payload, flags), with_fd)


@st.composite
def others(draw: st.DrawFn, msg_id: int) -> Piece:
    command, payload = draw(
        st.sampled_from(
            [
                (Command.DEVICE_GET_INFO, DeviceInfo(16, 0, 0, 0).build()),
                (Command.DEVICE_GET_REGION_INFO, RegionInfo(32, 0, 0, 0, 0, 0, b"").build()),
                (Command.DEVICE_GET_REGION_INFO, RegionInfo(32, 0, 40, 0, 0, 0, b"").build()),
                (Command.DEVICE_RESET, b""),
                (Command.REGION_WRITE_MULTI, ONE_WRITE),
                (0x7F, b"??"),
            ]
        )
    )  # fmt: skip
    return Piece(message(msg_id, command, payload), draw(st.integers(0, 7)) == 0)


@dataclass(frozen=True)
class Stream:
    pieces: list[Piece]
    """The messages after VERSION."""
    stop: int | None
    """Where the client stops and leaves, if it does."""
    cuts: list[int]
    """How many bytes each receive takes (the rest in one, once they run out):
    anywhere, or at message boundaries."""


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    pieces = [
        draw(st.one_of(accesses(msg_id), accesses(msg_id), accesses(msg_id), others(msg_id)))
        for msg_id in range(1, draw(st.integers(1, 40)))
    ]
    total = sum(len(piece.data) for piece in pieces)
    stop = draw(st.none() | st.integers(0, total))
    if draw(st.booleans()):
        cuts = draw(st.lists(st.integers(1, 90), max_size=60))
    else:
        group = draw(st.sampled_from([1, 1, 2, 3]))
        sizes = [len(piece.data) for piece in pieces]
        cuts = [sum(sizes[start : start + group]) for start in range(0, len(sizes), group)]
    return Stream(pieces, stop, cuts)


def serve(
    stream: Stream, *, fast_path: bool, cut: bool, accelerated: bool = True
) -> tuple[bytes, list[tuple[str, int, bytes]], bytes, bytes, str]:
    """What the client receives, what the device saw and holds, and the final state.
    Without `accelerated`, the hot path runs its Python loop even where the C one
    (muser._speedups) is built."""
    device = RecordingDevice()
    accelerator = fast.ACCELERATOR
    fast.ACCELERATOR = accelerator if accelerated else None
    try:  # the hot path picks its loop when the session is made
        pair = SessionPair(device, settings=SessionSettings(fast_path=fast_path))
    finally:
        fast.ACCELERATOR = accelerator
    pieces, stop, sent = stream.pieces, stream.stop, 0
    pair.send_raw(version_request())
    pair.pump()
    for piece in pieces:
        data = piece.data if stop is None else piece.data[: max(stop - sent, 0)]
        if not data:
            break
        fd = os.eventfd(0) if piece.with_fd else None
        pair.send_raw(data, [] if fd is None else [fd])
        if fd is not None:
            os.close(fd)
        sent += len(data)
    answered = bytearray()

    def keep(data: bytes, fds: list[int], fds_lost: bool = False) -> bool:
        answered.extend(data)
        for fd in fds:
            os.close(fd)
        return False

    pair.client_session.data_received = keep
    cuts = iter(stream.cuts if cut else [])
    pair.pump(lambda waiting: min(next(cuts, waiting), waiting))
    if stop is not None:
        pair.leave()
    state = pair.session.state.name
    return bytes(answered), device.log, bytes(device.memory), bytes(device.io), state


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(streams())
def test_any_cut_of_the_stream_gives_the_same_session(stream: Stream) -> None:
    before = open_fds()
    assert serve(stream, fast_path=True, cut=True) == serve(stream, fast_path=True, cut=False)
    assert open_fds() == before


@SETTINGS
@given(streams(), st.booleans())
def test_the_hot_path_answers_as_the_general_path(stream: Stream, cut: bool) -> None:
    before = open_fds()
    assert serve(stream, fast_path=True, cut=cut) == serve(stream, fast_path=False, cut=cut)
    assert open_fds() == before


@pytest.mark.skipif(
    fast.ACCELERATOR is None, reason="muser._speedups is not built, or MUSER_PURE_PYTHON is set"
)
@SETTINGS
@given(streams(), st.booleans())
def test_the_c_loop_answers_as_the_python_loop(stream: Stream, cut: bool) -> None:
    before = open_fds()
    accelerated = serve(stream, fast_path=True, cut=cut)
    assert accelerated == serve(stream, fast_path=True, cut=cut, accelerated=False)
    assert open_fds() == before


@pytest.mark.skipif(
    fast.ACCELERATOR is None, reason="muser._speedups is not built, or MUSER_PURE_PYTHON is set"
)
def test_the_c_loop_speaks_the_same_wire() -> None:
    speedups = fast.ACCELERATOR
    assert speedups is not None
    assert (speedups.ACCESS_SIZE, speedups.HEADER_SIZE) == (ACCESS_SIZE, HEADER_SIZE)
    assert (speedups.REGION_READ, speedups.REGION_WRITE) == (
        Command.REGION_READ,
        Command.REGION_WRITE,
    )
    assert (speedups.FLAGS_POSTED, speedups.FLAGS_REPLY) == (FLAGS_POSTED_COMMAND, FLAGS_REPLY)
    with pytest.raises(TypeError, match="observing nothing"):
        speedups.serve_plain(b"", (*[()] * 7, print))


def test_the_accelerator_is_built_where_a_compiler_is() -> None:
    """CI installs as the README says: the extension must have been built, unless
    the machine cannot build it or the Python loop was asked for."""
    if os.environ.get("MUSER_PURE_PYTHON"):
        assert fast.ACCELERATOR is None
    elif shutil.which("cc") is not None:
        assert fast.ACCELERATOR is not None
