"""A type-0 PCI configuration space with per-bit access rules (protocol.md §6).

Every byte has a write mask (bits software may set) and a write-1-to-clear mask,
so accesses of any size at any offset behave as hardware does: writes to
read-only bits are ignored without error, and BAR sizing falls out of the masks.
Capabilities are placed and chained here; rules that masks can't express
(MSI's Multiple Message Enable, PM power states, FLR) are each capability's
`after_write`.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator, Mapping, Sequence
from enum import IntEnum, IntFlag
from typing import Protocol

from muser.errors import VfioUserError
from muser.pci.capabilities import Capability, ExtendedCapability, Image, PciExpress

BAR_IO_SPACE = 0x1
"""Bit 0 of a BAR register: it decodes I/O space, not memory."""
BAR_MEMORY_TYPE_MASK = 0x6
BAR_MEMORY_64 = 0x4
"""Bits 2:1 of a memory BAR: 10b, it spans two registers (64-bit)."""
BAR_PREFETCHABLE = 0x8


class BarRegister(Protocol):
    """What config space needs of a BAR (`muser.Bar` is one): the bits its register
    reads as, and which address bits the guest may write."""

    @property
    def type_bits(self) -> int: ...

    @property
    def address_mask(self) -> int: ...


CONFIG_SPACE_SIZE = 256
PCIE_CONFIG_SPACE_SIZE = 4096
HEADER_SIZE = 0x40
FIRST_EXTENDED_CAPABILITY = 0x100
MIN_ROM_SIZE = 2048
ROM_ENABLE = 0x1
ROM_ADDRESS_MASK = 0xFFFFF800


class Reg(IntEnum):
    """Offsets of the type-0 header registers."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION_ID = 0x08
    CLASS_CODE = 0x09
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BIST = 0x0F
    BAR0 = 0x10
    CARDBUS_CIS = 0x28
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    ROM_ADDRESS = 0x30
    CAPABILITIES_POINTER = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D
    MIN_GNT = 0x3E
    MAX_LAT = 0x3F


class CommandRegister(IntFlag):
    """The bits of the Command register (not to be confused with vfio-user's
    `muser.wire.constants.Command`, the message commands)."""

    IO_SPACE = 0x0001
    MEMORY_SPACE = 0x0002
    BUS_MASTER = 0x0004
    SPECIAL_CYCLES = 0x0008
    MEMORY_WRITE_INVALIDATE = 0x0010
    VGA_PALETTE_SNOOP = 0x0020
    PARITY_ERROR_RESPONSE = 0x0040
    SERR = 0x0100
    FAST_BACK_TO_BACK = 0x0200
    INTX_DISABLE = 0x0400


class Status(IntFlag):
    """Status register bits."""

    INTERRUPT = 0x0008
    CAPABILITIES_LIST = 0x0010
    MASTER_DATA_PARITY_ERROR = 0x0100
    SIGNALED_TARGET_ABORT = 0x0800
    RECEIVED_TARGET_ABORT = 0x1000
    RECEIVED_MASTER_ABORT = 0x2000
    SIGNALED_SYSTEM_ERROR = 0x4000
    DETECTED_PARITY_ERROR = 0x8000


STATUS_WRITE_1_TO_CLEAR = (
    Status.MASTER_DATA_PARITY_ERROR
    | Status.SIGNALED_TARGET_ABORT
    | Status.RECEIVED_TARGET_ABORT
    | Status.RECEIVED_MASTER_ABORT
    | Status.SIGNALED_SYSTEM_ERROR
    | Status.DETECTED_PARITY_ERROR
)

_COMMAND_WRITABLE = (
    CommandRegister.MEMORY_SPACE
    | CommandRegister.BUS_MASTER
    | CommandRegister.PARITY_ERROR_RESPONSE
    | CommandRegister.SERR
    | CommandRegister.INTX_DISABLE
)

AnyCapability = Capability | ExtendedCapability


def rom_size_for(length: int) -> int:
    """The ROM BAR size for a ROM image: a power of two, at least 2 KiB."""
    return max(MIN_ROM_SIZE, 1 << (length - 1).bit_length())


def _place(
    items: Sequence[AnyCapability], start: int, end: int, reserved: list[range], what: str
) -> list[int]:
    """Offsets for `items`: pinned ones where asked, the rest each after the previous
    one, dword aligned, never overlapping each other or `reserved`."""
    taken = list(reserved)
    offsets: list[int | None] = [None] * len(items)

    def claim(position: int, size: int, name: str) -> None:
        span = range(position, position + size)
        if position % 4 or position < start or span.stop > end:
            raise ValueError(f"{name} at {position:#x} is not a dword in {start:#x}…{end:#x}")
        if any(span.start < other.stop and other.start < span.stop for other in taken):
            raise ValueError(f"{name} at {position:#x} overlaps another structure")
        taken.append(span)

    for index, item in enumerate(items):
        if item.offset is not None:
            claim(item.offset, item.size, type(item).__name__)
            offsets[index] = item.offset
    cursor = start
    for index, item in enumerate(items):
        if item.offset is not None:
            cursor = item.offset + item.size
            continue
        position = -(-cursor // 4) * 4
        while True:
            span = range(position, position + item.size)
            if span.stop > end:
                raise ValueError(f"no room for {type(item).__name__} in the {what} space")
            if not any(span.start < other.stop and other.start < span.stop for other in taken):
                break
            position += 4
        claim(position, item.size, type(item).__name__)
        offsets[index] = position
        cursor = span.stop
    return [offset for offset in offsets if offset is not None]


class ConfigSpace:
    """The bytes the guest sees at region 7, with their access rules."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        subsystem_vendor_id: int,
        subsystem_id: int,
        revision: int,
        class_code: int,
        bars: Mapping[int, BarRegister],
        rom_size: int,
        interrupt_pin: int,
        capabilities: Sequence[Capability],
        extended_capabilities: Sequence[ExtendedCapability],
        reserved: Sequence[range] = (),
    ) -> None:
        pcie = any(isinstance(capability, PciExpress) for capability in capabilities)
        if extended_capabilities and not pcie:
            raise ValueError("extended capabilities need a PciExpress capability")
        self.size = PCIE_CONFIG_SPACE_SIZE if pcie else CONFIG_SPACE_SIZE
        self._listeners: list[Callable[[], None]] = []
        self._data = bytearray(self.size)
        self._writable = bytearray(self.size)
        self._write_clears = bytearray(self.size)
        self._set(Reg.VENDOR_ID, 2, vendor_id)
        self._set(Reg.DEVICE_ID, 2, device_id)
        self._set(Reg.REVISION_ID, 1, revision)
        self._set(Reg.CLASS_CODE, 3, class_code)
        self._set(Reg.SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._set(Reg.SUBSYSTEM_ID, 2, subsystem_id)
        self._set(Reg.INTERRUPT_PIN, 1, interrupt_pin)
        command_writable = _COMMAND_WRITABLE
        if any(bar.type_bits & BAR_IO_SPACE for bar in bars.values()):
            command_writable |= CommandRegister.IO_SPACE
        self._set(Reg.COMMAND, 2, 0, writable=command_writable)
        self._set(Reg.STATUS, 2, 0, write_clears=STATUS_WRITE_1_TO_CLEAR)
        self._set(Reg.CACHE_LINE_SIZE, 1, 0, writable=0xFF)
        self._set(Reg.LATENCY_TIMER, 1, 0, writable=0 if pcie else 0xFF)
        self._set(Reg.INTERRUPT_LINE, 1, 0, writable=0xFF)
        for index, bar in bars.items():
            register = Reg.BAR0 + 4 * index
            self._set(register, 4, bar.type_bits, writable=bar.address_mask & 0xFFFFFFFF)
            if bar.type_bits & (BAR_IO_SPACE | BAR_MEMORY_TYPE_MASK) == BAR_MEMORY_64:
                self._set(register + 4, 4, 0, writable=bar.address_mask >> 32)
        if rom_size:
            self._set(
                Reg.ROM_ADDRESS, 4, 0, writable=(~(rom_size - 1) & ROM_ADDRESS_MASK) | ROM_ENABLE
            )
        self._placed: list[tuple[AnyCapability, int]] = []
        self._chain(capabilities, extended_capabilities, list(reserved))
        self._power_on = bytes(self._data)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every change of the bytes once built (a guest write,
        a device-side register, a reset), so that a decision drawn from them and
        kept for speed, as interrupt delivery keeps one, can be forgotten."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def _set(
        self, offset: int, size: int, value: int, *, writable: int = 0, write_clears: int = 0
    ) -> None:
        end = offset + size
        self._data[offset:end] = value.to_bytes(size, "little")
        self._writable[offset:end] = writable.to_bytes(size, "little")
        self._write_clears[offset:end] = write_clears.to_bytes(size, "little")

    def _install(self, image: Image, offset: int) -> None:
        end = offset + len(image.data)
        self._data[offset:end] = image.data
        self._writable[offset:end] = image.writable
        self._write_clears[offset:end] = image.write_clears

    def _chain(
        self,
        capabilities: Sequence[Capability],
        extended: Sequence[ExtendedCapability],
        reserved: list[range],
    ) -> None:
        offsets = _place(capabilities, HEADER_SIZE, CONFIG_SPACE_SIZE, reserved, "standard")
        for index, (capability, offset) in enumerate(zip(capabilities, offsets, strict=True)):
            self._install(capability.image(), offset)
            following = offsets[index + 1] if index + 1 < len(offsets) else 0
            self._data[offset + 1] = following
            self._placed.append((capability, offset))
        if offsets:
            self._data[Reg.CAPABILITIES_POINTER] = offsets[0]
            self._data[Reg.STATUS] |= Status.CAPABILITIES_LIST
        ext_offsets = _place(extended, FIRST_EXTENDED_CAPABILITY, self.size, reserved, "extended")
        if ext_offsets and ext_offsets[0] != FIRST_EXTENDED_CAPABILITY:
            raise ValueError("the first extended capability must sit at 0x100")
        for index, (extended_capability, offset) in enumerate(
            zip(extended, ext_offsets, strict=True)
        ):
            self._install(extended_capability.image(), offset)
            following = ext_offsets[index + 1] if index + 1 < len(ext_offsets) else 0
            self.set_register(offset, 4, extended_capability.header() | following << 20)
            self._placed.append((extended_capability, offset))

    @property
    def capabilities(self) -> list[tuple[AnyCapability, int]]:
        """Every placed capability with its offset, standard ones first, in chain order."""
        return list(self._placed)

    def offset_of(self, capability: AnyCapability) -> int:
        """The config-space offset where `capability` (the object the device was
        declared with) was placed: add a register's offset within it to read that
        register with `register`. KeyError if it is not this device's."""
        for placed, offset in self._placed:
            if placed is capability:
                return offset
        raise KeyError(f"{capability!r} is not part of this config space")

    def register(self, offset: int, size: int) -> int:
        """A register's current value as an int (little-endian, `size` bytes), as
        device code reads it: a programmed BAR, MSI-X's Message Control."""
        return int.from_bytes(self._data[offset : offset + size], "little")

    def set_register(self, offset: int, size: int, value: int) -> None:
        """Set a register from the device side, whatever its guest access rules
        (e.g. a status bit the device raises)."""
        self._data[offset : offset + size] = value.to_bytes(size, "little")
        self._changed()

    def read(self, offset: int, count: int) -> bytes:
        self.check(offset, count)
        return bytes(self._data[offset : offset + count])

    def write(self, offset: int, data: bytes) -> bool:
        """Apply a guest write: writable bits take the new value, write-1-to-clear bits
        clear where a 1 is written, everything else keeps its value. Returns whether
        the write asked for a function-level reset."""
        self.check(offset, len(data))
        touched = [
            (capability, base, self.read(base, capability.size))
            for capability, base in self._overlapping(offset, len(data))
        ]
        for position, value in enumerate(data, offset):
            writable = self._writable[position]
            clears = self._write_clears[position]
            if writable | clears:
                old = self._data[position]
                self._data[position] = ((old & ~writable) | (value & writable)) & ~(value & clears)
        reset = False
        try:
            for capability, base, before in touched:
                if isinstance(capability, Capability):
                    reset |= capability.after_write(self, base, before, offset, data)
        finally:
            self._changed()  # the bytes changed even if a capability's rule failed
        return reset

    def _overlapping(self, offset: int, count: int) -> Iterator[tuple[AnyCapability, int]]:
        for capability, base in self._placed:
            if offset < base + capability.size and base < offset + count:
                yield capability, base

    def reset(self) -> None:
        """Back to power-on values (DEVICE_RESET, FLR)."""
        self._data[:] = self._power_on
        self._changed()

    def check(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise VfioUserError(errno.EINVAL, "access outside config space")
