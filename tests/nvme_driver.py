"""A small NVMe host driver written with `muser.Client`: what Linux's `nvme` driver
does to a controller, in test-sized form. It finds MSI-X in config space, enables
it and unmasks its vectors, sets up the admin queue, enables the controller,
creates I/O queue pairs with a vector each, and submits commands with PRPs (lists
too) into guest memory, reaping completions by phase tag when their interrupt
fires. Guest memory is shared with the device (a memfd) or reached by messages.
"""

from __future__ import annotations

import asyncio
import random
import struct
from dataclasses import dataclass, field

from muser import IrqIndex
from muser.testing import DeviceSession, Interrupt
from muser_samples.nvme.spec import (
    CC_EN,
    CQE_SIZE,
    CSTS_RDY,
    PAGE_SIZE,
    SQE_SIZE,
    AdminOpcode,
    Command,
    Reg,
    unpack_completion,
)

CC_IO_ENTRY_SIZES = 6 << 16 | 4 << 20
WAIT = 5.0


@dataclass(frozen=True)
class Completion:
    result: int
    sq_head: int
    sq_id: int
    cid: int
    status: int

    @property
    def code(self) -> int:
        """Status Code Type << 8 | Status Code, without More and Do Not Retry."""
        return self.status & 0x7FF

    @property
    def do_not_retry(self) -> bool:
        return bool(self.status & 0x4000)


@dataclass(eq=False)
class HostQueue:
    """One submission/completion queue pair, from the host's side."""

    qid: int
    entries: int
    sq: int
    cq: int
    interrupt: Interrupt
    tail: int = 0
    head: int = 0
    phase: int = 1
    next_cid: int = 0
    waiting: dict[int, asyncio.Future[Completion]] = field(default_factory=dict)


class NvmeHost:
    """The host side of one NVMe controller served by `session`."""

    def __init__(self, session: DeviceSession, memory: memoryview, base: int) -> None:
        self.session = session
        self.client = session.client
        self.memory = memory
        self.base = base
        self._free = base
        self.queues: dict[int, HostQueue] = {}

    @classmethod
    async def attach(
        cls, session: DeviceSession, *, size: int = 16 << 20, shared: bool = True
    ) -> NvmeHost:
        """A host with `size` bytes of guest memory at 1 MiB, shared with the device
        (a memfd it maps) or served to it by DMA messages."""
        base = 1 << 20
        if shared:
            memory = await session.guest_memory(base, size)
        else:
            memory = memoryview(bytearray(size))
            await session.client.dma_map(base, size, backing=memory)
        return cls(session, memory, base)

    # Guest memory

    def allocate(self, size: int) -> int:
        """Page-aligned guest memory, zeroed."""
        address = self._free
        self._free += -(-size // PAGE_SIZE) * PAGE_SIZE
        if self._free > self.base + len(self.memory):
            raise MemoryError("guest memory used up")
        self.view(address, size)[:] = bytes(size)
        return address

    def view(self, address: int, size: int) -> memoryview:
        return self.memory[address - self.base : address - self.base + size]

    # Registers and config space

    async def read32(self, offset: int) -> int:
        return int.from_bytes(await self.client.region_read(0, offset, 4), "little")

    async def read64(self, offset: int) -> int:
        return int.from_bytes(await self.client.region_read(0, offset, 8), "little")

    async def write32(self, offset: int, value: int, *, posted: bool = False) -> None:
        await self.client.region_write(0, offset, value.to_bytes(4, "little"), posted=posted)

    async def write64(self, offset: int, value: int) -> None:
        await self.write32(offset, value & 0xFFFFFFFF)
        await self.write32(offset + 4, value >> 32)

    async def wait_ready(self, ready: bool) -> None:
        async with asyncio.timeout(WAIT):
            while bool(await self.read32(Reg.CSTS) & CSTS_RDY) != ready:
                await asyncio.sleep(0.001)

    async def enable(self, admin_entries: int = 32, *, msix: bool = True) -> None:
        """What a driver does at probe: disable, admin queue, enable, wait until
        ready. Without `msix` the admin queue's interrupt is INTx."""
        if msix:
            await self.session.enable_msix()
        await self.write32(Reg.CC, 0)
        await self.wait_ready(False)
        sq, cq = self.allocate(admin_entries * SQE_SIZE), self.allocate(admin_entries * CQE_SIZE)
        await self.write32(Reg.AQA, (admin_entries - 1) << 16 | (admin_entries - 1))
        await self.write64(Reg.ASQ, sq)
        await self.write64(Reg.ACQ, cq)
        interrupt = await self.session.interrupt(IrqIndex.MSIX if msix else IrqIndex.INTX, 0)
        self.queues[0] = HostQueue(0, admin_entries, sq, cq, interrupt)
        await self.write32(Reg.CC, CC_EN | CC_IO_ENTRY_SIZES)
        await self.wait_ready(True)

    # Commands

    def submit(self, qid: int, opcode: int, *, nsid: int = 0, prp1: int = 0, prp2: int = 0,
               cdw: tuple[int, ...] = ()) -> asyncio.Future[Completion]:  # fmt: skip
        """Put a command on a submission queue (the doorbell rings in `ring`)."""
        queue = self.queues[qid]
        cid = queue.next_cid
        queue.next_cid = (cid + 1) % 0xFFFF
        dwords = (*cdw, 0, 0, 0, 0, 0, 0)[:6]
        entry = Command(opcode, 0, cid, nsid, 0, prp1, prp2, *dwords).pack()
        self.view(queue.sq + queue.tail * SQE_SIZE, SQE_SIZE)[:] = entry
        queue.tail = (queue.tail + 1) % queue.entries
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        queue.waiting[cid] = future
        return future

    async def ring(self, qid: int) -> None:
        await self.write32(0x1000 + 8 * qid, self.queues[qid].tail, posted=True)

    async def command(self, qid: int, opcode: int, **fields: object) -> Completion:
        future = self.submit(qid, opcode, **fields)  # type: ignore[arg-type]
        await self.ring(qid)
        return await self.wait(qid, future)

    async def wait(self, qid: int, future: asyncio.Future[Completion]) -> Completion:
        """Reap completions (on each interrupt) until `future`'s arrives."""
        queue = self.queues[qid]
        async with asyncio.timeout(WAIT):
            while not future.done():
                if not await self.reap(queue):
                    await queue.interrupt.wait(WAIT)
        return future.result()

    async def reap(self, queue: HostQueue) -> int:
        """Take every completion whose phase tag says it is new; ring the head."""
        taken = 0
        while True:
            raw = bytes(self.view(queue.cq + queue.head * CQE_SIZE, CQE_SIZE))
            result, sq_head, sq_id, cid, status, phase = unpack_completion(raw)
            if phase != queue.phase:
                break
            queue.head = (queue.head + 1) % queue.entries
            if queue.head == 0:
                queue.phase ^= 1
            future = queue.waiting.pop(cid, None)
            if future is not None and not future.done():
                future.set_result(Completion(result, sq_head, sq_id, cid, status))
            taken += 1
        if taken:
            await self.write32(0x1000 + 8 * queue.qid + 4, queue.head, posted=True)
        return taken

    async def identify(self, cns: int, nsid: int = 0) -> tuple[Completion, bytes]:
        buffer = self.allocate(PAGE_SIZE)
        done = await self.command(0, AdminOpcode.IDENTIFY, nsid=nsid, prp1=buffer, cdw=(cns,))
        return done, bytes(self.view(buffer, PAGE_SIZE))

    async def create_queue_pair(self, qid: int, entries: int, vector: int) -> None:
        cq, sq = self.allocate(entries * CQE_SIZE), self.allocate(entries * SQE_SIZE)
        size = (entries - 1) << 16 | qid
        done = await self.command(
            0, AdminOpcode.CREATE_IO_CQ, prp1=cq, cdw=(size, vector << 16 | 0x3)
        )
        assert done.code == 0, f"create CQ {qid}: status {done.status:#x}"
        done = await self.command(
            0, AdminOpcode.CREATE_IO_SQ, prp1=sq, cdw=(size, qid << 16 | 0x1)
        )
        assert done.code == 0, f"create SQ {qid}: status {done.status:#x}"
        interrupt = await self.session.interrupt(IrqIndex.MSIX, vector)
        self.queues[qid] = HostQueue(qid, entries, sq, cq, interrupt)

    def prps(self, buffer: int, size: int) -> tuple[int, int]:
        """PRP1 and PRP2 for `size` bytes at `buffer` (page-aligned after its first
        page): a second page, or a PRP list."""
        first = PAGE_SIZE - buffer % PAGE_SIZE
        if size <= first:
            return buffer, 0
        pages = [buffer + first + offset for offset in range(0, size - first, PAGE_SIZE)]
        if len(pages) == 1:
            return buffer, pages[0]
        listing = self.allocate(8 * len(pages))
        self.view(listing, 8 * len(pages))[:] = struct.pack(f"<{len(pages)}Q", *pages)
        return buffer, listing

    async def shutdown(self) -> int:
        """CC.SHN normal, then wait for CSTS.SHST complete; returns CSTS."""
        cc = await self.read32(Reg.CC)
        await self.write32(Reg.CC, cc | 1 << 14)
        async with asyncio.timeout(WAIT):
            while (csts := await self.read32(Reg.CSTS)) >> 2 & 3 != 2:
                await asyncio.sleep(0.001)
        return csts


def pattern(size: int, seed: int = 0) -> bytes:
    """Reproducible bytes that differ from block to block."""
    return random.Random(seed).randbytes(size)
