"""The device model: what a PCI device is, independent of any connection."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Mapping
from enum import Enum
from types import MappingProxyType

from muser.device.bar import Bar
from muser.errors import VfioUserError
from muser.pci.config import ConfigSpace
from muser.wire.constants import PCI_NUM_IRQS, PCI_NUM_REGIONS, PciRegion, RegionFlag

NUM_BARS = 6


class ResetReason(Enum):
    """Why `PciDevice.reset` is called."""

    DEVICE_RESET = "device reset"
    """The client sent DEVICE_RESET (a VM reset); config space is back at power-on."""
    LOST_CONNECTION = "lost connection"
    """The client went away; device state is kept for the next client."""


class PciDevice:
    """A PCI device: identity, BARs and config space. Subclass it, or build one directly.

    The device outlives connections: one client at a time drives it, and when a
    client leaves, registers and config space keep their values.
    """

    num_regions = PCI_NUM_REGIONS
    num_irqs = PCI_NUM_IRQS

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        revision: int = 0,
        class_code: int = 0,
        bars: Mapping[int, Bar] | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or type(self).__name__
        self.bars: Mapping[int, Bar] = MappingProxyType(dict(bars or {}))
        """The BARs by index, fixed once the device is built."""
        for index, bar in self.bars.items():
            if not 0 <= index < NUM_BARS:
                raise ValueError(f"BAR index {index} is not 0…5")
            if bar.is_64bit and (index == NUM_BARS - 1 or index + 1 in self.bars):
                raise ValueError(f"64-bit BAR{index} needs BAR{index + 1} free for its upper half")
        self.config = ConfigSpace(
            vendor_id=vendor_id,
            device_id=device_id,
            subsystem_vendor_id=subsystem_vendor_id,
            subsystem_id=subsystem_id,
            revision=revision,
            class_code=class_code,
            bars=self.bars,
        )
        self._region_sizes = tuple(
            self.region_flags_and_size(index)[1] for index in range(self.num_regions)
        )

    def reset(self, reason: ResetReason) -> Awaitable[None] | None:
        """Override to put the device's own registers back to their power-on state.

        May be `async def`. Called after config space was reset (DEVICE_RESET), or
        when the client's connection is lost.
        """
        return None

    def handle_reset(self, reason: ResetReason) -> Awaitable[None] | None:
        """What muser does on a reset: a DEVICE_RESET puts config space back to its
        power-on values; then the device's own `reset` hook runs."""
        if reason is ResetReason.DEVICE_RESET:
            self.config.reset()
        return self.reset(reason)

    def region_flags_and_size(self, index: int) -> tuple[RegionFlag, int]:
        """What DEVICE_GET_REGION_INFO reports; size 0 means the region does not exist."""
        if index == PciRegion.CONFIG:
            return RegionFlag.READ | RegionFlag.WRITE, self.config.size
        bar = self.bars.get(index)
        if bar is None:
            return RegionFlag(0), 0
        flags = RegionFlag(0)
        if bar.read is not None:
            flags |= RegionFlag.READ
        if bar.write is not None:
            flags |= RegionFlag.WRITE
        return flags, bar.size

    def region_size(self, index: int) -> int:
        """The size of region `index` (< num_regions), 0 if it does not exist."""
        return self._region_sizes[index]

    def read_region(self, index: int, offset: int, count: int) -> bytes | Awaitable[bytes]:
        """A client read, already checked against the region's bounds."""
        if index == PciRegion.CONFIG:
            return self.config.read(offset, count)
        bar = self.bars.get(index)
        if bar is None or bar.read is None:
            raise VfioUserError(errno.EINVAL, f"region {index} is not readable")
        return bar.read(offset, count)

    def write_region(self, index: int, offset: int, data: bytes) -> Awaitable[None] | None:
        """A client write, already checked against the region's bounds."""
        if index == PciRegion.CONFIG:
            self.config.write(offset, data)
            return None
        bar = self.bars.get(index)
        if bar is None or bar.write is None:
            raise VfioUserError(errno.EINVAL, f"region {index} is not writable")
        return bar.write(offset, data)
