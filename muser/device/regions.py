"""What a device exposes to the guest and who handles the accesses: BARs, and
ranges of config space that device code serves itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

ReadHandler = Callable[[int, int], bytes | Awaitable[bytes]]
"""`read(offset, count)` returns exactly `count` bytes; may be `async def`."""
WriteHandler = Callable[[int, bytes], Awaitable[None] | None]
"""`write(offset, data)`; may be `async def`."""

MIN_MEMORY_BAR = 16
MIN_IO_BAR = 4
MAX_IO_BAR = 256
MAX_32BIT_BAR = 1 << 31


@dataclass(frozen=True)
class Bar:
    """One BAR of a PCI device. A region with a read handler is readable, one with a
    write handler writable. Sizes follow PCI's rules and are checked here, so a
    device that declares an impossible BAR fails when it is built, not in a guest."""

    size: int
    read: ReadHandler | None = None
    write: WriteHandler | None = None
    io: bool = False
    is_64bit: bool = False
    prefetchable: bool = False

    def __post_init__(self) -> None:
        size = self.size
        if size <= 0 or size & (size - 1):
            raise ValueError(f"BAR size {size:#x} is not a power of two")
        if self.io:
            if self.is_64bit or self.prefetchable:
                raise ValueError("an I/O BAR is neither 64-bit nor prefetchable")
            if not MIN_IO_BAR <= size <= MAX_IO_BAR:
                raise ValueError(f"I/O BAR size must be {MIN_IO_BAR}…{MAX_IO_BAR} bytes")
        elif size < MIN_MEMORY_BAR:
            raise ValueError(f"memory BAR size must be at least {MIN_MEMORY_BAR} bytes")
        elif not self.is_64bit and size > MAX_32BIT_BAR:
            raise ValueError("a 32-bit memory BAR is at most 2 GiB; declare is_64bit=True")

    @property
    def type_bits(self) -> int:
        """The read-only low bits of the BAR register."""
        if self.io:
            return 0x1
        return (0x4 if self.is_64bit else 0) | (0x8 if self.prefetchable else 0)

    @property
    def address_mask(self) -> int:
        """The bits of the (64-bit, for a 64-bit BAR) register that software may write."""
        width = 0xFFFFFFFFFFFFFFFF if self.is_64bit else 0xFFFFFFFF
        low_bits = 0x3 if self.io else 0xF
        return ~(self.size - 1) & width & ~low_bits


@dataclass(frozen=True)
class ConfigRegisters:
    """A range of config space the device serves with its own handlers (device-specific
    registers). Offsets passed to the handlers are relative to `offset`. The range
    may not overlap the 64-byte header or a capability."""

    offset: int
    size: int
    read: ReadHandler
    write: WriteHandler

    def __post_init__(self) -> None:
        if self.size <= 0 or self.offset < 0:
            raise ValueError("config registers need a positive size and offset")

    @property
    def span(self) -> range:
        return range(self.offset, self.offset + self.size)
