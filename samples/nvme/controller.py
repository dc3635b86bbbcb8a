"""The controller: its registers and doorbells in BAR0, enabling, resetting and
shutting down, the queues' workers, and completions with their interrupts.

A doorbell write only records the new tail or head and wakes the queue's worker:
the write is answered at once, and everything that touches guest memory runs in
tasks (DMA by message may not be awaited while the client waits for the write).
Admin commands run one at a time, in order; I/O commands of a queue run
concurrently, at most a ring's worth, and complete in whatever order they finish.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

import structlog

import muser

from . import identify
from .admin import NO_COMPLETION, Admin
from .io import IoCommands
from .queues import CompletionQueue, SubmissionQueue
from .spec import (
    BAR0_SIZE,
    CAP,
    CC_EN,
    CC_SHN_MASK,
    CC_SHN_SHIFT,
    CSTS_CFS,
    CSTS_RDY,
    CSTS_SHST_SHIFT,
    DO_NOT_RETRY,
    DOORBELL_STRIDE,
    DOORBELLS,
    MAX_IO_QUEUES,
    MSIX_PBA,
    MSIX_TABLE,
    MSIX_VECTORS,
    PAGE_SIZE,
    SHST_COMPLETE,
    SHST_OCCURRING,
    SQE_SIZE,
    VERSION,
    Command,
    NvmeError,
    Reg,
    Status,
    cc_field,
    completion,
)
from .storage import Storage

_log = structlog.get_logger("muser_samples.nvme")

CLASS_NVME = 0x010802
"""Mass storage, Non-Volatile Memory controller, NVM Express."""
_CC_WRITABLE = 0x00FFFFF1
_ADDRESS_MASK = ~(PAGE_SIZE - 1) & (1 << 64) - 1
_REGISTER_BYTES = 0x40


class NvmeController(muser.PciDevice):
    """An NVMe 1.4 controller whose namespaces are `storage`'s."""

    def __init__(self, storage: Storage, *, serial: str | None = None) -> None:
        self.storage = storage
        identity = storage.path or f"memory-{id(storage)}"
        self.serial = serial or hashlib.sha256(identity.encode()).hexdigest()[:20].upper()
        self.msix = muser.MsiX(
            table_size=MSIX_VECTORS, table_bar=0, table_offset=MSIX_TABLE,
            pba_bar=0, pba_offset=MSIX_PBA,
        )  # fmt: skip
        doorbells = tuple(
            muser.Doorbell(DOORBELLS + DOORBELL_STRIDE * index, 4, partial(self._rung, index))
            for index in range(2 * (MAX_IO_QUEUES + 1))
        )
        bar0 = muser.Bar(
            BAR0_SIZE, kind=muser.BarKind.MEMORY_64, read=self._read_registers,
            write=self._write_registers, doorbells=doorbells,
        )  # fmt: skip
        self.counters = identify.Counters()
        self.tasks: set[asyncio.Task[None]] = set()
        self.admin = Admin(self)
        self.io = IoCommands(self)
        self._power_on()
        super().__init__(
            vendor_id=identify.PCI_VENDOR_ID,
            device_id=identify.PCI_DEVICE_ID,
            subsystem_vendor_id=identify.PCI_VENDOR_ID,
            subsystem_id=identify.PCI_DEVICE_ID,
            class_code=CLASS_NVME,
            intx=True,
            bars={0: bar0},
            capabilities=[muser.PowerManagement(), self.msix, muser.PciExpress()],
            name="nvme",
        )

    def _power_on(self) -> None:
        self.cc = self.csts = self.aqa = self.asq = self.acq = self.intms = 0
        self.submission_queues: dict[int, SubmissionQueue] = {}
        self.completion_queues: dict[int, CompletionQueue] = {}
        self.shadow_doorbells: tuple[int, int] | None = None
        """Doorbell Buffer Config: the shadow doorbells' and event indexes' pages."""
        self.admin.power_on()

    @property
    def ready(self) -> bool:
        return bool(self.csts & CSTS_RDY)

    # Registers

    def _register_image(self) -> bytes:
        image = bytearray(_REGISTER_BYTES)
        struct.pack_into("<QIII", image, Reg.CAP, CAP, VERSION, self.intms, self.intms)
        struct.pack_into("<I", image, Reg.CC, self.cc)
        struct.pack_into("<I", image, Reg.CSTS, self.csts)
        struct.pack_into("<IQQ", image, Reg.AQA, self.aqa, self.asq, self.acq)
        return bytes(image)

    def _read_registers(self, offset: int, count: int) -> bytes:
        """Registers read as they are; reserved space and doorbells read zeros."""
        return self._register_image()[offset : offset + count].ljust(count, b"\0")

    def _write_registers(self, offset: int, data: bytes) -> None:
        """Each dword the write touches is updated on its own: 8-byte registers take
        two 4-byte writes (Linux's lo_hi_writeq) or one 8-byte one alike."""
        image = self._register_image()
        for dword in range(offset & ~3, min(offset + len(data), _REGISTER_BYTES), 4):
            old = bytearray(image[dword : dword + 4])
            written = bytearray(4)
            for position in range(max(dword, offset), min(dword + 4, offset + len(data))):
                old[position - dword] = written[position - dword] = data[position - offset]
            self._write_dword(
                dword, int.from_bytes(old, "little"), int.from_bytes(written, "little")
            )

    def _write_dword(self, offset: int, value: int, written: int) -> None:
        if offset == Reg.INTMS:
            self.intms |= written
            self._update_intx()
        elif offset == Reg.INTMC:
            self.intms &= ~written
            self._update_intx()
        elif offset == Reg.CC:
            self._write_cc(value & _CC_WRITABLE)
        elif offset == Reg.AQA:
            self.aqa = value & 0x0FFF0FFF
        elif offset in (Reg.ASQ, Reg.ASQ + 4, Reg.ACQ, Reg.ACQ + 4):
            base = Reg.ASQ if offset < Reg.ACQ else Reg.ACQ
            current = self.asq if base == Reg.ASQ else self.acq
            shift = 8 * (offset - base)
            address = (current & ~(0xFFFFFFFF << shift) | value << shift) & _ADDRESS_MASK
            if base == Reg.ASQ:
                self.asq = address
            else:
                self.acq = address
        # CAP, VS, CSTS are read-only; NSSR is not supported (CAP.NSSRS 0)

    def _write_cc(self, cc: int) -> None:
        old, self.cc = self.cc, cc
        if cc & CC_EN and not old & CC_EN:
            self._enable()
        elif old & CC_EN and not cc & CC_EN:
            self._stop()
            self.csts = 0
        shutdown = cc_field(cc, CC_SHN_SHIFT, 2)
        if shutdown and not cc_field(old, CC_SHN_SHIFT, 2) and self.ready:
            self.csts = self.csts & ~(CC_SHN_MASK << CSTS_SHST_SHIFT) | (
                SHST_OCCURRING << CSTS_SHST_SHIFT
            )
            self.start(self._shut_down())

    # Enabling, resetting, shutting down

    def _enable(self) -> None:
        sq_entries, cq_entries = (self.aqa & 0xFFF) + 1, (self.aqa >> 16 & 0xFFF) + 1
        problem = None
        if cc_field(self.cc, 7, 4) or cc_field(self.cc, 4, 3) or cc_field(self.cc, 11, 3):
            problem = "CC asks for a page size, command set or arbitration not supported"
        elif not self.asq or not self.acq or sq_entries < 2 or cq_entries < 2:
            problem = "the admin queues are not set up (AQA, ASQ, ACQ)"
        if problem is not None:
            _log.warning("controller cannot be enabled", reason=problem)
            self.csts |= CSTS_CFS
            return
        admin_cq = CompletionQueue(0, self.acq, cq_entries, vector=0, interrupts=True)
        self.add_queues(admin_cq, SubmissionQueue(0, self.asq, sq_entries, admin_cq))
        self.csts = CSTS_RDY

    def _stop(self) -> None:
        """Controller reset: every queue and command dropped, features back to their
        defaults; the admin queue registers are kept, as NVMe asks."""
        for task in list(self.tasks):
            task.cancel()
        for queue in self.submission_queues.values():
            queue.deleted = True
            if queue.worker is not None:
                queue.worker.cancel()
            for task in list(queue.running):
                task.cancel()
        self.submission_queues.clear()
        self.completion_queues.clear()
        self.shadow_doorbells = None
        self.admin.power_on()
        self._update_intx()

    async def _shut_down(self) -> None:
        """CC.SHN: let the commands in flight finish, make the data durable, report it."""
        running = [task for queue in self.submission_queues.values() for task in queue.running]
        if running:
            await asyncio.wait(running)
        await self.storage.flush()
        self.csts = self.csts & ~(CC_SHN_MASK << CSTS_SHST_SHIFT) | (
            SHST_COMPLETE << CSTS_SHST_SHIFT
        )

    def close(self) -> None:
        """What muser made for the device, then the namespaces' file and threads."""
        super().close()
        self.storage.close()

    def reset(self, reason: muser.ResetReason) -> None:
        """FLR, DEVICE_RESET or a client gone: the controller as at power-on, its
        namespaces' data kept."""
        self._stop()
        self._power_on()

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task the controller keeps (and cancels on reset)."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # Queues

    def add_queues(self, completion: CompletionQueue, submission: SubmissionQueue | None) -> None:
        self.completion_queues[completion.qid] = completion
        if submission is not None:
            self.submission_queues[submission.qid] = submission
            completion.submission_queues.add(submission.qid)
            submission.worker = asyncio.get_running_loop().create_task(self._serve(submission))

    async def delete_submission_queue(self, queue: SubmissionQueue) -> None:
        """Let the queue's commands complete, then forget it."""
        worker = queue.worker
        if worker is not None:
            worker.cancel()
        if queue.running:
            await asyncio.wait(list(queue.running))
        queue.deleted = True
        del self.submission_queues[queue.qid]
        queue.completion.submission_queues.discard(queue.qid)

    def _rung(self, index: int, value: int | None, count: int) -> None:
        """A doorbell: SQ y's tail at index 2y, CQ y's head at 2y + 1. None (an
        ioeventfd rang) means: read the value from the shadow doorbells."""
        qid, is_head = divmod(index, 2)
        if not self.ready:
            return
        if is_head:
            queue = self.completion_queues.get(qid)
            if queue is None:
                return
            if value is None:
                self.start(self._head_from_shadow(queue))
            elif value < queue.size:
                queue.consumed(value)
                self._update_intx()
            return
        submission = self.submission_queues.get(qid)
        if submission is None:
            return
        if value is not None and value < submission.size:
            submission.tail = value
        submission.kicked.set()

    async def _shadow(self, index: int) -> int | None:
        if self.shadow_doorbells is None:
            return None
        raw = await self.dma.read(self.shadow_doorbells[0] + 4 * index, 4)
        return int.from_bytes(raw, "little")

    async def _set_event_index(self, index: int, value: int) -> None:
        if self.shadow_doorbells is not None:
            await self.dma.write(self.shadow_doorbells[1] + 4 * index, value.to_bytes(4, "little"))

    async def _head_from_shadow(self, queue: CompletionQueue) -> None:
        head = await self._shadow(2 * queue.qid + 1)
        if head is not None and head < queue.size:
            queue.consumed(head)
            await self._set_event_index(2 * queue.qid + 1, head)
            self._update_intx()

    async def _serve(self, queue: SubmissionQueue) -> None:
        """Fetch what the host submits and run it, until the queue is deleted."""
        try:
            while not queue.deleted:
                await queue.kicked.wait()
                queue.kicked.clear()
                await self._drain(queue)
        except muser.VfioUserError as exc:
            _log.warning("queue cannot be read: controller fatal", qid=queue.qid, error=str(exc))
            self.csts |= CSTS_CFS

    async def _drain(self, queue: SubmissionQueue) -> None:
        """Run what the host has submitted. With shadow doorbells the host rings only
        when its new tail passes the event index, so once caught up, publish the tail
        reached as the index and look again: an entry submitted meanwhile would
        otherwise wait for a ring that never comes."""
        await self._tail_from_shadow(queue)
        while not queue.deleted:
            while queue.head != queue.tail and not queue.deleted:
                address, count = queue.fetchable()
                entries = await self.dma.read(address, count * SQE_SIZE)
                queue.fetched(count)
                for position in range(count):
                    await self._run(queue, Command.unpack_from(entries, position * SQE_SIZE))
            if not queue.qid or self.shadow_doorbells is None:
                return
            await self._set_event_index(2 * queue.qid, queue.tail)
            if not await self._tail_from_shadow(queue):
                return

    async def _tail_from_shadow(self, queue: SubmissionQueue) -> bool:
        """Take an I/O queue's tail from its shadow doorbell; whether it moved."""
        tail = await self._shadow(2 * queue.qid) if queue.qid else None
        if tail is None or tail >= queue.size or tail == queue.tail:
            return False
        queue.tail = tail
        return True

    async def _run(self, queue: SubmissionQueue, command: Command) -> None:
        if not queue.qid:
            await self._execute(queue, command, self.admin.run)
            return
        await queue.slots.acquire()
        task = asyncio.get_running_loop().create_task(self._execute(queue, command, self.io.run))
        queue.running.add(task)
        task.add_done_callback(queue.running.discard)
        task.add_done_callback(lambda _task: queue.slots.release())

    async def _execute(
        self,
        queue: SubmissionQueue,
        command: Command,
        handler: Callable[[SubmissionQueue, Command], Awaitable[int | None]],
    ) -> None:
        """Run a command and post its completion (an Asynchronous Event Request's
        waits for an event)."""
        result: int | None = 0
        status: int = Status.SUCCESS
        try:
            result = await handler(queue, command)
        except NvmeError as exc:
            status = exc.status | (0 if exc.retry else DO_NOT_RETRY)
            _log.debug(
                "command failed", opcode=command.opcode, status=hex(status), reason=str(exc)
            )
        except muser.VfioUserError as exc:
            status = Status.DATA_TRANSFER_ERROR | DO_NOT_RETRY
            _log.info("command's data transfer failed", opcode=command.opcode, error=str(exc))
        except OSError as exc:
            status = Status.INTERNAL_ERROR | DO_NOT_RETRY
            _log.error("backing store failed", opcode=command.opcode, error=str(exc))
        except Exception:
            status = Status.INTERNAL_ERROR | DO_NOT_RETRY
            _log.exception("command failed inside the controller", opcode=command.opcode)
        if result is not NO_COMPLETION:
            await self.complete(queue, command.cid, status, result)

    async def complete(self, queue: SubmissionQueue, cid: int, status: int, result: int) -> None:
        """Post a completion for `queue`'s command `cid`, once its completion queue has
        room, and raise the queue's interrupt."""
        completions = queue.completion
        while completions.full and not queue.deleted:
            if completions.qid and self.shadow_doorbells is not None:
                await self._head_from_shadow(completions)
                if not completions.full:
                    break
            await completions.room.wait()
        if queue.deleted and queue.qid:
            return
        address, phase = completions.reserve()
        entry = completion(result, queue.head, queue.qid, cid, status=status, phase=phase)
        await self.dma.write(address, entry)
        if completions.interrupts:
            if self.msix_enabled:
                self.irqs.msix.trigger(completions.vector)
            else:
                self._update_intx()

    # Interrupts

    @property
    def msix_enabled(self) -> bool:
        control = self.config.register(self.config.offset_of(self.msix) + muser.MsiX.CONTROL, 2)
        return bool(control & muser.MsiX.ENABLE)

    def _update_intx(self) -> None:
        """INTx is a level: asserted while a completion queue with interrupts on
        holds entries the host has not consumed, unless INTMS masks it."""
        if self.msix_enabled:
            return
        asserted = not self.intms & 1 and any(
            queue.interrupts and queue.unread for queue in self.completion_queues.values()
        )
        self.irqs.intx.set_level(asserted)
