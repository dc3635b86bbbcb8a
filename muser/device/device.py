"""The device model: what a PCI device is, independent of any connection."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from muser.device.access import await_in_order, joined, split_access
from muser.device.bars import BarRouter
from muser.device.bars import Reader as RegionReader
from muser.device.bars import Writer as RegionWriter
from muser.device.dma import DmaLayout, DmaSpace
from muser.device.irq import Interrupts
from muser.device.migration import Migration, MigrationController
from muser.device.regions import Bar, ConfigRegisters
from muser.device.shared import DoorbellFds, SharedBar
from muser.pci.capabilities import Capability, ExtendedCapability, Msi, MsiX
from muser.pci.config import HEADER_SIZE, ConfigSpace, Reg, rom_size_for
from muser.wire.constants import (
    NUM_BARS,
    PCI_NUM_IRQS,
    PCI_NUM_REGIONS,
    MigrationState,
    PciRegion,
    RegionFlag,
)

INTERRUPT_PIN_INTA = 1

ConfigWatcher = Callable[[int, int], Awaitable[None] | None]
"""`watcher(old, new)`: a watched config register changed; may be `async def`."""


class ResetReason(Enum):
    """Why `PciDevice.reset` is called."""

    DEVICE_RESET = "device reset"
    """The client sent DEVICE_RESET (a VM reset); config space is back at power-on."""
    FLR = "function level reset"
    """The guest set Initiate FLR in the PCI Express capability; config space is back
    at power-on."""
    LOST_CONNECTION = "lost connection"
    """The client went away; device state is kept for the next client."""


class DisconnectReason(Enum):
    """Why a client's session ended (`PciDevice.disconnected`)."""

    CLIENT_LEFT = "the client closed the connection"
    SERVER_CLOSING = "the server is closing"
    TIMED_OUT = "a message did not arrive whole in time"
    PROTOCOL_ERROR = "the client's messages could not be followed"


@dataclass(frozen=True)
class ClientInfo:
    """Who the device's client is, as negotiation found it (`PciDevice.connected`)."""

    pid: int | None
    """The client's process, from the socket's credentials (None where unknown)."""
    version: str
    """The protocol version it asked for, "major.minor"."""
    max_data_xfer_size: int
    max_msg_fds: int


def _check_identity(**fields: tuple[int, int]) -> None:
    """Name the field a declaration got wrong, rather than fail deep in the header."""
    for name, (value, bits) in fields.items():
        if not 0 <= value < 1 << bits:
            raise ValueError(f"{name} {value:#x} does not fit in {bits} bits")


def _checked_msix(bars: Mapping[int, Bar], capabilities: Sequence[Capability]) -> MsiX | None:
    """The MSI-X capability, if any, once its table and PBA are seen to fit."""
    msix = next((c for c in capabilities if isinstance(c, MsiX)), None)
    if msix is None:
        return None
    for name, index, offset, size in (
        ("table", msix.table_bar, msix.table_offset, msix.table_bytes),
        ("PBA", msix.pba_bar, msix.pba_offset, msix.pba_bytes),
    ):
        bar = bars.get(index)
        below = bars.get(index - 1)
        if bar is None and below is not None and below.kind.is_64bit:
            raise ValueError(
                f"the MSI-X {name} is in BAR{index}, but BAR{index} is the upper half "
                f"of 64-bit BAR{index - 1}: put it in BAR{index - 1} (or another BAR)"
            )
        if bar is None or bar.kind.is_io:
            raise ValueError(f"the MSI-X {name} needs memory BAR{index}")
        if offset + size > bar.size:
            raise ValueError(f"the MSI-X {name} runs past the end of BAR{index}")
    same_bar = msix.table_bar == msix.pba_bar
    table = range(msix.table_offset, msix.table_offset + msix.table_bytes)
    if (
        same_bar
        and msix.pba_offset < table.stop
        and table.start < (msix.pba_offset + msix.pba_bytes)
    ):
        raise ValueError("the MSI-X table and PBA overlap")
    return msix


class PciDevice:
    """A PCI device: identity, BARs, expansion ROM, capabilities and config space.
    Subclass it, or build one directly.

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
        rom: bytes | None = None,
        intx: bool = False,
        capabilities: Sequence[Capability] = (),
        extended_capabilities: Sequence[ExtendedCapability] = (),
        config_registers: Sequence[ConfigRegisters] = (),
        err_irq: bool = True,
        req_irq: bool = True,
        migration: Migration | None = None,
        dma_layout: DmaLayout = DmaLayout.AUTO,
        name: str | None = None,
    ) -> None:
        self.name = name or type(self).__name__
        self.dma_layout = dma_layout
        """The DMA_READ/DMA_WRITE layout to speak, unless the server is told one: AUTO
        asks each client first (suits QEMU and clients of the spec that answer an
        empty DMA_WRITE); a device for one kind of client names its layout."""
        _check_identity(
            vendor_id=(vendor_id, 16),
            device_id=(device_id, 16),
            subsystem_vendor_id=(subsystem_vendor_id, 16),
            subsystem_id=(subsystem_id, 16),
            revision=(revision, 8),
            class_code=(class_code, 24),
        )
        self.bars: Mapping[int, Bar] = MappingProxyType(dict(bars or {}))
        """The BARs by index, fixed once the device is built."""
        self._check_bars()
        self.rom = rom.ljust(rom_size_for(len(rom)), b"\0") if rom else None
        """The expansion ROM (region 6), padded to its BAR size; None without one."""
        self._claims = sorted(config_registers, key=lambda claim: claim.offset)
        self._check_claims()
        self._claim_spans = [(claim.span, claim) for claim in self._claims]
        self.config = ConfigSpace(
            vendor_id=vendor_id,
            device_id=device_id,
            subsystem_vendor_id=subsystem_vendor_id,
            subsystem_id=subsystem_id,
            revision=revision,
            class_code=class_code,
            bars=self.bars,
            rom_size=len(self.rom or b""),
            interrupt_pin=INTERRUPT_PIN_INTA if intx else 0,
            capabilities=capabilities,
            extended_capabilities=extended_capabilities,
            reserved=[claim.span for claim in self._claims],
        )
        if self._claims and self._claims[-1].span.stop > self.config.size:
            raise ValueError("config registers lie beyond config space")
        msi = next((c for c in capabilities if isinstance(c, Msi)), None)
        msix = _checked_msix(self.bars, capabilities)
        self.irqs = Interrupts(
            self.config, intx=intx, msi=msi, msix=msix, err=err_irq, req=req_irq
        )
        """The device's IRQ indexes: `irqs.intx`, `irqs.msi`, `irqs.msix`, `irqs.err`,
        `irqs.req`, each with `trigger(vector)`."""
        self.dma = DmaSpace()
        """Guest memory as the attached client mapped it."""
        self._watchers: list[tuple[range, ConfigWatcher]] = []
        self.shared = {
            index: SharedBar(bar, f"{self.name}-bar{index}")
            for index, bar in self.bars.items()
            if bar.shared is not None
        }
        """The memory behind BARs a client may mmap, by BAR index."""
        self.doorbells = DoorbellFds(dict(self.bars))
        self.migration = MigrationController(self, migration) if migration else None
        """The migration state machine, for a device that declared `migration`."""
        self._bars = BarRouter(self.bars, self.shared, self.irqs, msix)
        self._watch_interrupt_controls(msi, msix)
        self.region_sizes, self.region_readers, self.region_writers = self._region_tables()

    def _region_tables(
        self,
    ) -> tuple[tuple[int, ...], tuple[RegionReader, ...], tuple[RegionWriter, ...]]:
        """Each region's size by index (0: it does not exist), and what `read_region`
        and `write_region` call for each: decided once the device is built."""
        regions = range(self.num_regions)
        return (
            tuple(self.region_flags_and_size(index)[1] for index in regions),
            tuple(self._reader(index) for index in regions),
            tuple(self._writer(index) for index in regions),
        )

    def _watch_interrupt_controls(self, msi: Msi | None, msix: MsiX | None) -> None:
        """The config registers that turn interrupts on and off, masks included, are
        followed by the interrupt model."""
        self.watch_config(Reg.COMMAND, 2, self.irqs.command_changed)
        if msi is not None:
            base = self.config.offset_of(msi)
            self.watch_config(base + Msi.CONTROL, 2, self.irqs.msi_changed)
            if msi.mask_offset is not None:
                self.watch_config(base + msi.mask_offset, 4, self.irqs.msi_changed)
        if msix is not None:
            control = self.config.offset_of(msix) + MsiX.CONTROL
            self.watch_config(control, 2, self.irqs.msix_control_changed)

    def _check_bars(self) -> None:
        for index, bar in self.bars.items():
            if not 0 <= index < NUM_BARS:
                raise ValueError(f"BAR index {index} is not 0…5")
            if bar.kind.is_64bit and (index == NUM_BARS - 1 or index + 1 in self.bars):
                raise ValueError(f"64-bit BAR{index} needs BAR{index + 1} free for its upper half")

    def _check_claims(self) -> None:
        previous_stop = HEADER_SIZE
        for claim in self._claims:
            if claim.offset < previous_stop:
                raise ValueError(
                    f"config registers at {claim.offset:#x} overlap the header "
                    "or other config registers"
                )
            previous_stop = claim.span.stop

    def close(self) -> None:
        """Release what muser made for the device: the memory behind mappable BARs and
        the doorbell eventfds (also released when the device is garbage collected)."""
        for shared in self.shared.values():
            shared.close()
        self.shared = {}
        self.doorbells.close()

    def shared_memory(self, index: int) -> memoryview:
        """The bytes of mappable BAR `index`, the same ones the client maps."""
        return self.shared[index].memory

    def watch_memory(
        self, index: int, offset: int, size: int, *, interval: float = 0.01
    ) -> AsyncIterator[bytes]:
        """Poll part of a mappable BAR every `interval` seconds and yield its bytes
        whenever they changed: for registers a client writes through its mapping,
        where no doorbell can tell the device."""
        shared = self.shared[index]
        if offset < 0 or size <= 0 or offset + size > shared.size:
            raise ValueError(f"{offset:#x}+{size:#x} is outside BAR{index}")
        return shared.changes(offset, size, interval)

    def watch_config(self, offset: int, size: int, watcher: ConfigWatcher) -> None:
        """Call `watcher(old, new)` after a guest write changes the `size`-byte register
        at `offset` (e.g. Command, MSI Message Control, PMCSR)."""
        self.config.check(offset, size)
        self._watchers.append((range(offset, offset + size), watcher))

    def connected(self, client: ClientInfo) -> Awaitable[None] | None:
        """Override to start what runs while a client drives the device (timers,
        background tasks). Called once the client has negotiated; may be `async
        def`, and then runs as a task of its own while commands are served (and is
        cancelled if it still runs when the client leaves)."""
        return None

    def disconnected(self, reason: DisconnectReason) -> Awaitable[None] | None:
        """Override to stop what `connected` started. Called once the client that
        negotiated is gone (after `connected` has finished), before the
        LOST_CONNECTION reset; may be `async def`."""
        return None

    def reset(self, reason: ResetReason) -> Awaitable[None] | None:
        """Override to put the device's own registers back to their power-on state.

        May be `async def`. Called after config space was reset (DEVICE_RESET, FLR),
        or when the client's connection is lost.
        """
        return None

    # Migration: what a device author may override

    def migration_transition(
        self, old: MigrationState, new: MigrationState
    ) -> Awaitable[None] | None:
        """Called for each hop of a migration state change (e.g. stop the device's own
        timers on RUNNING -> STOP). Raising puts the device in ERROR."""
        return None

    def save_state(self, phase: MigrationState) -> bytes | AsyncIterable[bytes] | Awaitable[bytes]:
        """The device's own state for the migration stream, as bytes or a stream of
        chunks: in PRE_COPY what can be sent while running, in STOP_COPY the rest.
        With the default `MigrationStream.CARRIED`, muser already carries config
        space, interrupts, the MSI-X table and mappable BAR memory."""
        return b""

    def load_state(self, chunks: AsyncIterator[bytes]) -> Awaitable[None] | None:
        """Take the chunks `save_state` produced on the source, in order (RESUMING ->
        STOP); with `MigrationStream.DEVICE`, the bytes the client wrote, in the
        pieces it wrote them. Raising fails the transition and puts the device in
        ERROR."""
        return None

    def handle_reset(self, reason: ResetReason) -> Awaitable[None] | None:
        """What muser does on a reset: DEVICE_RESET and FLR put config space, the MSI-X
        table and interrupt state back to power-on (the client's eventfds and DMA
        windows stay); a lost connection closes the client's eventfds and unmaps its
        windows. Either waits until device code holds no view into guest memory, then
        the device's `reset` hook runs."""
        if self.migration is not None:
            self.migration.reset()
        if reason is ResetReason.LOST_CONNECTION:
            self.irqs.release()
            self.dma.logging_stop()
            return self._reset_when_quiet(reason, unmap=True)
        self.config.reset()
        self.irqs.reset()
        if self.dma.busy:
            return self._reset_when_quiet(reason, unmap=False)
        return self.reset(reason)

    async def _reset_when_quiet(self, reason: ResetReason, *, unmap: bool) -> None:
        if unmap:
            await self.dma.unmap_all()
        else:
            await self.dma.quiesce()
        done = self.reset(reason)
        if done is not None:
            await done

    def region_flags_and_size(self, index: int) -> tuple[RegionFlag, int]:
        """What DEVICE_GET_REGION_INFO reports; size 0 means the region does not exist."""
        if index == PciRegion.CONFIG:
            return RegionFlag.READ | RegionFlag.WRITE, self.config.size
        if index == PciRegion.ROM:
            return (RegionFlag.READ, len(self.rom)) if self.rom else (RegionFlag(0), 0)
        bar = self.bars.get(index)
        if bar is None:
            return RegionFlag(0), 0
        flags = RegionFlag(0)
        emulated = self._bars.emulates(index)
        if bar.read is not None or emulated:
            flags |= RegionFlag.READ
        if bar.write is not None or emulated:
            flags |= RegionFlag.WRITE
        return flags, bar.size

    def region_size(self, index: int) -> int:
        """The size of region `index` (< num_regions), 0 if it does not exist."""
        return self.region_sizes[index]

    def read_region(self, index: int, offset: int, count: int) -> bytes | Awaitable[bytes]:
        """A client read, already checked against the region's bounds."""
        return self.region_readers[index](offset, count)

    def _reader(self, index: int) -> RegionReader:
        """What reads region `index`, decided once: a BAR's own handler, where muser
        emulates nothing in it, so that a guest's MMIO read costs one call."""
        if index == PciRegion.CONFIG:
            return self.read_config
        rom = self.rom
        if index == PciRegion.ROM and rom:
            return lambda offset, count: rom[offset : offset + count]
        return self._bars.reader(index)

    def write_region(self, index: int, offset: int, data: bytes) -> Awaitable[None] | None:
        """A client write, already checked against the region's bounds."""
        return self.region_writers[index](offset, data)

    def _writer(self, index: int) -> RegionWriter:
        if index == PciRegion.CONFIG:
            return self.write_config
        return self._bars.writer(index)

    def read_config(self, offset: int, count: int) -> bytes | Awaitable[bytes]:
        """A guest read of config space, from the emulated bytes or the device's own
        config registers."""
        self.config.check(offset, count)
        if not self._claims:
            return self.config.read(offset, count)
        pieces: list[bytes | Awaitable[bytes]] = []
        for start, stop, claim in split_access(offset, count, self._claim_spans):
            if claim is None:
                pieces.append(self.config.read(start, stop - start))
            else:
                pieces.append(claim.read(start - claim.offset, stop - start))
        return joined(pieces)

    def write_config(self, offset: int, data: bytes) -> Awaitable[None] | None:
        """A guest write of config space: emulated registers take it by their access
        rules, the device's config registers get it, watchers hear of changes, and
        Initiate FLR resets the function."""
        self.config.check(offset, len(data))
        end = offset + len(data)
        watched = [
            (span, watcher, self.config.register(span.start, len(span)))
            for span, watcher in self._watchers
            if span.start < end and offset < span.stop
        ]
        pending: list[Awaitable[None]] = []
        flr = False
        for start, stop, claim in split_access(offset, len(data), self._claim_spans):
            piece = data[start - offset : stop - offset]
            if claim is None:
                flr |= self.config.write(start, piece)
            else:
                done = claim.write(start - claim.offset, piece)
                if done is not None:
                    pending.append(done)
        for span, watcher, old in watched:
            new = self.config.register(span.start, len(span))
            if new != old:
                done = watcher(old, new)
                if done is not None:
                    pending.append(done)
        if flr:
            done = self.handle_reset(ResetReason.FLR)
            if done is not None:
                pending.append(done)
        return await_in_order(pending) if pending else None
