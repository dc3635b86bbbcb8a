"""construct declarations of every vfio-user payload (protocol.md §3), each declared once.

Offsets are relative to the first byte after the 16-byte header. Where real
peers send more than the fixed part (padding up to `argsz`, libvfio-user's padded
MIG_DATA_READ replies) the layout ends in a bytes tail, so that a parsed message
builds back to the same bytes.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from typing import Any

import construct as cs

from muser.errors import ProtocolError
from muser.wire.constants import Command, DmaUnmapFlag, Feature, FeatureFlag, RegionCapId
from muser.wire.layout import Layout, array_of, joined_codec, layout, nested, prefix_codec, wire

_u16: Any = cs.Int16ul
_u32: Any = cs.Int32ul
_u64: Any = cs.Int64ul
_tail: Any = cs.GreedyBytes


@layout
class Header(Layout):
    """The 16 bytes in front of every message; `size` includes them."""

    msg_id: int = wire(_u16)
    command: int = wire(_u16)
    size: int = wire(_u32)
    flags: int = wire(_u32)
    error: int = wire(_u32)


@layout
class Empty(Layout):
    """No payload: DMA_MAP/SET_IRQS/RESET/MIG_DATA_WRITE replies, DEVICE_RESET requests."""


@layout
class Version(Layout):
    """VERSION request and reply: the JSON capabilities end with one NUL byte, or are absent."""

    major: int = wire(_u16)
    minor: int = wire(_u16)
    capabilities: bytes = wire(_tail)


@layout
class DmaMap(Layout):
    argsz: int = wire(_u32)
    flags: int = wire(_u32)
    offset: int = wire(_u64)
    address: int = wire(_u64)
    size: int = wire(_u64)


@layout
class DirtyBitmap(Layout):
    """Legacy (migration v1) bitmap header of a DMA_UNMAP with GET_DIRTY_BITMAP."""

    pgsize: int = wire(_u64)
    size: int = wire(_u64)


def _wants_bitmap(ctx: Any) -> bool:
    return bool(ctx.flags & DmaUnmapFlag.GET_DIRTY_BITMAP)


@layout
class DmaUnmap(Layout):
    argsz: int = wire(_u32)
    flags: int = wire(_u32)
    address: int = wire(_u64)
    size: int = wire(_u64)
    bitmap: DirtyBitmap | None = wire(cs.If(_wants_bitmap, nested(DirtyBitmap)))


@layout
class DmaUnmapReply(Layout):
    """The request echoed; with GET_DIRTY_BITMAP, followed by the bitmap bytes."""

    argsz: int = wire(_u32)
    flags: int = wire(_u32)
    address: int = wire(_u64)
    size: int = wire(_u64)
    bitmap: DirtyBitmap | None = wire(cs.If(_wants_bitmap, nested(DirtyBitmap)))
    data: bytes = wire(_tail)


@layout
class DeviceInfo(Layout):
    """DEVICE_GET_INFO request (zeros but `argsz`) and reply."""

    argsz: int = wire(_u32)
    flags: int = wire(_u32)
    num_regions: int = wire(_u32)
    num_irqs: int = wire(_u32)


@layout
class RegionInfo(Layout):
    """DEVICE_GET_REGION_INFO request and reply.

    `caps` holds the capability chain of a reply (see `region_caps`), or the
    zero padding some clients send up to `argsz` in a request.
    """

    argsz: int = wire(_u32)
    flags: int = wire(_u32)
    index: int = wire(_u32)
    cap_offset: int = wire(_u32)
    size: int = wire(_u64)
    offset: int = wire(_u64)
    caps: bytes = wire(_tail)


@layout
class CapHeader(Layout):
    """The head of each region capability; `next` is a payload offset, 0 ends the chain."""

    id: int = wire(_u16)
    version: int = wire(_u16)
    next: int = wire(_u32)


@layout
class SparseMmapArea(Layout):
    offset: int = wire(_u64)
    size: int = wire(_u64)


@layout
class SparseMmapCap(Layout):
    """Capability 1: the parts of a region the client may mmap."""

    id: int = wire(_u16)
    version: int = wire(_u16)
    next: int = wire(_u32)
    nr_areas: int = wire(_u32)
    reserved: int = wire(_u32)
    areas: tuple[SparseMmapArea, ...] = wire(array_of(cs.this.nr_areas, SparseMmapArea))


@layout
class TypeCap(Layout):
    """Capability 2: the type of a device-specific region."""

    id: int = wire(_u16)
    version: int = wire(_u16)
    next: int = wire(_u32)
    type: int = wire(_u32)
    subtype: int = wire(_u32)


@layout
class IoFdsRequest(Layout):
    argsz: int = wire(_u32)
    flags: int = wire(_u32)
    index: int = wire(_u32)
    count: int = wire(_u32)


@layout
class IoFdsReply(Layout):
    """DEVICE_GET_REGION_IO_FDS reply: `entries` is `count` IoEventFdEntry, or empty when
    the client's `argsz` was too small for them."""

    argsz: int = wire(_u32)
    flags: int = wire(_u32)
    index: int = wire(_u32)
    count: int = wire(_u32)
    entries: bytes = wire(_tail)


@layout
class IoEventFdEntry(Layout):
    """One sub-region of an IO_FDS reply, as libvfio-user sends it (48 bytes; the spec's
    40-byte form lacks the shadow fields, protocol.md §9 row 9)."""

    offset: int = wire(_u64)
    size: int = wire(_u64)
    fd_index: int = wire(_u32)
    type: int = wire(_u32)
    flags: int = wire(_u32)
    shadow_mem_fd_index: int = wire(_u32)
    shadow_offset: int = wire(_u64)
    datamatch: int = wire(_u64)


@layout
class IrqInfo(Layout):
    """DEVICE_GET_IRQ_INFO request and reply."""

    argsz: int = wire(_u32)
    flags: int = wire(_u32)
    index: int = wire(_u32)
    count: int = wire(_u32)


@layout
class IrqSet(Layout):
    """DEVICE_SET_IRQS request; `data` holds one byte per vector with DATA_BOOL."""

    argsz: int = wire(_u32)
    flags: int = wire(_u32)
    index: int = wire(_u32)
    start: int = wire(_u32)
    count: int = wire(_u32)
    data: bytes = wire(_tail)


@layout
class RegionAccess(Layout):
    """REGION_READ request and REGION_WRITE reply."""

    offset: int = wire(_u64)
    region: int = wire(_u32)
    count: int = wire(_u32)


@layout
class RegionData(Layout):
    """REGION_READ reply and REGION_WRITE request: the access followed by its data."""

    offset: int = wire(_u64)
    region: int = wire(_u32)
    count: int = wire(_u32)
    data: bytes = wire(_tail)


HEADER_CODEC = joined_codec(Header)
ACCESS_CODEC = joined_codec(RegionAccess)
"""RegionAccess, and the fixed start of RegionData, in one struct call."""
ACCESS_MESSAGE = joined_codec(Header, RegionAccess)
"""A whole REGION_READ request or REGION_WRITE reply, and the first 32 bytes of a
REGION_READ reply or REGION_WRITE request (RegionData starts as RegionAccess)."""


@layout
class DmaAccess(Layout):
    """DMA_READ request and DMA_WRITE reply (libvfio-user's 16-byte form)."""

    address: int = wire(_u64)
    count: int = wire(_u64)


@layout
class DmaWriteReply(Layout):
    """A DMA_WRITE reply as the spec's text lays it out, with a u32 count
    (libvfio-user answers with `DmaAccess`, QEMU with no payload at all)."""

    address: int = wire(_u64)
    count: int = wire(_u32)


@layout
class DmaData(Layout):
    """DMA_READ reply and DMA_WRITE request, as the spec and libvfio-user lay them out."""

    address: int = wire(_u64)
    count: int = wire(_u64)
    data: bytes = wire(_tail)


@layout
class DmaDataQemu(Layout):
    """QEMU 10.x's DMA_READ reply and its reading of DMA_WRITE: a u32 count and data
    from offset 12, padded by 4 bytes at the end (protocol.md §9 row 1)."""

    address: int = wire(_u64)
    count: int = wire(_u32)
    data: bytes = wire(_tail)


QEMU_DMA_PADDING = bytes(4)
"""What follows the data of a `DmaDataQemu` we send."""
DMA_ACCESS_CODEC = joined_codec(DmaAccess)
DMA_WRITE_REPLY_CODECS = {
    codec.size: codec for codec in (joined_codec(DmaWriteReply), DMA_ACCESS_CODEC)
}
"""The spec's and libvfio-user's DMA_WRITE replies, told apart by their size."""
"""DmaAccess, and the fixed start of DmaData, in one struct call."""
DMA_DATA_QEMU_PREFIX = prefix_codec(DmaDataQemu)
"""DmaDataQemu's address and u32 count, ahead of its data."""


def dma_data_parts(address: int, data: bytes, *, qemu: bool) -> tuple[bytes, ...]:
    """A DMA_WRITE request or a DMA_READ reply as parts that leave `data` uncopied:
    in the spec's layout, or in QEMU's (a u32 count, and padding after the data)."""
    if qemu:
        return (*DmaDataQemu(address, len(data), data).build_parts(), QEMU_DMA_PADDING)
    return DmaData(address, len(data), data).build_parts()


@layout
class WriteOne(Layout):
    """One entry of REGION_WRITE_MULTI: the first `count` (1…8) bytes of `data` are used."""

    offset: int = wire(_u64)
    region: int = wire(_u32)
    count: int = wire(_u32)
    data: bytes = wire(cs.Bytes(8))


@layout
class WriteMulti(Layout):
    wr_cnt: int = wire(_u64)
    writes: tuple[WriteOne, ...] = wire(array_of(cs.this.wr_cnt, WriteOne))


@layout
class WriteMultiReply(Layout):
    wr_cnt: int = wire(_u64)


@layout
class DeviceFeature(Layout):
    """DEVICE_FEATURE request and reply; `data` is the feature's own layout (below)."""

    argsz: int = wire(_u32)
    flags: int = wire(_u32)
    data: bytes = wire(_tail)

    @property
    def feature(self) -> int:
        return self.flags & FeatureFlag.INDEX_MASK


@layout
class MigrationFeature(Layout):
    """Data of feature MIGRATION (GET reply)."""

    flags: int = wire(_u64)


@layout
class MigDeviceState(Layout):
    """Data of feature MIG_DEVICE_STATE; `data_fd` is unused in vfio-user."""

    device_state: int = wire(_u32)
    data_fd: int = wire(_u32)


@layout
class DmaLoggingRange(Layout):
    iova: int = wire(_u64)
    length: int = wire(_u64)


@layout
class DmaLoggingStart(Layout):
    """Data of feature DMA_LOGGING_START; no ranges means all of guest memory."""

    page_size: int = wire(_u64)
    num_ranges: int = wire(_u32)
    reserved: int = wire(_u32)
    ranges: tuple[DmaLoggingRange, ...] = wire(array_of(cs.this.num_ranges, DmaLoggingRange))


@layout
class DmaLoggingReport(Layout):
    """Data of feature DMA_LOGGING_REPORT; the reply appends the bitmap."""

    iova: int = wire(_u64)
    length: int = wire(_u64)
    page_size: int = wire(_u64)
    bitmap: bytes = wire(_tail)


@layout
class MigDataRead(Layout):
    """MIG_DATA_READ request."""

    argsz: int = wire(_u32)
    size: int = wire(_u32)


@layout
class MigData(Layout):
    """MIG_DATA_READ reply and MIG_DATA_WRITE request."""

    argsz: int = wire(_u32)
    size: int = wire(_u32)
    data: bytes = wire(_tail)


MIG_DATA_PREFIX = prefix_codec(MigData)
"""MigData's argsz and size, ahead of its data."""


REQUESTS: dict[Command, type[Layout]] = {
    Command.VERSION: Version,
    Command.DMA_MAP: DmaMap,
    Command.DMA_UNMAP: DmaUnmap,
    Command.DEVICE_GET_INFO: DeviceInfo,
    Command.DEVICE_GET_REGION_INFO: RegionInfo,
    Command.DEVICE_GET_REGION_IO_FDS: IoFdsRequest,
    Command.DEVICE_GET_IRQ_INFO: IrqInfo,
    Command.DEVICE_SET_IRQS: IrqSet,
    Command.REGION_READ: RegionAccess,
    Command.REGION_WRITE: RegionData,
    Command.DMA_READ: DmaAccess,
    Command.DMA_WRITE: DmaData,
    Command.DEVICE_RESET: Empty,
    Command.REGION_WRITE_MULTI: WriteMulti,
    Command.DEVICE_FEATURE: DeviceFeature,
    Command.MIG_DATA_READ: MigDataRead,
    Command.MIG_DATA_WRITE: MigData,
}
"""The payload layout of each command's request."""

REPLIES: dict[Command, type[Layout]] = {
    Command.VERSION: Version,
    Command.DMA_MAP: Empty,
    Command.DMA_UNMAP: DmaUnmapReply,
    Command.DEVICE_GET_INFO: DeviceInfo,
    Command.DEVICE_GET_REGION_INFO: RegionInfo,
    Command.DEVICE_GET_REGION_IO_FDS: IoFdsReply,
    Command.DEVICE_GET_IRQ_INFO: IrqInfo,
    Command.DEVICE_SET_IRQS: Empty,
    Command.REGION_READ: RegionData,
    Command.REGION_WRITE: RegionAccess,
    Command.DMA_READ: DmaData,
    Command.DMA_WRITE: DmaAccess,
    Command.DEVICE_RESET: Empty,
    Command.REGION_WRITE_MULTI: WriteMultiReply,
    Command.DEVICE_FEATURE: DeviceFeature,
    Command.MIG_DATA_READ: MigData,
    Command.MIG_DATA_WRITE: Empty,
}
"""The payload layout of each command's successful reply."""

RegionCap = SparseMmapCap | TypeCap | CapHeader

_REGION_CAP_LAYOUTS: dict[int, type[SparseMmapCap | TypeCap | CapHeader]] = {
    RegionCapId.SPARSE_MMAP: SparseMmapCap,
    RegionCapId.TYPE: TypeCap,
    RegionCapId.MSIX_MAPPABLE: CapHeader,
}


def _cap_length(payload: bytes, start: int) -> int:
    head = CapHeader.parse(payload[start : start + CapHeader.SIZE])
    if head.id == RegionCapId.SPARSE_MMAP:
        _id, _version, _next, nr_areas, _reserved = SPARSE_MMAP_PREFIX.unpack_from(payload, start)
        return SparseMmapCap.SIZE + int(nr_areas) * SparseMmapArea.SIZE
    if head.id == RegionCapId.TYPE:
        return TypeCap.SIZE
    return CapHeader.SIZE


def region_caps(info: RegionInfo) -> list[RegionCap]:
    """Walk a region-info reply's capability chain, checking every offset against its size."""
    if not info.cap_offset:
        return []
    payload = info.build()
    caps: list[RegionCap] = []
    offset = info.cap_offset
    seen: set[int] = set()
    while offset:
        if offset < RegionInfo.SIZE or offset in seen or offset + 8 > len(payload):
            raise ProtocolError(f"region capability offset {offset} is outside the reply")
        seen.add(offset)
        end = offset + _cap_length(payload, offset)
        if end > len(payload):
            raise ProtocolError(f"region capability at {offset} runs past the reply")
        head = CapHeader.parse(payload[offset : offset + 8])
        cap_layout = _REGION_CAP_LAYOUTS.get(head.id, CapHeader)
        caps.append(cap_layout.parse(payload[offset:end]))
        offset = head.next
    return caps


def region_caps_bytes(caps: list[RegionCap]) -> bytes:
    """Lay out a capability chain to follow a 32-byte RegionInfo, linking `next` offsets."""
    out = bytearray()
    position = RegionInfo.SIZE
    for index, cap in enumerate(caps):
        position += len(cap.build())
        following = position if index + 1 < len(caps) else 0
        out += dataclasses.replace(cap, next=following).build()
    return bytes(out)


def _write_one_codec() -> struct.Struct:
    codec = WriteOne.CODEC
    if codec is None:
        raise RuntimeError("WriteOne must be fixed-size")
    return codec


_WRITE_ONE = _write_one_codec()
_WRITE_COUNT = joined_codec(WriteMultiReply)
SPARSE_MMAP_PREFIX = prefix_codec(SparseMmapCap)
"""The fixed fields of a sparse-mmap capability, its area count among them."""


def parse_write_multi(payload: bytes) -> list[WriteOne]:
    """REGION_WRITE_MULTI's entries, through WriteOne's struct codec: the same result
    as `WriteMulti.parse`, without construct's per-entry cost (QEMU sends 200)."""
    head = WriteMultiReply.SIZE
    if len(payload) < head:
        raise ProtocolError("REGION_WRITE_MULTI is shorter than its count")
    (count,) = _WRITE_COUNT.unpack_from(payload)
    if len(payload) != head + count * _WRITE_ONE.size:
        raise ProtocolError(f"REGION_WRITE_MULTI of {len(payload)} bytes for {count} writes")
    return [WriteOne(*values) for values in _WRITE_ONE.iter_unpack(payload[head:])]


def build_write_multi(writes: Sequence[WriteOne]) -> bytes:
    """The payload `WriteMulti(len(writes), writes).build()` gives, built faster."""
    return _WRITE_COUNT.pack(len(writes)) + b"".join(
        _WRITE_ONE.pack(*write.VALUES(write)) for write in writes
    )


def io_fd_entries(reply: IoFdsReply) -> list[IoEventFdEntry]:
    """The sub-region entries of an IO_FDS reply (none when its argsz fell short)."""
    if not reply.entries:
        return []
    if len(reply.entries) != reply.count * IoEventFdEntry.SIZE:
        raise ProtocolError(f"{len(reply.entries)} entry bytes for {reply.count} entries")
    size = IoEventFdEntry.SIZE
    return [
        IoEventFdEntry.parse(reply.entries[start : start + size])
        for start in range(0, len(reply.entries), size)
    ]


FEATURE_DATA: dict[Feature, type[Layout]] = {
    Feature.MIGRATION: MigrationFeature,
    Feature.MIG_DEVICE_STATE: MigDeviceState,
    Feature.DMA_LOGGING_START: DmaLoggingStart,
    Feature.DMA_LOGGING_REPORT: DmaLoggingReport,
}
"""The layout of DEVICE_FEATURE `data` per feature index (STOP carries none)."""
