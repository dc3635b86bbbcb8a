"""What a device exposes to the guest and who handles the accesses: BARs (with
shared memory the client may map, and doorbells), and ranges of config space that
device code serves itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum

from muser.pci.config import BAR_IO_SPACE, BAR_MEMORY_64, BAR_PREFETCHABLE
from muser.wire.constants import PAGE_SIZE

ReadHandler = Callable[[int, int], bytes | Awaitable[bytes]]
"""`read(offset, count)` returns exactly `count` bytes; may be `async def`."""
WriteHandler = Callable[[int, bytes], Awaitable[None] | None]
"""`write(offset, data)`; may be `async def`."""

DoorbellHandler = Callable[[int | None, int], Awaitable[None] | None]
"""`handler(value, count)`: the doorbell was rung `count` times (coalesced), with
`value` written; None when an ioeventfd without datamatch rang, which does not say.
May be `async def`."""

MIN_MEMORY_BAR = 16
MIN_IO_BAR = 4
MAX_IO_BAR = 256
MAX_32BIT_BAR = 1 << 31


@dataclass(frozen=True)
class SharedMemory:
    """BAR memory the client may mmap. muser backs the BAR with a memfd it creates,
    or with `fd` (the author's, from `offset`), and offers the client `areas`
    ((offset, size) pairs within the BAR, page-aligned; the whole BAR by default).
    Device code and message accesses use the same memory; writes into the areas
    that the client makes through its mapping are not reported (use doorbells
    outside the areas, or `PciDevice.watch_memory`)."""

    areas: tuple[tuple[int, int], ...] = ()
    fd: int | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        if self.offset < 0 or self.offset % PAGE_SIZE:
            raise ValueError("the shared memory's file offset must be page-aligned")
        for offset, size in self.areas:
            if size <= 0 or offset % PAGE_SIZE or size % PAGE_SIZE:
                raise ValueError(f"mmap area {offset:#x}+{size:#x} is not whole pages")


@dataclass(frozen=True)
class Doorbell:
    """A register whose writes only need to wake the device (an ioeventfd): muser
    calls `handler` for each write of `size` bytes at `offset` (matching `datamatch`,
    if given), whether it arrives through the eventfd DEVICE_GET_REGION_IO_FDS hands
    out, or as a REGION_WRITE (QEMU's client does not use ioeventfds yet)."""

    offset: int
    size: int
    handler: DoorbellHandler
    datamatch: int | None = None

    def __post_init__(self) -> None:
        if self.size not in (1, 2, 4, 8) or self.offset < 0 or self.offset % self.size:
            raise ValueError("a doorbell is 1, 2, 4 or 8 bytes at an aligned offset")
        if self.datamatch is not None and not 0 <= self.datamatch < 1 << (8 * self.size):
            raise ValueError("datamatch does not fit the doorbell's size")

    def matches(self, offset: int, data: bytes) -> bool:
        """Whether a write of `data` at `offset` rings this doorbell."""
        return (
            offset == self.offset
            and len(data) == self.size
            and (self.datamatch is None or int.from_bytes(data, "little") == self.datamatch)
        )


class BarKind(Enum):
    """What a BAR decodes: I/O space, or memory below 4 GiB or anywhere (64-bit, which
    takes the next BAR for its upper half), prefetchable or not."""

    IO = "I/O"
    MEMORY = "32-bit memory"
    MEMORY_64 = "64-bit memory"
    PREFETCHABLE = "32-bit prefetchable memory"
    PREFETCHABLE_64 = "64-bit prefetchable memory"

    @property
    def is_io(self) -> bool:
        return self is BarKind.IO

    @property
    def is_64bit(self) -> bool:
        return self in (BarKind.MEMORY_64, BarKind.PREFETCHABLE_64)

    @property
    def prefetchable(self) -> bool:
        return self in (BarKind.PREFETCHABLE, BarKind.PREFETCHABLE_64)


@dataclass(frozen=True)
class Bar:
    """One BAR of a PCI device. A region with a read handler is readable, one with a
    write handler writable. Sizes follow PCI's rules and are checked here, so a
    device that declares an impossible BAR fails when it is built, not in a guest."""

    size: int
    read: ReadHandler | None = None
    write: WriteHandler | None = None
    kind: BarKind = BarKind.MEMORY
    shared: SharedMemory | None = None
    doorbells: tuple[Doorbell, ...] = field(default=())
    nonstandard: bool = False
    """Skip PCI's size rules (a power of two; an I/O BAR of at most 256 bytes, never
    mapped), for devices modelled on libvfio-user's samples. QEMU refuses such BARs."""

    def __post_init__(self) -> None:
        size = self.size
        if self.nonstandard:
            if size <= 0:
                raise ValueError("a BAR has a size")
        elif size & (size - 1) or size <= 0:
            raise ValueError(f"BAR size {size:#x} is not a power of two")
        kind = self.kind
        if kind.is_io:
            if not MIN_IO_BAR <= size <= MAX_IO_BAR and not self.nonstandard:
                raise ValueError(f"I/O BAR size must be {MIN_IO_BAR}…{MAX_IO_BAR} bytes")
        elif size < MIN_MEMORY_BAR:
            raise ValueError(f"memory BAR size must be at least {MIN_MEMORY_BAR} bytes")
        elif not kind.is_64bit and size > MAX_32BIT_BAR:
            raise ValueError(
                "a 32-bit memory BAR is at most 2 GiB; declare kind=BarKind.MEMORY_64"
            )
        if self.shared is not None:
            if kind.is_io and not self.nonstandard:
                raise ValueError("only memory BARs can be mapped")
            areas = list(self.mmap_areas)
            for (start, length), following in zip(
                areas, [*areas[1:], (self.size, 0)], strict=True
            ):
                if start + length > following[0]:
                    raise ValueError(
                        f"mmap area {start:#x}+{length:#x} overlaps the next one or leaves the BAR"
                    )
        for doorbell in self.doorbells:
            if doorbell.offset + doorbell.size > self.size:
                raise ValueError(f"doorbell at {doorbell.offset:#x} is outside the BAR")

    @property
    def mmap_areas(self) -> tuple[tuple[int, int], ...]:
        """The areas a client may map: as declared, or the whole BAR."""
        if self.shared is None:
            return ()
        return tuple(sorted(self.shared.areas)) or ((0, self.size),)

    @property
    def type_bits(self) -> int:
        """The read-only low bits of the BAR register."""
        kind = self.kind
        if kind.is_io:
            return BAR_IO_SPACE
        return (BAR_MEMORY_64 if kind.is_64bit else 0) | (
            BAR_PREFETCHABLE if kind.prefetchable else 0
        )

    @property
    def address_mask(self) -> int:
        """The bits of the (64-bit, for a 64-bit BAR) register that software may write."""
        width = 0xFFFFFFFFFFFFFFFF if self.kind.is_64bit else 0xFFFFFFFF
        low_bits = 0x3 if self.kind.is_io else 0xF
        decoded = 1 << (self.size - 1).bit_length()
        return ~(decoded - 1) & width & ~low_bits


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
        """The config-space offsets these registers claim."""
        return range(self.offset, self.offset + self.size)
