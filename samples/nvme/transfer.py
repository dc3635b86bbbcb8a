"""Where a command's data lies in guest memory (its PRPs), and moving it: straight
between the backing store and guest memory where the client shares it (zero-copy
views), through a buffer and DMA messages where it does not."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Awaitable, Callable

import muser

from .spec import PAGE_SIZE, NvmeError, Status

Segments = list[tuple[int, int]]
"""(guest address, length) pieces of one transfer, in order."""
Mover = Callable[[list[memoryview]], Awaitable[None]]


def _check_page(entry: int) -> None:
    if entry % PAGE_SIZE:
        raise NvmeError(Status.INVALID_PRP_OFFSET, f"PRP entry {entry:#x} is not page aligned")


async def prp_segments(device: muser.PciDevice, prp1: int, prp2: int, length: int) -> Segments:
    """The pieces PRP1 and PRP2 describe for `length` bytes: PRP1 to the end of its
    page, then PRP2 as a page, or PRP2 as a list of page entries whose last entry
    chains to the next list page when more are needed (NVMe 1.4 §4.3)."""
    first = min(length, PAGE_SIZE - prp1 % PAGE_SIZE)
    segments = [(prp1, first)]
    remaining = length - first
    if not remaining:
        return segments
    if remaining <= PAGE_SIZE:
        _check_page(prp2)
        segments.append((prp2, remaining))
        return _merged(segments)
    if prp2 % 8:
        raise NvmeError(Status.INVALID_PRP_OFFSET, f"PRP list {prp2:#x} is not 8-byte aligned")
    pages = -(-remaining // PAGE_SIZE)
    address = prp2
    while pages:
        room = (PAGE_SIZE - address % PAGE_SIZE) // 8
        take = pages if pages <= room else room - 1
        raw = await device.dma.read(address, 8 * (take + (take < pages)))
        entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
        for entry in entries[:take]:
            _check_page(entry)
            segments.append((entry, min(remaining, PAGE_SIZE)))
            remaining -= PAGE_SIZE
        pages -= take
        if pages:
            address = entries[take]
            _check_page(address)
    return _merged(segments)


def _merged(segments: Segments) -> Segments:
    """Neighbouring pieces joined: fewer views and system calls for the same bytes."""
    merged = [segments[0]]
    for address, length in segments[1:]:
        last_address, last_length = merged[-1]
        if last_address + last_length == address:
            merged[-1] = (last_address, last_length + length)
        else:
            merged.append((address, length))
    return merged


async def to_guest(device: muser.PciDevice, segments: Segments, fill: Mover) -> None:
    """Let `fill` write the data into guest memory: into views of it where the
    client shares it, else into a buffer then sent with DMA_WRITEs."""
    dma = device.dma
    with contextlib.ExitStack() as views:
        try:
            buffers = [views.enter_context(dma.view(a, n, write=True)) for a, n in segments]
        except muser.VfioUserError:
            buffers = []
        if buffers:
            await fill(buffers)
            return
    buffer = bytearray(sum(length for _address, length in segments))
    await fill([memoryview(buffer)])
    position = 0
    for address, length in segments:
        await dma.write(address, memoryview(buffer)[position : position + length])
        position += length


async def from_guest(device: muser.PciDevice, segments: Segments, drain: Mover) -> None:
    """Let `drain` take the data from guest memory: views of it where the client
    shares it, else what DMA_READs bring."""
    dma = device.dma
    with contextlib.ExitStack() as views:
        try:
            buffers = [views.enter_context(dma.view(a, n)) for a, n in segments]
        except muser.VfioUserError:
            buffers = []
        if buffers:
            await drain(buffers)
            return
    pieces = [memoryview(await dma.read(address, length)) for address, length in segments]
    await drain(pieces)
