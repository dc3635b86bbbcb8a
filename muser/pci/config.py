"""A type-0 PCI configuration space with per-bit access masks (protocol.md §6.2, §6.3).

Every byte has a write mask (bits software may set) and a write-1-to-clear mask,
so accesses of any size at any offset behave as hardware does: writes to read-only
bits are ignored without error, and BAR sizing falls out of the masks.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from enum import IntEnum, IntFlag
from typing import TYPE_CHECKING

from muser.errors import VfioUserError

if TYPE_CHECKING:
    from muser.device.bar import Bar

CONFIG_SPACE_SIZE = 256


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


class Command(IntFlag):
    """Command register bits."""

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
    Command.MEMORY_SPACE
    | Command.BUS_MASTER
    | Command.PARITY_ERROR_RESPONSE
    | Command.SERR
    | Command.INTX_DISABLE
)


class ConfigSpace:
    """The 256 bytes the guest sees at region 7, with their access rules."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        subsystem_vendor_id: int,
        subsystem_id: int,
        revision: int,
        class_code: int,
        bars: Mapping[int, Bar],
    ) -> None:
        self._data = bytearray(CONFIG_SPACE_SIZE)
        self._writable = bytearray(CONFIG_SPACE_SIZE)
        self._write_clears = bytearray(CONFIG_SPACE_SIZE)
        self._set(Reg.VENDOR_ID, 2, vendor_id)
        self._set(Reg.DEVICE_ID, 2, device_id)
        self._set(Reg.REVISION_ID, 1, revision)
        self._set(Reg.CLASS_CODE, 3, class_code)
        self._set(Reg.SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._set(Reg.SUBSYSTEM_ID, 2, subsystem_id)
        command_writable = _COMMAND_WRITABLE
        if any(bar.io for bar in bars.values()):
            command_writable |= Command.IO_SPACE
        self._set_mask(self._writable, Reg.COMMAND, 2, command_writable)
        self._set_mask(self._write_clears, Reg.STATUS, 2, STATUS_WRITE_1_TO_CLEAR)
        self._set_mask(self._writable, Reg.CACHE_LINE_SIZE, 1, 0xFF)
        self._set_mask(self._writable, Reg.LATENCY_TIMER, 1, 0xFF)
        self._set_mask(self._writable, Reg.INTERRUPT_LINE, 1, 0xFF)
        for index, bar in bars.items():
            register = Reg.BAR0 + 4 * index
            self._set(register, 4, bar.type_bits)
            self._set_mask(self._writable, register, 4, bar.address_mask & 0xFFFFFFFF)
            if bar.is_64bit:
                self._set_mask(self._writable, register + 4, 4, bar.address_mask >> 32)
        self._power_on = bytes(self._data)

    def _set(self, offset: int, size: int, value: int) -> None:
        self._data[offset : offset + size] = value.to_bytes(size, "little")

    @staticmethod
    def _set_mask(mask: bytearray, offset: int, size: int, value: int) -> None:
        mask[offset : offset + size] = value.to_bytes(size, "little")

    @property
    def size(self) -> int:
        return CONFIG_SPACE_SIZE

    def register(self, offset: int, size: int) -> int:
        """A register's current value, as device code reads it (e.g. a programmed BAR)."""
        return int.from_bytes(self._data[offset : offset + size], "little")

    def read(self, offset: int, count: int) -> bytes:
        self._check(offset, count)
        return bytes(self._data[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        """Apply a guest write: writable bits take the new value, write-1-to-clear bits
        clear where a 1 is written, everything else keeps its value."""
        self._check(offset, len(data))
        for position, value in enumerate(data, offset):
            writable = self._writable[position]
            clears = self._write_clears[position]
            if not writable | clears:
                continue
            old = self._data[position]
            self._data[position] = ((old & ~writable) | (value & writable)) & ~(value & clears)

    def reset(self) -> None:
        """Back to power-on values (DEVICE_RESET)."""
        self._data[:] = self._power_on

    def _check(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > CONFIG_SPACE_SIZE:
            raise VfioUserError(errno.EINVAL, "access outside config space")
