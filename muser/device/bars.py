"""Where an access to a BAR goes: muser's MSI-X table or PBA, the shared memory a
client may map, a doorbell, or the BAR's own handlers."""

from __future__ import annotations

import errno
import functools
from collections.abc import Awaitable, Callable, Mapping
from enum import Enum

from muser.device.access import await_in_order, joined, split_access
from muser.device.irq import Interrupts
from muser.device.regions import Bar
from muser.device.shared import SharedBar
from muser.errors import VfioUserError
from muser.pci.capabilities import MsiX

Reader = Callable[[int, int], bytes | Awaitable[bytes]]
"""Reads a region: (offset, count) -> the bytes, or an awaitable of them."""
Writer = Callable[[int, bytes], Awaitable[None] | None]
"""Writes a region: (offset, data) -> None, or an awaitable."""


class RangeKind(Enum):
    """A range of a BAR that muser serves itself rather than the BAR's handlers."""

    MSIX_TABLE = "MSI-X table"
    MSIX_PBA = "MSI-X PBA"
    SHARED = "shared memory"


Ranges = list[tuple[range, RangeKind]]


class BarRouter:
    """The ranges each BAR's accesses are split at, checked once when the device is
    built: the MSI-X table and PBA stay out of mappable areas, doorbells too."""

    def __init__(
        self,
        bars: Mapping[int, Bar],
        shared: Mapping[int, SharedBar],
        irqs: Interrupts,
        msix: MsiX | None,
    ) -> None:
        self._bars = bars
        self._shared = shared
        self._irqs = irqs
        self.ranges = _ranges(bars, msix)
        """Per BAR that has any, the ranges muser serves, sorted."""

    def emulates(self, index: int) -> bool:
        """Whether muser serves part of BAR `index` itself (it is then readable and
        writable, whatever the BAR's handlers)."""
        return index in self.ranges

    def reader(self, index: int) -> Reader:
        """What reads BAR `index`, decided once: the BAR's own handler where muser
        serves nothing in it, so that a guest's MMIO read costs one call."""
        ranges = self.ranges.get(index)
        if ranges:
            return functools.partial(self._read_split, index, ranges)
        bar = self._bars.get(index)
        if bar is not None and bar.read is not None:
            return bar.read
        return functools.partial(self._read_bar, index)

    def writer(self, index: int) -> Writer:
        """What writes BAR `index`, decided once: the BAR's own handler where muser
        serves nothing in it and watches for no doorbell, so that a guest's MMIO
        write (a posted one above all) costs one call."""
        bar = self._bars.get(index)
        plain = bar is not None and not bar.doorbells and not self.ranges.get(index)
        if plain and bar is not None and bar.write is not None:
            return bar.write
        return functools.partial(self.write, index)

    def write(self, index: int, offset: int, data: bytes) -> Awaitable[None] | None:
        """A client write to BAR `index`, already checked against its bounds."""
        bar = self._bars[index]
        for doorbell in bar.doorbells:
            if doorbell.matches(offset, data):
                return doorbell.handler(int.from_bytes(data, "little"), 1)
        ranges = self.ranges.get(index)
        if ranges:
            return self._write_split(index, offset, data, ranges)
        return self._write_bar(index, offset, data)

    def _read_bar(self, index: int, offset: int, count: int) -> bytes | Awaitable[bytes]:
        bar = self._bars.get(index)
        if bar is None or bar.read is None:
            raise VfioUserError(errno.EINVAL, f"region {index} is not readable there")
        return bar.read(offset, count)

    def _write_bar(self, index: int, offset: int, data: bytes) -> Awaitable[None] | None:
        bar = self._bars.get(index)
        if bar is None or bar.write is None:
            raise VfioUserError(errno.EINVAL, f"region {index} is not writable there")
        return bar.write(offset, data)

    def _read_split(
        self, index: int, ranges: Ranges, offset: int, count: int
    ) -> bytes | Awaitable[bytes]:
        table = self._irqs.msix_table
        pieces: list[bytes | Awaitable[bytes]] = []
        for start, stop, kind in split_access(offset, count, ranges):
            if kind is RangeKind.SHARED:
                pieces.append(self._shared[index].read(start, stop - start))
            elif kind is RangeKind.MSIX_TABLE:
                assert table is not None
                base = table.capability.table_offset
                pieces.append(table.read(start - base, stop - start))
            elif kind is RangeKind.MSIX_PBA:
                assert table is not None
                base = table.capability.pba_offset
                pieces.append(self._irqs.pba()[start - base : stop - base])
            else:
                pieces.append(self._read_bar(index, start, stop - start))
        return joined(pieces)

    def _write_split(
        self, index: int, offset: int, data: bytes, ranges: Ranges
    ) -> Awaitable[None] | None:
        """Shared memory takes the bytes, MSI-X table writes are emulated (unmasking
        releases pending vectors), PBA writes are ignored as the spec says, the rest
        goes to the BAR's handler."""
        table = self._irqs.msix_table
        pending: list[Awaitable[None]] = []
        for start, stop, kind in split_access(offset, len(data), ranges):
            piece = data[start - offset : stop - offset]
            if kind is RangeKind.SHARED:
                self._shared[index].write(start, piece)
            elif kind is RangeKind.MSIX_TABLE:
                assert table is not None
                unmasked = table.write(start - table.capability.table_offset, piece)
                self._irqs.msix_table_unmasked(unmasked)
            elif kind is None:
                done = self._write_bar(index, start, piece)
                if done is not None:
                    pending.append(done)
        return await_in_order(pending) if pending else None


def _ranges(bars: Mapping[int, Bar], msix: MsiX | None) -> dict[int, Ranges]:
    """Per BAR, the ranges muser serves itself, after checking that they stay apart
    from each other and from doorbells."""
    ranges: dict[int, Ranges] = {}
    if msix is not None:
        ranges.setdefault(msix.table_bar, []).append(
            (range(msix.table_offset, msix.table_offset + msix.table_bytes), RangeKind.MSIX_TABLE)
        )
        ranges.setdefault(msix.pba_bar, []).append(
            (range(msix.pba_offset, msix.pba_offset + msix.pba_bytes), RangeKind.MSIX_PBA)
        )
    for index, bar in bars.items():
        areas = [range(offset, offset + size) for offset, size in bar.mmap_areas]
        for span, kind in ranges.get(index, []):
            if any(span.start < area.stop and area.start < span.stop for area in areas):
                raise ValueError(f"the {kind.value} must stay out of BAR{index}'s mmap areas")
        for doorbell in bar.doorbells:
            if any(area.start <= doorbell.offset < area.stop for area in areas):
                raise ValueError(
                    f"doorbell at {doorbell.offset:#x} lies in an mmap area, "
                    "where writes are not seen"
                )
        ranges.setdefault(index, []).extend((area, RangeKind.SHARED) for area in areas)
    for spans in ranges.values():
        spans.sort(key=lambda item: item[0].start)
    return {index: spans for index, spans in ranges.items() if spans}
