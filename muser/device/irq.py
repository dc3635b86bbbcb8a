"""Interrupts (protocol.md §3.7, §3.8, §5): eventfds from the client, fired by the device.

Each IRQ index (INTx, MSI, MSI-X, ERR, REQ) keeps, per vector, the trigger
eventfd the client assigned with DEVICE_SET_IRQS, the client's SET_IRQS mask,
an optional unmask eventfd (KVM's INTx resampler: the server reads it and
unmasks), and a pending bit. The guest-visible gates live in config space and
the MSI-X table: INTx Disable, MSI Enable / Multiple Message Enable / mask bits,
MSI-X Enable / Function Mask / per-vector mask. A masked interrupt is held
pending and delivered once when unmasked; one with nowhere to go is dropped.
Device code sees which of the three happened; nothing here raises at it.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import construct as cs
import structlog

from muser.errors import VfioUserError
from muser.pci.capabilities import Msi, MsiX
from muser.pci.config import CommandRegister, ConfigSpace, Reg, Status
from muser.wire import close_fds
from muser.wire.constants import (
    IRQ_SET_ACTION_MASK,
    IRQ_SET_DATA_MASK,
    IrqIndex,
    IrqInfoFlag,
    IrqSetFlag,
)
from muser.wire.messages import IrqSet

_log = structlog.get_logger("muser")

_EVENTFD_LINK = "anon_inode:[eventfd]"
_KNOWN_SET_FLAGS = int(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK)
"""A plain int: `~` on an IntFlag only complements the flag's own bits."""
_ACTION_BITS, _DATA_BITS = int(IRQ_SET_ACTION_MASK), int(IRQ_SET_DATA_MASK)
"""Plain ints too: IntFlag arithmetic costs microseconds, and SET_IRQS unmasks may
come with every interrupt."""
_DISABLE_INDEX = int(IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.DATA_NONE)
_TRIGGER, _MASK, _UNMASK = (
    int(IrqSetFlag.ACTION_TRIGGER),
    int(IrqSetFlag.ACTION_MASK),
    int(IrqSetFlag.ACTION_UNMASK),
)
_DATA_BOOL, _DATA_EVENTFD = int(IrqSetFlag.DATA_BOOL), int(IrqSetFlag.DATA_EVENTFD)
_ERR_AND_REQ = (int(IrqIndex.ERR), int(IrqIndex.REQ))


def _refuse(reason: str, code: int = errno.EINVAL) -> VfioUserError:
    return VfioUserError(code, f"SET_IRQS: {reason}")


class Delivery(Enum):
    """What became of an interrupt the device raised."""

    DELIVERED = "delivered"
    """Its eventfd was signalled."""
    PENDING = "pending"
    """It is masked; it will be delivered once, when unmasked."""
    DROPPED = "dropped"
    """Nowhere to go: no eventfd, the index or the capability is disabled, or the
    vector is beyond those the guest enabled."""


_OPEN, _HOLD, _CLOSED = 0, 1, 2
"""What a gate says of a vector now: deliver, hold pending, or drop. Plain ints and
precomputed offsets keep trigger() cheap: it runs for every interrupt."""
_INTX_DISABLE = int(CommandRegister.INTX_DISABLE)


def _always_open(vector: int) -> int:
    """ERR and REQ have no guest-visible gate."""
    return _OPEN


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == _EVENTFD_LINK
    except OSError:
        return False


def _signal(fd: int) -> None:
    try:  # noqa: SIM105 - contextlib.suppress costs a microsecond per interrupt
        _eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # a saturated counter: the consumer has an interrupt waiting anyway


_DECLARED_BY = {
    IrqIndex.INTX: "it with PciDevice(intx=True)",
    IrqIndex.MSI: "an Msi() among PciDevice(capabilities=...)",
    IrqIndex.MSIX: "an MsiX() among PciDevice(capabilities=...)",
}
"""How a device gets each index, for the error that says it has none."""
_eventfd_write = os.eventfd_write
_DELIVERED = Delivery.DELIVERED


class Irq:
    """One IRQ index of a device. `trigger(vector)` raises an interrupt and says
    what became of it; `delivered` and `dropped` count them."""

    def __init__(
        self, controller: Interrupts, index: IrqIndex, count: int, info_flags: IrqInfoFlag
    ) -> None:
        self._controller = controller
        self.index = index
        self.count = count
        self.info_flags = info_flags
        """What DEVICE_GET_IRQ_INFO reports, with or without vectors: Linux's
        vfio-pci flags for the index."""
        self._automask = bool(self.info_flags & IrqInfoFlag.AUTOMASKED)
        self.gate: Callable[[int], int] = _always_open
        """Set by the controller: whether guest-visible state lets a vector through."""
        self.enabled = False
        """Whether the client has turned this index on (with DATA_EVENTFD)."""
        self._triggers: list[int | None] = [None] * count
        self._unmask_fds: list[int | None] = [None] * count
        self._masked = [False] * count
        self._pending = [False] * count
        self._open: list[int | None] = [None] * count
        """Per vector, its eventfd while nothing holds it back: what `trigger` found
        last time, kept until anything that could close it changes."""
        self._gates_open: list[int | None] = [None] * count
        """Per vector, its eventfd while all but the client's mask let it through:
        what `unmask` opens the vector with again (INTx, masked by every delivery,
        most of all; any vector the client masks and unmasks)."""
        self.delivered = 0
        """Interrupts delivered since the device was created."""
        self.dropped = 0
        """Interrupts dropped since the device was created."""
        self._drop_logged = False
        """Whether a trigger dropped by the guest's settings has been logged: once is
        enough (the guest not having enabled the capability is the one reason)."""

    def __repr__(self) -> str:
        return f"<Irq {self.index.name} count={self.count} enabled={self.enabled}>"

    def has_eventfd(self, vector: int) -> bool:
        """Whether the client wired an eventfd to `vector` (SET_IRQS)."""
        return self._triggers[vector] is not None

    def is_pending(self, vector: int) -> bool:
        """Whether an interrupt on `vector` is held, to be delivered when unmasked."""
        return self._pending[vector]

    def is_masked(self, vector: int) -> bool:
        """Masked by the client with SET_IRQS (guest-visible masks aside)."""
        return self._masked[vector]

    def trigger(self, vector: int = 0) -> Delivery:
        """Raise interrupt `vector` of this index; safe from any code on the loop's thread."""
        try:
            fd = self._open[vector] if vector >= 0 else None
        except IndexError:
            fd = None
        if fd is None:
            return self._trigger(vector)
        try:  # noqa: SIM105 - as in _signal, inline: this is every interrupt's path
            _eventfd_write(fd, 1)
        except BlockingIOError:
            pass
        self.delivered += 1
        return _DELIVERED

    def _trigger(self, vector: int) -> Delivery:
        """Decide from everything that may hold the interrupt back, and remember an
        open vector: as open while unmasked, and as let through by the gates, for
        the unmask that follows a delivery that masked it (INTx's)."""
        if not 0 <= vector < self.count:
            raise ValueError(self._no_vector(vector))
        if not self.enabled or self._triggers[vector] is None:
            self.dropped += 1
            return Delivery.DROPPED
        gate = self.gate(vector)
        if gate == _CLOSED:
            self.dropped += 1
            if not self._drop_logged:  # once: a device may trigger often
                self._drop_logged = True
                _log.debug(
                    "interrupt dropped",
                    index=self.index.name,
                    vector=vector,
                    reason=self.explain(vector),
                )
            return Delivery.DROPPED
        if gate == _HOLD or self._masked[vector] or not self._controller.running:
            self.set_pending(vector, True)
            return Delivery.PENDING
        self._deliver(vector)
        fd = self._gates_open[vector] = self._triggers[vector]
        if not self._masked[vector]:  # as it is after an automasked delivery
            self._open[vector] = fd
        return Delivery.DELIVERED

    def _no_vector(self, vector: int) -> str:
        if self.count:
            return f"{self.index.name} has no vector {vector} (it has {self.count})"
        declare = _DECLARED_BY.get(self.index, "")
        return f"the device has no {self.index.name}" + (f": declare {declare}" if declare else "")

    def explain(self, vector: int) -> str:
        """Why an interrupt on `vector` would not be delivered now; "" if it would."""
        if not 0 <= vector < self.count:
            return self._no_vector(vector)
        if not self.enabled or self._triggers[vector] is None:
            return "no eventfd is wired to it (the client has not sent SET_IRQS for it)"
        gate = self._controller.explain_gate(self, vector)
        if gate:
            return gate
        if self._masked[vector]:
            if self._automask:
                return "masked by its last delivery, until the client unmasks it"
            return "masked by the client (SET_IRQS ACTION_MASK)"
        if not self._controller.running:
            return "the device is stopped (migration): held pending"
        return ""

    def loopback(self, vector: int) -> None:
        """SET_IRQS TRIGGER with DATA_NONE or DATA_BOOL: signal the vector's eventfd,
        whatever the guest or the device has masked or disabled. It is the client
        testing its own path, and Linux (vfio_pci_set_msi_trigger) and libvfio-user
        signal it unconditionally too."""
        fd = self._triggers[vector]
        if fd is not None:
            _signal(fd)

    def forget_open(self) -> None:
        """Something that gates delivery changed: decide afresh on the next trigger."""
        self._open = [None] * self.count
        self._gates_open = [None] * self.count

    def _deliver(self, vector: int) -> None:
        fd = self._triggers[vector]
        assert fd is not None
        _signal(fd)
        self.delivered += 1
        if self._automask:
            self._masked[vector] = True

    def set_pending(self, vector: int, pending: bool) -> None:
        self._pending[vector] = pending
        self._controller.pending_changed(self, vector, pending)

    def release_pending(self, vector: int) -> None:
        """Deliver a held interrupt if nothing holds it any more."""
        if (
            self._pending[vector]
            and not self._masked[vector]
            and self._triggers[vector] is not None
            and self._controller.running
            and self.gate(vector) == _OPEN
        ):
            self.set_pending(vector, False)
            self._deliver(vector)

    def mask(self, vector: int) -> None:
        self._masked[vector] = True
        self._open[vector] = None

    def unmask(self, vector: int) -> None:
        self._masked[vector] = False
        self.release_pending(vector)
        if not self._masked[vector]:
            self._open[vector] = self._gates_open[vector]

    # SET_IRQS, already validated

    def assign_triggers(self, start: int, fds: Sequence[int | None]) -> None:
        for vector, fd in enumerate(fds, start):
            old = self._triggers[vector]
            if old is not None:
                close_fds([old])
            self._triggers[vector] = fd
        self.enabled = True
        self.forget_open()

    def assign_unmask_fds(self, start: int, fds: Sequence[int | None]) -> None:
        loop = asyncio.get_running_loop()
        for vector, fd in enumerate(fds, start):
            self._drop_unmask_fd(vector)
            if fd is not None:
                loop.add_reader(fd, self._unmask_requested, vector, fd)
                self._unmask_fds[vector] = fd

    def _unmask_requested(self, vector: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        self.unmask(vector)

    def _drop_unmask_fd(self, vector: int) -> None:
        fd = self._unmask_fds[vector]
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            close_fds([fd])
            self._unmask_fds[vector] = None

    def disable(self) -> None:
        """TRIGGER|DATA_NONE with count 0: forget every eventfd; the index is off."""
        for vector in range(self.count):
            self._drop_unmask_fd(vector)
        close_fds(fd for fd in self._triggers if fd is not None)
        self._triggers = [None] * self.count
        self.enabled = False
        self.forget_open()
        self.clear()

    def clear(self) -> None:
        """No masks, nothing pending (reset)."""
        self._masked = [False] * self.count
        for vector in range(self.count):
            if self._pending[vector]:
                self.set_pending(vector, False)


class IntxIrq(Irq):
    """INTx is level-triggered: besides `trigger()` (one interrupt), the device can
    hold the line asserted with `set_level(True)`; while it stays asserted, every
    unmask (the guest's EOI, as QEMU reports it) signals again."""

    def __init__(self, controller: Interrupts, count: int) -> None:
        super().__init__(
            controller,
            IrqIndex.INTX,
            count,
            IrqInfoFlag.EVENTFD | IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED,
        )
        self.level = False

    def trigger(self, vector: int = 0) -> Delivery:
        """Raise INTx (vector 0). A delivery masks it until the client unmasks it,
        as QEMU does at the guest's EOI; the unmask reopens the remembered path."""
        fd = self._open[0] if vector == 0 and self.count else None
        if fd is None:
            return self._trigger(vector)
        self._open[0] = None
        self._masked[0] = True
        _signal(fd)
        self.delivered += 1
        return _DELIVERED

    def set_level(self, asserted: bool) -> Delivery | None:
        """Assert or deassert the line; asserting it raises an interrupt."""
        if not self.count:
            raise ValueError(self._no_vector(0))
        self.level = asserted
        self._controller.intx_status_changed()
        return self.trigger() if asserted else None

    def release_pending(self, vector: int) -> None:
        if self.level and not self._pending[vector]:
            self.set_pending(vector, True)
        if self._pending[vector]:  # else nothing to release: spare every unmask super()
            super().release_pending(vector)

    def clear(self) -> None:
        self.level = False
        super().clear()


class MsixTable:
    """The MSI-X table and Pending Bit Array, emulated in the BAR(s) that hold them."""

    ENTRY_MASK = bytes([0xFC, 0xFF, 0xFF, 0xFF] + [0xFF] * 8 + [MsiX.VECTOR_MASKED, 0, 0, 0])
    """Writable bits of an entry: address (bits 1:0 reserved), upper address, data,
    and the Mask bit of Vector Control."""

    def __init__(self, capability: MsiX, changed: Callable[[], None]) -> None:
        self.capability = capability
        self._changed = changed
        """Told of every change, as config space tells its listeners."""
        self.entries = bytearray(capability.table_bytes)
        self.in_use = False
        """Whether the client programs this table. QEMU emulates the table itself and
        never forwards its accesses, so until the client writes an entry its mask bits
        (masked at reset) must not hold interrupts back."""
        self.reset()

    def reset(self) -> None:
        self.entries[:] = bytes(len(self.entries))
        for vector in range(self.capability.table_size):
            self.entries[vector * MsiX.ENTRY_SIZE + MsiX.VECTOR_CONTROL] = MsiX.VECTOR_MASKED
        self.in_use = False
        self._changed()

    def restore(self, entries: bytes) -> None:
        """The table as a migration source left it."""
        self.entries[:] = entries
        self._changed()

    def vector_masked(self, vector: int) -> bool:
        control = self.entries[vector * MsiX.ENTRY_SIZE + MsiX.VECTOR_CONTROL]
        return self.in_use and bool(control & MsiX.VECTOR_MASKED)

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.entries[offset : offset + count])

    def write(self, offset: int, data: bytes) -> list[int]:
        """Apply a write; return the vectors whose Mask bit it cleared."""
        self.in_use = True
        unmasked = []
        masked = MsiX.VECTOR_MASKED
        for position, value in enumerate(data, offset):
            vector, within = divmod(position, MsiX.ENTRY_SIZE)
            writable = self.ENTRY_MASK[within]
            old = self.entries[position]
            new = (old & ~writable) | (value & writable)
            self.entries[position] = new
            if within == MsiX.VECTOR_CONTROL and old & masked and not new & masked:
                unmasked.append(vector)
        self._changed()
        return unmasked


class Interrupts:
    """A device's IRQ indexes, and the guest-visible state that gates them: `intx`,
    `msi`, `msix`, `err` and `req` are one `Irq` each (with no vectors where the
    device declared none), also reachable as `irqs[IrqIndex.MSIX]`."""

    def __init__(
        self,
        config: ConfigSpace,
        *,
        intx: bool,
        msi: Msi | None,
        msix: MsiX | None,
        err: bool,
        req: bool,
    ) -> None:
        self._config = config
        self._msix = msix
        self._running = True
        self.intx = IntxIrq(self, 1 if intx else 0)
        # The flags Linux's vfio-pci reports (vfio_pci_ioctl_get_irq_info): INTx
        # maskable and automasked, the others NORESIZE except MSI-X on a device that
        # can add vectors one at a time (Linux 6.5 on), as muser can: QEMU then
        # assigns a newly used vector alone rather than tearing down the set.
        resizable = IrqInfoFlag.EVENTFD
        fixed = IrqInfoFlag.EVENTFD | IrqInfoFlag.NORESIZE
        self.msi = Irq(self, IrqIndex.MSI, msi.vectors if msi else 0, fixed)
        self.msix = Irq(self, IrqIndex.MSIX, msix.table_size if msix else 0, resizable)
        self.err = Irq(self, IrqIndex.ERR, 1 if err else 0, fixed)
        self.req = Irq(self, IrqIndex.REQ, 1 if req else 0, fixed)
        self._by_index = (self.intx, self.msi, self.msix, self.err, self.req)
        self._with_vectors = [irq for irq in self._by_index if irq.count]
        fields: list[cs.Construct[Any, Any]] = [
            "intx_level" / cs.Flag,
            *(
                irq.index.name / cs.BytesInteger(-(-irq.count // 8), swapped=True)
                for irq in self._with_vectors
            ),
        ]
        self._state = cs.Struct(*fields, cs.Terminated)
        """What `save` writes for this device: the INTx line, then each index's pending
        bits, one per vector from the lowest bit, in whole bytes."""
        self.state_size = int(cs.Struct(*fields).sizeof())
        """The length of what `save` returns for this device."""
        self.msix_table = MsixTable(msix, self.msix.forget_open) if msix else None
        config.on_change(self._forget_open)
        self._msi_control_at = self._msix_control_at = 0
        self._msi_mask_at: int | None = None
        self._msi_pending_at: int | None = None
        self.intx.gate = self._gate_intx
        if msi is not None:
            base = config.offset_of(msi)
            self._msi_control_at = base + Msi.CONTROL
            if msi.mask_offset is not None and msi.pending_offset is not None:
                self._msi_mask_at = base + msi.mask_offset
                self._msi_pending_at = base + msi.pending_offset
            self.msi.gate = self._gate_msi
        if msix is not None:
            self._msix_control_at = config.offset_of(msix) + MsiX.CONTROL
            self.msix.gate = self._gate_msix

    @property
    def running(self) -> bool:
        """False while migration has the device stopped: interrupts are held pending."""
        return self._running

    @running.setter
    def running(self, running: bool) -> None:
        self._running = running
        self._forget_open()

    def _forget_open(self) -> None:
        for irq in self._by_index:
            irq.forget_open()

    def __getitem__(self, index: int) -> Irq:
        return self._by_index[index]

    def __len__(self) -> int:
        return len(self._by_index)

    # What holds an interrupt back

    def _gate_intx(self, vector: int) -> int:
        return _HOLD if self._config.register(Reg.COMMAND, 2) & _INTX_DISABLE else _OPEN

    def _gate_msi(self, vector: int) -> int:
        control = self._config.register(self._msi_control_at, 2)
        enabled_vectors = 1 << ((control & Msi.MME_MASK) >> Msi.MME_SHIFT)
        if not control & Msi.ENABLE or vector >= enabled_vectors:
            return _CLOSED
        mask = self._msi_mask_at
        if mask is not None and self._config.register(mask, 4) >> vector & 1:
            return _HOLD
        return _OPEN

    def _gate_msix(self, vector: int) -> int:
        control = self._config.register(self._msix_control_at, 2)
        if not control & MsiX.ENABLE:
            return _CLOSED
        table = self.msix_table
        if control & MsiX.FUNCTION_MASK or (table is not None and table.vector_masked(vector)):
            return _HOLD
        return _OPEN

    def explain_gate(self, irq: Irq, vector: int) -> str:
        """The guest-visible reason the gate holds `irq`'s vector back; "" if open."""
        gate = irq.gate(vector)
        if gate == _OPEN:
            return ""
        if irq is self.intx:
            return "the guest set Interrupt Disable in the Command register: held pending"
        if irq is self.msix:
            if gate == _CLOSED:
                return "the guest has not enabled MSI-X (Message Control bit 15)"
            return (
                "the guest masked it (MSI-X Function Mask or the vector's Mask bit): held pending"
            )
        if gate == _CLOSED:
            return "the guest has not enabled MSI, or not this many vectors (Message Control)"
        return "the guest masked it (MSI Mask Bits): held pending"

    def pending_changed(self, irq: Irq, vector: int, pending: bool) -> None:
        """Mirror pending state where the guest can read it."""
        if irq.index == IrqIndex.INTX:
            self.intx_status_changed()
        elif irq.index == IrqIndex.MSI and self._msi_pending_at is not None:
            register = self._msi_pending_at
            bits = self._config.register(register, 4) & ~(1 << vector)
            self._config.set_register(register, 4, bits | pending << vector)

    def intx_status_changed(self) -> None:
        """Status bit 3 follows the INTx line (asserted, or an interrupt held pending)."""
        status = self._config.register(Reg.STATUS, 2) & ~int(Status.INTERRUPT)
        if self.intx.count and (self.intx.level or self.intx.is_pending(0)):
            status |= Status.INTERRUPT
        self._config.set_register(Reg.STATUS, 2, status)

    def pba(self) -> bytes:
        """The MSI-X Pending Bit Array as the guest reads it."""
        assert self._msix is not None
        bits = sum(
            1 << vector for vector in range(self.msix.count) if self.msix.is_pending(vector)
        )
        return bits.to_bytes(self._msix.pba_bytes, "little")

    # Guest writes that may let held interrupts through (config watchers, table writes)

    def command_changed(self, old: int, new: int) -> None:
        if old & _INTX_DISABLE and not new & _INTX_DISABLE and self.intx.count:
            self.intx.release_pending(0)

    def msi_changed(self, old: int, new: int) -> None:
        for vector in range(self.msi.count):
            self.msi.release_pending(vector)

    def msix_control_changed(self, old: int, new: int) -> None:
        for vector in range(self.msix.count):
            self.msix.release_pending(vector)

    def msix_table_unmasked(self, vectors: list[int]) -> None:
        for vector in vectors:
            self.msix.release_pending(vector)

    def release_all(self) -> None:
        """Deliver whatever was held while the device was stopped."""
        for irq in self._by_index:
            for vector in range(irq.count):
                irq.release_pending(vector)

    def save(self) -> bytes:
        """The interrupt state a migrated device carries: the INTx line and every
        pending bit (eventfds and SET_IRQS masks belong to the client)."""
        state: dict[str, object] = {"intx_level": self.intx.level}
        for irq in self._with_vectors:
            state[irq.index.name] = sum(irq.is_pending(v) << v for v in range(irq.count))
        return bytes(self._state.build(state))

    def restore(self, state: bytes) -> None:
        try:
            parsed = self._state.parse(state)
        except cs.ConstructError:
            raise VfioUserError(errno.EINVAL, "interrupt state of another device") from None
        self.intx.level = parsed.intx_level
        for irq in self._with_vectors:
            bits = parsed[irq.index.name]
            for vector in range(irq.count):
                irq.set_pending(vector, bool(bits >> vector & 1))
        self.intx_status_changed()

    # Lifecycle

    def reset(self) -> None:
        """DEVICE_RESET or FLR: nothing masked or pending, the MSI-X table at power-on;
        the client's eventfds stay."""
        for irq in self._by_index:
            irq.clear()
        if self.msix_table is not None:
            self.msix_table.reset()

    def release(self) -> None:
        """The client is gone: close every eventfd it gave us."""
        for irq in self._by_index:
            irq.disable()

    # DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS

    def set_irqs(self, request: IrqSet, fds: list[int]) -> None:
        """Apply one DEVICE_SET_IRQS request. Takes ownership of `fds`: they are kept
        or closed, whatever happens."""
        try:
            self._check_set_irqs(request, fds)
        except VfioUserError:
            close_fds(fds)
            raise
        flags, index, start, count = request.flags, request.index, request.start, request.count
        data = request.data
        irq = self._by_index[index]
        action = flags & _ACTION_BITS
        data_type = flags & _DATA_BITS
        selected: Sequence[int]
        if data_type == _DATA_BOOL:
            selected = [start + offset for offset, flag in enumerate(data) if flag]
        else:
            selected = range(start, start + count)
        if action == _TRIGGER:
            if data_type == _DATA_EVENTFD:
                irq.assign_triggers(start, fds or [None] * count)
            elif count == 0:
                irq.disable()
            else:
                for vector in selected:
                    irq.loopback(vector)
        elif data_type == _DATA_EVENTFD:
            if action == _UNMASK:
                irq.assign_unmask_fds(start, fds or [None] * count)
        elif action == _MASK:
            for vector in selected:
                irq.mask(vector)
        else:
            for vector in selected:
                irq.unmask(vector)

    def _check_set_irqs(self, request: IrqSet, fds: list[int]) -> None:
        flags, index, start, count = request.flags, request.index, request.start, request.count
        data = request.data

        if request.argsz < IrqSet.SIZE + len(data):
            raise _refuse(f"argsz {request.argsz} is smaller than the request")
        if flags & ~_KNOWN_SET_FLAGS:
            raise _refuse(f"unknown flag bits {flags & ~_KNOWN_SET_FLAGS:#x}")
        action = flags & _ACTION_BITS
        data_type = flags & _DATA_BITS
        if action.bit_count() != 1 or data_type.bit_count() != 1:
            raise _refuse("exactly one action and one data type")
        if index >= len(self._by_index):
            raise _refuse(f"no IRQ index {index}")
        irq = self._by_index[index]
        if start >= irq.count or start + count > irq.count:
            raise _refuse(f"vectors {start}+{count} outside the {irq.count} of index {index}")
        if count == 0 and (start != 0 or flags != _DISABLE_INDEX):
            raise _refuse("count 0 is only TRIGGER|DATA_NONE from vector 0 (disable)")
        if index in _ERR_AND_REQ and (action != _TRIGGER or count > 1):
            raise _refuse("ERR and REQ take TRIGGER of their one vector only")
        expected_data = count if data_type == _DATA_BOOL else 0
        if len(data) != expected_data:
            raise _refuse(f"{len(data)} data bytes for {expected_data}")
        if data_type == _DATA_EVENTFD:
            if fds and len(fds) != count:
                raise _refuse(f"{len(fds)} eventfds for {count} vectors")
            if not all(_is_eventfd(fd) for fd in fds):
                raise _refuse("a passed file descriptor is not an eventfd")
            if fds and action == _MASK:
                raise _refuse("eventfds signalled on mask are not supported", errno.ENOTSUP)
        elif fds:
            raise _refuse("file descriptors without DATA_EVENTFD")
