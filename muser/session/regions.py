"""Commands about the device's regions: what they are (DEVICE_GET_INFO,
GET_REGION_INFO, GET_REGION_IO_FDS) and the guest's accesses to them (REGION_READ,
REGION_WRITE, REGION_WRITE_MULTI, and DEVICE_RESET).

An access's check and its reply's packing are here; the hot path
(`ServerSession.receive`) writes the plain case out inline, and answers the rest
with `read_outcome`/`write_outcome`."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Sequence

from muser.device import ResetReason
from muser.errors import ProtocolError
from muser.session.context import Context
from muser.session.outcome import Outcome, Packed, Reply
from muser.wire import Frame
from muser.wire.constants import (
    FLAGS_REPLY,
    Command,
    DeviceFlag,
    IoEventFdFlag,
    IoFdType,
    RegionCapId,
    RegionFlag,
)
from muser.wire.messages import (
    ACCESS_MESSAGE,
    DeviceInfo,
    Empty,
    IoEventFdEntry,
    IoFdsReply,
    IoFdsRequest,
    RegionAccess,
    RegionData,
    RegionInfo,
    SparseMmapArea,
    SparseMmapCap,
    WriteMultiReply,
    WriteOne,
    region_caps_bytes,
)

ACCESS_SIZE = ACCESS_MESSAGE.size
"""A REGION_READ message, a REGION_WRITE reply, and the head of the others."""
_pack_access = ACCESS_MESSAGE.pack
_REGION_READ, _REGION_WRITE = int(Command.REGION_READ), int(Command.REGION_WRITE)


# An access, checked and answered: the general path and the hot path alike


def access_refusal(
    sizes: Sequence[int], max_count: int, region: int, offset: int, count: int
) -> str | None:
    """Why an access may not be served, or None if it may."""
    if region >= len(sizes):
        return f"region {region} does not exist"
    if count > max_count:
        return f"access of {count} bytes exceeds max_data_xfer_size"
    if offset + count > sizes[region]:
        return f"access {offset:#x}+{count} is outside region {region}"
    return None


def read_reply(msg_id: int, offset: int, region: int, count: int, data: bytes) -> bytes:
    """A whole REGION_READ reply of `data`."""
    return (
        _pack_access(
            msg_id, _REGION_READ, ACCESS_SIZE + count, FLAGS_REPLY, 0, offset, region, count
        )
        + data
    )


def write_reply(msg_id: int, offset: int, region: int, count: int) -> bytes:
    """A whole REGION_WRITE reply."""
    return _pack_access(msg_id, _REGION_WRITE, ACCESS_SIZE, FLAGS_REPLY, 0, offset, region, count)


def read_outcome(
    msg_id: int, offset: int, region: int, count: int, data: bytes | Awaitable[bytes]
) -> Outcome | Awaitable[Outcome]:
    """What a read handler returned, as the reply: awaited first if it must be, and
    checked to be `count` bytes."""
    if inspect.isawaitable(data):
        return _read_later(msg_id, offset, region, count, data)
    if len(data) != count:
        raise RuntimeError(
            f"region {region} read handler returned {len(data)} bytes for a {count}-byte read"
        )
    return Packed(read_reply(msg_id, offset, region, count, bytes(data)))


async def _read_later(
    msg_id: int, offset: int, region: int, count: int, data: Awaitable[bytes]
) -> Outcome:
    outcome = read_outcome(msg_id, offset, region, count, await data)
    assert not inspect.isawaitable(outcome)
    return outcome


def write_outcome(
    msg_id: int, offset: int, region: int, count: int, done: Awaitable[None] | None
) -> Outcome | Awaitable[Outcome]:
    """What a write handler returned, as the reply: once it is done."""
    reply = Packed(write_reply(msg_id, offset, region, count))
    return reply if done is None else after(done, reply)


async def after(done: Awaitable[None], outcome: Outcome) -> Outcome:
    await done
    return outcome


def check_access(context: Context, region: int, offset: int, count: int) -> None:
    refusal = access_refusal(
        context.device.region_sizes, context.max_data_xfer_size, region, offset, count
    )
    if refusal is not None:
        raise ProtocolError(refusal)


# The handlers


def region_read(
    context: Context, request: RegionAccess, frame: Frame
) -> Outcome | Awaitable[Outcome]:
    offset, region, count = request.offset, request.region, request.count
    check_access(context, region, offset, count)
    if not count:
        return Packed(read_reply(frame.msg_id, offset, region, 0, b""))
    data = context.readers[region](offset, count)
    return read_outcome(frame.msg_id, offset, region, count, data)


def region_write(
    context: Context, request: RegionData, frame: Frame
) -> Outcome | Awaitable[Outcome]:
    offset, region, count = request.offset, request.region, request.count
    if len(request.data) != count:
        raise ProtocolError(f"REGION_WRITE count {count} but {len(request.data)} data bytes")
    check_access(context, region, offset, count)
    if not count:
        return Packed(write_reply(frame.msg_id, offset, region, 0))
    done = context.writers[region](offset, request.data)
    return write_outcome(frame.msg_id, offset, region, count, done)


def region_write_multi(
    context: Context, writes: list[WriteOne], frame: Frame
) -> Outcome | Awaitable[Outcome]:
    """Each write in order, as if it were a REGION_WRITE; QEMU always posts these."""
    for write in writes:
        if not 1 <= write.count <= len(write.data):
            raise ProtocolError(f"REGION_WRITE_MULTI entry of {write.count} bytes")
        check_access(context, write.region, write.offset, write.count)
    reply = WriteMultiReply(len(writes))
    for position, write in enumerate(writes):
        done = context.writers[write.region](write.offset, write.data[: write.count])
        if done is not None:
            return _finish_writes(context, done, writes[position + 1 :], reply)
    return reply


async def _finish_writes(
    context: Context, done: Awaitable[None], rest: Sequence[WriteOne], reply: WriteMultiReply
) -> Outcome:
    await done
    for write in rest:
        pending = context.writers[write.region](write.offset, write.data[: write.count])
        if pending is not None:
            await pending
    return reply


def device_info(context: Context, request: DeviceInfo, frame: Frame) -> Outcome:
    if request.argsz < DeviceInfo.SIZE:
        raise ProtocolError(f"DEVICE_GET_INFO argsz {request.argsz} < {DeviceInfo.SIZE}")
    device = context.device
    return DeviceInfo(
        DeviceInfo.SIZE, DeviceFlag.PCI | DeviceFlag.RESET, device.num_regions, device.num_irqs
    )


def region_info(context: Context, request: RegionInfo, frame: Frame) -> Outcome:
    device = context.device
    if request.argsz < RegionInfo.SIZE:
        raise ProtocolError(f"GET_REGION_INFO argsz {request.argsz} is too small")
    if request.index >= device.num_regions:
        raise ProtocolError(f"region {request.index} does not exist")
    flags, size = device.region_flags_and_size(request.index)
    shared = device.shared.get(request.index)
    if shared is None:
        return RegionInfo(RegionInfo.SIZE, flags, request.index, 0, size, 0, b"")
    areas = tuple(SparseMmapArea(offset, length) for offset, length in shared.areas)
    sparse = SparseMmapCap(RegionCapId.SPARSE_MMAP, 1, 0, len(areas), 0, areas)
    caps = region_caps_bytes([sparse])
    needed = RegionInfo.SIZE + len(caps)
    flags |= RegionFlag.MMAP
    if request.argsz < needed:
        # Too small for the capability chain: say how much is needed, send no fd,
        # and the client asks again (protocol.md §3.5).
        return RegionInfo(needed, flags, request.index, 0, size, shared.offset, b"")
    info = RegionInfo(
        needed, flags | RegionFlag.CAPS, request.index, RegionInfo.SIZE, size, shared.offset, caps
    )
    return Reply(info, (shared.fd,))


def region_io_fds(context: Context, request: IoFdsRequest, frame: Frame) -> Outcome:
    device = context.device
    if request.flags or request.count:
        raise ProtocolError("GET_REGION_IO_FDS takes no flags and no count")
    if request.argsz < IoFdsRequest.SIZE:
        raise ProtocolError(f"GET_REGION_IO_FDS argsz {request.argsz} is too small")
    if request.index >= device.num_regions or not device.region_size(request.index):
        raise ProtocolError(f"region {request.index} does not exist")
    doorbells = device.doorbells.by_region.get(request.index, [])
    bar = device.bars[request.index] if doorbells else None
    pio = IoEventFdFlag.PIO if bar is not None and bar.kind.is_io else 0
    entries = b"".join(
        IoEventFdEntry(
            doorbell.offset,
            doorbell.size,
            fd_index,
            IoFdType.IOEVENTFD,
            pio | (IoEventFdFlag.DATAMATCH if doorbell.datamatch is not None else 0),
            0,
            0,
            doorbell.datamatch or 0,
        ).build()
        for fd_index, (doorbell, _fd) in enumerate(doorbells)
    )
    needed = IoFdsRequest.SIZE + len(entries)
    if request.argsz < needed:
        return IoFdsReply(needed, 0, request.index, len(doorbells), b"")
    reply = IoFdsReply(needed, 0, request.index, len(doorbells), entries)
    return Reply(reply, [fd for _doorbell, fd in doorbells])


def device_reset(context: Context, request: Empty, frame: Frame) -> Outcome | Awaitable[Outcome]:
    context.log("info", "device reset")
    done = context.device.handle_reset(ResetReason.DEVICE_RESET)
    return None if done is None else after(done, None)
