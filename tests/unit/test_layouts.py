"""Layouts: the struct fast path and the construct declaration agree, and any bytes
either parse or raise ProtocolError."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from muser.errors import ProtocolError
from muser.wire import Framer
from muser.wire.constants import Command, FeatureFlag
from muser.wire.layout import Layout, joined_codec, prefix_codec
from muser.wire.messages import (
    ACCESS_CODEC,
    ACCESS_MESSAGE,
    DMA_ACCESS_CODEC,
    DMA_DATA_QEMU_PREFIX,
    FEATURE_DATA,
    HEADER_CODEC,
    REPLIES,
    REQUESTS,
    CapHeader,
    DeviceFeature,
    DmaAccess,
    DmaData,
    DmaDataQemu,
    DmaUnmap,
    Header,
    IoEventFdEntry,
    RegionAccess,
    RegionData,
    RegionInfo,
    SparseMmapArea,
    SparseMmapCap,
    TypeCap,
    Version,
    WriteMulti,
    WriteOne,
    build_write_multi,
    parse_write_multi,
    region_caps,
    region_caps_bytes,
)

LAYOUTS = sorted(
    {*REQUESTS.values(), *REPLIES.values(), *FEATURE_DATA.values()},
    key=lambda layout: layout.__name__,
)
FAST = [layout for layout in LAYOUTS if layout.CODEC is not None]


def test_header_layout_matches_the_spec() -> None:
    assert Header.CODEC is not None
    assert Header.SIZE == Header.CODEC.size == 16
    raw = bytes.fromhex("0100020030000000010000001600000000")[:16]
    assert Header.parse(raw) == Header(1, 2, 0x30, 1, 22)
    assert Header.CODEC.unpack(raw) == struct.unpack("<HHIII", raw)


def test_fixed_sizes() -> None:
    sizes = {layout.__name__: layout.SIZE for layout in LAYOUTS}
    assert sizes["DmaMap"] == 32
    assert sizes["DmaUnmap"] == 24
    assert sizes["RegionInfo"] == 32
    assert sizes["IrqSet"] == 20
    assert sizes["RegionData"] == 16
    assert sizes["DeviceFeature"] == 8
    assert sizes["MigData"] == 8
    assert IoEventFdEntry.SIZE == 48


@given(
    header=st.tuples(*(st.integers(0, 0xFFFF),) * 2, *(st.integers(0, 0xFFFFFFFF),) * 3),
    access=st.tuples(st.integers(0, 2**64 - 1), *(st.integers(0, 0xFFFFFFFF),) * 2),
    data=st.binary(max_size=8),
)
def test_whole_message_codecs_agree_with_the_declarations(
    header: tuple[int, ...], access: tuple[int, int, int], data: bytes
) -> None:
    """The fast lane's one-call codecs are the header and access layouts back to back."""
    assert HEADER_CODEC.pack(*header) == Header(*header).build()
    assert ACCESS_CODEC.pack(*access) == RegionAccess(*access).build()
    whole = Header(*header).build() + RegionAccess(*access).build()
    assert ACCESS_MESSAGE.pack(*header, *access) == whole
    assert ACCESS_MESSAGE.unpack_from(whole + data) == (*header, *access)
    assert (whole + data)[16:] == RegionData(*access, data).build()
    for variable in (Version, DmaUnmap):
        with pytest.raises(TypeError, match="not all fixed-size fields"):
            joined_codec(Header, variable)


@given(address=st.integers(0, 2**64 - 1), count=st.integers(0, 0xFFFFFFFF), data=st.binary())
def test_dma_codecs_agree_with_the_declarations(address: int, count: int, data: bytes) -> None:
    """Message DMA packs its request and unpacks the reply's fixed fields in one call."""
    assert DMA_ACCESS_CODEC.pack(address, count) == DmaAccess(address, count).build()
    spec = DmaData(address, count, data).build()
    assert DMA_ACCESS_CODEC.unpack_from(spec) == (address, count)
    qemu = DmaDataQemu(address, count, data).build()
    assert DMA_DATA_QEMU_PREFIX.unpack_from(qemu) == (address, count)
    assert qemu[DMA_DATA_QEMU_PREFIX.size :] == data
    with pytest.raises(TypeError, match="has no variable part"):
        prefix_codec(DmaAccess)
    # before an array, or an optional field, the prefix is the fixed fields ahead of it
    assert prefix_codec(SparseMmapCap).size == SparseMmapCap.SIZE == 16
    assert prefix_codec(DmaUnmap).size == DmaUnmap.SIZE == 24


@pytest.mark.parametrize("layout", FAST, ids=lambda layout: layout.__name__)
@given(data=st.data())
def test_fast_path_agrees_with_construct(layout: type[Layout], data: st.DataObject) -> None:
    payload = data.draw(st.binary(min_size=layout.SIZE, max_size=layout.SIZE + 24))
    if not layout.HAS_TAIL:
        payload = payload[: layout.SIZE]
    fast = layout.parse(payload)
    parsed = layout.STRUCT.parse(payload)
    assert {name: getattr(fast, name) for name in layout.FIELDS} == {
        name: parsed[name] for name in layout.FIELDS
    }
    assert fast.build() == layout.STRUCT.build(parsed) == payload


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.__name__)
@given(payload=st.binary(max_size=200))
def test_any_bytes_parse_or_raise_protocol_error(layout: type[Layout], payload: bytes) -> None:
    try:
        message = layout.parse(payload)
    except ProtocolError:
        return
    assert message.build() == payload
    parts = message.build_parts()
    assert b"".join(parts) == payload
    assert len(parts) == (2 if layout.HAS_TAIL and layout.CODEC is not None else 1)


@given(st.binary(max_size=400))
def test_framer_and_decoders_never_raise_anything_else(data: bytes) -> None:
    framer = Framer(1 << 16)
    try:
        frames = framer.feed(data)
    except ProtocolError:
        return
    for frame in frames:
        table = REPLIES if frame.is_reply else REQUESTS
        try:
            layout = table[Command(frame.command)]
        except ValueError:
            continue
        with contextlib.suppress(ProtocolError):
            layout.parse(frame.payload)


def test_build_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="RegionData"):
        RegionData(1 << 64, 0, 0, b"").build()
    with pytest.raises(ValueError, match="RegionData"):
        RegionData(1 << 64, 0, 0, b"").build_parts()
    with pytest.raises(ValueError, match="DmaUnmap"):
        DmaUnmap(24, 1, 0, 0, None).build()


def test_dma_unmap_bitmap_follows_the_flag() -> None:
    plain = DmaUnmap.parse(struct.pack("<IIQQ", 24, 0, 0x1000, 0x1000))
    assert plain.bitmap is None
    with_bitmap = DmaUnmap.parse(struct.pack("<IIQQQQ", 40, 1, 0x1000, 0x1000, 4096, 8))
    assert with_bitmap.bitmap is not None
    assert (with_bitmap.bitmap.pgsize, with_bitmap.bitmap.size) == (4096, 8)
    with pytest.raises(ProtocolError):
        DmaUnmap.parse(struct.pack("<IIQQ", 24, 1, 0x1000, 0x1000))


def test_write_multi_count_bounded_by_payload() -> None:
    with pytest.raises(ProtocolError):
        WriteMulti.parse((1 << 63).to_bytes(8, "little") + bytes(24))


def test_region_caps_chain_round_trip() -> None:
    caps = [
        SparseMmapCap(1, 1, 0, 2, 0, (SparseMmapArea(0, 0x1000), SparseMmapArea(0x3000, 0x1000))),
        TypeCap(2, 1, 0, 0x80001AF4, 1),
        CapHeader(3, 1, 0),
    ]
    chain = region_caps_bytes(caps)
    info = RegionInfo(32 + len(chain), 0xF, 9, 32, 0x4000, 0, chain)
    parsed = region_caps(RegionInfo.parse(info.build()))
    assert [type(cap) for cap in parsed] == [SparseMmapCap, TypeCap, CapHeader]
    assert parsed[0].next == 32 + 48
    assert parsed[1].next == 32 + 48 + 16
    assert parsed[2].next == 0
    assert region_caps_bytes(parsed) == chain


@pytest.mark.parametrize("cap_offset", [8, 31, 200])
def test_region_caps_out_of_bounds(cap_offset: int) -> None:
    info = RegionInfo(48, 0xF, 0, cap_offset, 0, 0, bytes(16))
    with pytest.raises(ProtocolError):
        region_caps(info)


def test_region_caps_loop_is_refused() -> None:
    looping = CapHeader(3, 1, 32).build()
    with pytest.raises(ProtocolError):
        region_caps(RegionInfo(40, 0xF, 0, 32, 0, 0, looping))


@given(st.binary(min_size=8, max_size=120), st.integers(min_value=0, max_value=160))
def test_region_caps_parse_or_protocol_error(chain: bytes, cap_offset: int) -> None:
    info = RegionInfo(32 + len(chain), 0xF, 0, cap_offset, 0, 0, chain)
    with contextlib.suppress(ProtocolError):
        region_caps(info)


def test_feature_index() -> None:
    feature = DeviceFeature(16, FeatureFlag.GET | 1, bytes(8))
    assert feature.feature == 1


@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
            st.binary(min_size=8, max_size=8),
        ),
        max_size=20,
    )
)
def test_write_multi_fast_path_agrees_with_the_declaration(
    entries: list[tuple[int, int, int, bytes]],
) -> None:
    writes = [WriteOne(*entry) for entry in entries]
    payload = build_write_multi(writes)
    assert payload == WriteMulti(len(writes), tuple(writes)).build()
    assert parse_write_multi(payload) == list(WriteMulti.parse(payload).writes)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01" + bytes(6),
        (2).to_bytes(8, "little") + bytes(24),
        (1 << 63).to_bytes(8, "little"),
    ],
)
def test_write_multi_fast_parse_checks_sizes(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_write_multi(payload)
