"""Live migration v2 (protocol.md §7): the device state machine and the data stream.

The arc table is the Linux VFIO one: for each (current, target) pair it names the
next state on the way; states the device does not support (P2P, PRE_COPY) are
stepped over. A SET runs one hop at a time, each hop calling the device's
`migration_transition` hook. An impossible target is EINVAL with nothing changed;
a failing hook leaves the device in ERROR, which only DEVICE_RESET leaves.

By default the stream is muser's own framing, records of (tag, length, bytes):
muser carries config space, the interrupt state the device holds, the MSI-X table
and the memory of mappable BARs, so a device author only serialises their own
registers, as records of their own. A device that must keep a format of its own
(to migrate to and from another implementation) owns the whole stream instead
(`MigrationStream.DEVICE`).
"""

from __future__ import annotations

import errno
import inspect
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import construct as cs

from muser.device.dma import DmaSpace
from muser.device.irq import Interrupts
from muser.device.shared import SharedBar
from muser.errors import VfioUserError
from muser.pci.config import ConfigSpace
from muser.wire.constants import NUM_BARS, MigrationFlag, MigrationState
from muser.wire.layout import Layout, layout, wire


class Migratable(Protocol):
    """What migration needs of a device; `PciDevice` is one."""

    config: ConfigSpace
    irqs: Interrupts
    dma: DmaSpace
    shared: dict[int, SharedBar]

    def migration_transition(
        self, old: MigrationState, new: MigrationState
    ) -> Awaitable[None] | None: ...

    def save_state(
        self, phase: MigrationState
    ) -> bytes | AsyncIterable[bytes] | Awaitable[bytes]: ...

    def load_state(self, chunks: AsyncIterator[bytes]) -> Awaitable[None] | None: ...


S = MigrationState

_NEXT: dict[MigrationState, dict[MigrationState, MigrationState]] = {
    S.STOP: {
        S.STOP: S.STOP,
        S.RUNNING: S.RUNNING_P2P,
        S.STOP_COPY: S.STOP_COPY,
        S.RESUMING: S.RESUMING,
        S.RUNNING_P2P: S.RUNNING_P2P,
        S.PRE_COPY: S.RUNNING_P2P,
        S.PRE_COPY_P2P: S.RUNNING_P2P,
    },
    S.RUNNING: {
        S.STOP: S.RUNNING_P2P,
        S.RUNNING: S.RUNNING,
        S.STOP_COPY: S.RUNNING_P2P,
        S.RESUMING: S.RUNNING_P2P,
        S.RUNNING_P2P: S.RUNNING_P2P,
        S.PRE_COPY: S.PRE_COPY,
        S.PRE_COPY_P2P: S.RUNNING_P2P,
    },
    S.PRE_COPY: {
        S.STOP: S.RUNNING,
        S.RUNNING: S.RUNNING,
        S.STOP_COPY: S.PRE_COPY_P2P,
        S.RESUMING: S.RUNNING,
        S.RUNNING_P2P: S.RUNNING,
        S.PRE_COPY: S.PRE_COPY,
        S.PRE_COPY_P2P: S.PRE_COPY_P2P,
    },
    S.PRE_COPY_P2P: {
        S.STOP: S.RUNNING_P2P,
        S.RUNNING: S.RUNNING_P2P,
        S.STOP_COPY: S.STOP_COPY,
        S.RESUMING: S.RUNNING_P2P,
        S.RUNNING_P2P: S.RUNNING_P2P,
        S.PRE_COPY: S.PRE_COPY,
        S.PRE_COPY_P2P: S.PRE_COPY_P2P,
    },
    S.STOP_COPY: {
        S.STOP: S.STOP,
        S.RUNNING: S.STOP,
        S.STOP_COPY: S.STOP_COPY,
        S.RESUMING: S.STOP,
        S.RUNNING_P2P: S.STOP,
        S.PRE_COPY: S.ERROR,
        S.PRE_COPY_P2P: S.ERROR,
    },
    S.RESUMING: {
        S.STOP: S.STOP,
        S.RUNNING: S.STOP,
        S.STOP_COPY: S.STOP,
        S.RESUMING: S.RESUMING,
        S.RUNNING_P2P: S.STOP,
        S.PRE_COPY: S.STOP,
        S.PRE_COPY_P2P: S.STOP,
    },
    S.RUNNING_P2P: {
        S.STOP: S.STOP,
        S.RUNNING: S.RUNNING,
        S.STOP_COPY: S.STOP,
        S.RESUMING: S.STOP,
        S.RUNNING_P2P: S.RUNNING_P2P,
        S.PRE_COPY: S.RUNNING,
        S.PRE_COPY_P2P: S.PRE_COPY_P2P,
    },
}
"""The next state on the way from a state (outer key) to a target (inner key), as
Linux's vfio_mig_get_next_state defines it for a device that supports everything."""

_NEEDS = {
    S.RUNNING_P2P: MigrationFlag.P2P,
    S.PRE_COPY: MigrationFlag.PRE_COPY,
    S.PRE_COPY_P2P: MigrationFlag.PRE_COPY | MigrationFlag.P2P,
}
"""What a device must support for a state to exist for it (beyond STOP_COPY)."""

ACTIVE = frozenset({S.RUNNING, S.PRE_COPY})
"""States in which the device may interrupt and DMA; in the others it is stopped
(or, in the P2P states, kept from starting new work, as muser enforces it)."""
SAVING = frozenset({S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY})


def supported(state: MigrationState, flags: MigrationFlag) -> bool:
    needs = _NEEDS.get(state, MigrationFlag(0))
    return state != S.ERROR and (needs & flags) == needs


def transition_path(
    current: MigrationState, target: MigrationState, flags: MigrationFlag
) -> list[MigrationState]:
    """The states a SET from `current` to `target` passes through, `target` last;
    EINVAL when the device can't get there."""
    if not supported(target, flags):
        raise VfioUserError(errno.EINVAL, f"migration state {target.name} is not available")
    if current == S.ERROR:
        raise VfioUserError(errno.EINVAL, "the device is in ERROR; only DEVICE_RESET helps")
    path: list[MigrationState] = []
    state: MigrationState = current
    while state != target:
        state = _NEXT[state][target]
        while state != S.ERROR and not supported(state, flags):
            state = _NEXT[state][target]
        if state == S.ERROR:
            raise VfioUserError(errno.EINVAL, f"no way from {current.name} to {target.name}")
        path.append(state)
    return path


class MigrationStream(Enum):
    """What the migration stream is made of."""

    CARRIED = "carried"
    """muser's records: config space, interrupt state, the MSI-X table and mappable
    BAR memory, which muser carries, and the device's own chunks."""
    RECORDS = "records"
    """muser's records of the device's own chunks alone: it carries all it needs."""
    DEVICE = "device"
    """The device's bytes as they are, nothing added: each phase's data is what
    `save_state(phase)` makes of it, following on from any the client left unread,
    and `load_state` gets the bytes the client wrote. For a format that must stay
    as it is, e.g. to migrate to and from a C implementation of the device."""


@dataclass(frozen=True)
class Migration:
    """A device's migration support: STOP_COPY always, PRE_COPY and P2P if declared,
    and what its stream is made of."""

    pre_copy: bool = True
    p2p: bool = False
    stream: MigrationStream = MigrationStream.CARRIED
    max_device_data: int = 64 << 20
    """The most of the stream a destination takes beyond what muser carries (the
    device's own chunks, with their record headers): ENOSPC beyond. The stream is
    held until RESUMING -> STOP, so a client must not be able to grow it without
    bound."""

    @property
    def flags(self) -> MigrationFlag:
        """What DEVICE_FEATURE MIGRATION reports for this declaration."""
        flags = MigrationFlag.STOP_COPY
        if self.pre_copy:
            flags |= MigrationFlag.PRE_COPY
        if self.p2p:
            flags |= MigrationFlag.P2P
        return flags


@layout
class RecordHeader(Layout):
    """Ahead of each record of the migration stream."""

    tag: int = wire(cs.Int16ul)
    length: int = wire(cs.Int64ul)


TAG_CONFIG = 0x0001
TAG_INTERRUPTS = 0x0002
TAG_MSIX_TABLE = 0x0003
TAG_SHARED_BAR = 0x0100
"""Plus the BAR index."""
TAG_DEVICE = 0x0200
TAG_END = 0xFFFF
MAX_RECORD = 1 << 32
"""No single migration record may claim more than 4 GiB."""


BAR_PIECE = 1 << 20
"""Mappable BAR memory enters the stream a megabyte at a time, read as the stream
is: a BAR of any size is never copied whole."""


def record(tag: int, payload: bytes) -> Iterator[bytes]:
    """A record as pieces of the stream: its header, then its payload, not joined
    (the payload may be megabytes)."""
    yield RecordHeader(tag, len(payload)).build()
    yield bytes(payload)  # a copy only if it is not bytes already: held until read


def _shared_bar_records(device: Migratable) -> Iterator[bytes]:
    for index, shared in device.shared.items():
        yield RecordHeader(TAG_SHARED_BAR + index, shared.size).build()
        for offset in range(0, shared.size, BAR_PIECE):
            yield shared.read(offset, min(BAR_PIECE, shared.size - offset))


def carried_state(device: Migratable) -> list[tuple[int, bytes]]:
    """The records muser migrates for a device at stop-copy besides mappable BAR
    memory (which it streams): config space, interrupt state, the MSI-X table."""
    records = [
        (TAG_CONFIG, device.config.read(0, device.config.size)),
        (TAG_INTERRUPTS, device.irqs.save()),
    ]
    if device.irqs.msix_table is not None:
        records.append((TAG_MSIX_TABLE, bytes(device.irqs.msix_table.entries)))
    return records


def restore_carried_state(
    device: Migratable, records: Sequence[tuple[int, Sequence[bytes | memoryview]]]
) -> None:
    """Apply what the source carried, each record's payload in the pieces it came
    in, all or nothing: a record that doesn't fit this device is EINVAL before any
    is applied."""
    for tag, pieces in records:
        if not _record_fits(device, tag, sum(map(len, pieces))):
            raise VfioUserError(errno.EINVAL, f"migration record {tag:#x} does not fit")
    for tag, pieces in records:
        if TAG_SHARED_BAR <= tag < TAG_SHARED_BAR + NUM_BARS:
            shared, offset = device.shared[tag - TAG_SHARED_BAR], 0
            for piece in pieces:  # megabytes: put in place as they came
                shared.write(offset, piece)
                offset += len(piece)
            continue
        payload = b"".join(pieces)
        if tag == TAG_CONFIG:
            device.config.set_register(0, device.config.size, int.from_bytes(payload, "little"))
        elif tag == TAG_INTERRUPTS:
            device.irqs.restore(payload)
        elif tag == TAG_MSIX_TABLE and device.irqs.msix_table is not None:
            device.irqs.msix_table.restore(payload)


def _record_fits(device: Migratable, tag: int, length: int) -> bool:
    if tag == TAG_CONFIG:
        return length == device.config.size
    if tag == TAG_INTERRUPTS:
        return length == device.irqs.state_size
    if tag == TAG_MSIX_TABLE:
        table = device.irqs.msix_table
        return table is not None and length == len(table.entries)
    index = tag - TAG_SHARED_BAR
    shared = device.shared.get(index) if 0 <= index < NUM_BARS else None
    return shared is not None and length == shared.size


async def _chunks(
    produced: bytes | AsyncIterable[bytes] | Awaitable[bytes],
) -> AsyncIterator[bytes]:
    if inspect.isawaitable(produced):
        produced = await produced
    if isinstance(produced, bytes | bytearray | memoryview):
        if produced:
            yield bytes(produced)
        return
    async for chunk in produced:
        if chunk:
            yield bytes(chunk)


class SavingSession:
    """The source's stream: read in pieces of any size, produced on demand.

    Produced bytes wait as views, so each byte is copied once, into the piece
    that is read: a 64 MiB BAR record read 1 MiB at a time must not be sliced
    and shifted 64 times."""

    def __init__(self) -> None:
        self._held: deque[memoryview] = deque()
        self._held_bytes = 0
        self._sources: list[AsyncIterator[bytes]] = []

    def append(self, source: AsyncIterator[bytes]) -> None:
        """Queue a producer of the stream's pieces."""
        self._sources.append(source)

    async def read(self, size: int) -> bytes:
        """Up to `size` bytes; fewer only at the end of what is available now."""
        held = self._held
        while self._held_bytes < size and self._sources:
            try:
                piece = await anext(self._sources[0])
            except StopAsyncIteration:
                self._sources.pop(0)
                continue
            held.append(memoryview(piece))
            self._held_bytes += len(piece)
        pieces: list[memoryview] = []
        wanted = size
        while wanted and held:
            first = held[0]
            if len(first) <= wanted:
                pieces.append(held.popleft())
                wanted -= len(first)
            else:
                pieces.append(first[:wanted])
                held[0] = first[wanted:]
                wanted = 0
        self._held_bytes -= size - wanted
        return b"".join(pieces)


class ResumingSession:
    """The destination's stream, parsed record by record as its bytes arrive.

    A record's payload is gathered as views of the written data, for whoever
    takes it to copy once, whatever the number of writes it spans."""

    def __init__(self) -> None:
        self._header = bytearray()
        """The bytes of a record header that is not whole yet."""
        self._tag: int | None = None
        """The record being gathered, once its header is whole."""
        self._missing = 0
        """Its payload bytes still to come."""
        self._pieces: list[memoryview] = []
        self.records: list[tuple[int, list[memoryview]]] = []
        self.complete = False

    def write(self, data: bytes | memoryview) -> None:
        """Take the next piece of the stream: bytes, or a view of bytes (never of a
        buffer that may change, since views of it are kept until the record is whole)."""
        if self.complete:
            raise VfioUserError(errno.EINVAL, "data after the end of the migration stream")
        view = memoryview(data)
        while True:
            if self._tag is None:
                if not view:
                    return
                taken = RecordHeader.SIZE - len(self._header)
                self._header += view[:taken]
                view = view[taken:]
                if len(self._header) < RecordHeader.SIZE:
                    return
                header = RecordHeader.parse(self._header)
                self._header.clear()
                if header.length > MAX_RECORD:
                    raise VfioUserError(errno.EINVAL, "a migration record is impossibly large")
                self._tag, self._missing = header.tag, header.length
            taken = min(self._missing, len(view))
            if taken:
                self._pieces.append(view[:taken])
                view = view[taken:]
                self._missing -= taken
            if self._missing:
                return
            tag, payload = self._tag, self._pieces
            self._tag, self._pieces = None, []
            if tag == TAG_END:
                if view:
                    raise VfioUserError(errno.EINVAL, "data after the end of the stream")
                self.complete = True
                return
            self.records.append((tag, payload))


class RawResumingSession:
    """The destination's stream of a device that owns it: kept as written (views of
    the written bytes, which never change), for the device to take whole."""

    def __init__(self) -> None:
        self.chunks: list[memoryview] = []

    def write(self, data: bytes | memoryview) -> None:
        if data:
            self.chunks.append(memoryview(data))


class MigrationController:
    """A device's migration state, its sessions, and the hops between states."""

    def __init__(self, device: Migratable, support: Migration) -> None:
        self._device = device
        self.support = support
        self.flags = support.flags
        self.state = S.RUNNING
        self._saving: SavingSession | None = None
        self._resuming: ResumingSession | RawResumingSession | None = None
        self._resumed = 0
        """Bytes the resuming session holds."""
        self._resume_limit = 0
        """And the most it may hold."""
        self._framed = support.stream is not MigrationStream.DEVICE
        self._carried = support.stream is MigrationStream.CARRIED

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    async def set_state(self, target: MigrationState) -> None:
        """Walk to `target` hop by hop; a failing hop leaves the device in ERROR."""
        path = transition_path(self.state, target, self.flags)
        for step in path:
            try:
                await self._hop(self.state, step)
            except BaseException:
                self._enter(S.ERROR)
                raise
            self._enter(step)

    def _enter(self, state: MigrationState) -> None:
        was_active = self.active
        self.state = state
        if state not in SAVING:
            self._saving = None
        if state != S.RESUMING:
            self._resuming = None
        self._device.dma.stopped = not self.active
        self._device.irqs.running = self.active
        if self.active and not was_active:
            self._device.irqs.release_all()

    async def _hop(self, old: MigrationState, new: MigrationState) -> None:
        if new in SAVING and old not in SAVING:
            self._saving = SavingSession()
            if new != S.STOP_COPY:
                self._saving.append(self._pre_copy_stream())
        if new == S.STOP_COPY:
            assert self._saving is not None
            self._saving.append(self._stop_copy_stream())
        if old == S.STOP and new == S.RESUMING:
            self._resuming = ResumingSession() if self._framed else RawResumingSession()
            self._resumed = 0
            self._resume_limit = self.support.max_device_data + self._carried_size()
        if old == S.RESUMING and new == S.STOP:
            await self._load()
        done = self._device.migration_transition(old, new)
        if done is not None:
            await done

    def reset(self) -> None:
        """DEVICE_RESET (or a lost client): RUNNING, with no data session."""
        self._enter(S.RUNNING)

    # The stream

    async def _pre_copy_stream(self) -> AsyncIterator[bytes]:
        if self._carried:
            for piece in _shared_bar_records(self._device):
                yield piece
        async for piece in self._device_pieces(S.PRE_COPY):
            yield piece

    async def _stop_copy_stream(self) -> AsyncIterator[bytes]:
        if self._carried:
            for tag, payload in carried_state(self._device):
                for piece in record(tag, payload):
                    yield piece
            for piece in _shared_bar_records(self._device):
                yield piece
        async for piece in self._device_pieces(S.STOP_COPY):
            yield piece
        if self._framed:
            for piece in record(TAG_END, b""):
                yield piece

    async def _device_pieces(self, phase: MigrationState) -> AsyncIterator[bytes]:
        """The device's data for `phase`: as records, or as it is."""
        async for chunk in _chunks(self._device.save_state(phase)):
            if self._framed:
                for piece in record(TAG_DEVICE, chunk):
                    yield piece
            else:
                yield chunk

    async def read(self, size: int) -> bytes:
        if self._saving is None:
            raise VfioUserError(errno.EINVAL, f"no migration data to read in {self.state.name}")
        return await self._saving.read(size)

    def write(self, data: bytes | memoryview) -> None:
        if self._resuming is None:
            raise VfioUserError(errno.EINVAL, f"migration data is not taken in {self.state.name}")
        if self._resumed + len(data) > self._resume_limit:
            raise VfioUserError(
                errno.ENOSPC,
                "the migration stream is more than this device takes (Migration.max_device_data)",
            )
        self._resumed += len(data)
        self._resuming.write(data)

    def _carried_size(self) -> int:
        """The bytes of the stream muser carries for this device, framing included:
        mappable BAR memory crosses twice when the source pre-copies it."""
        if not self._framed:
            return 0
        size = RecordHeader.SIZE  # the end record
        if self._carried:
            device = self._device
            copies = 2 if self.support.pre_copy else 1
            records = [len(payload) for _tag, payload in carried_state(device)]
            records += [shared.size for shared in device.shared.values()] * copies
            size += sum(records) + len(records) * RecordHeader.SIZE
        return size

    async def _load(self) -> None:
        session = self._resuming
        assert session is not None
        if isinstance(session, RawResumingSession):
            done = self._device.load_state(_iterate([bytes(chunk) for chunk in session.chunks]))
            if done is not None:
                await done
            return
        if not session.complete:
            raise VfioUserError(errno.EINVAL, "the migration stream is incomplete")
        device_chunks = [b"".join(pieces) for tag, pieces in session.records if tag == TAG_DEVICE]
        restore_carried_state(
            self._device, [(tag, pieces) for tag, pieces in session.records if tag != TAG_DEVICE]
        )
        done = self._device.load_state(_iterate(device_chunks))
        if done is not None:
            await done


async def _iterate(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
