"""edu: QEMU's educational PCI device (1234:11e8), from its public specification
(QEMU's docs/specs/edu.rst). It exercises MMIO, DMA and interrupts together, the
way a small real device does, and Linux guests have drivers written for it.

    python -m muser.run edu --socket /tmp/edu.sock

BAR0 is 1 MiB of MMIO; only 4-byte accesses below 0x80 and 4- or 8-byte accesses
from 0x80 on are valid (others read all ones and are ignored):

    0x00 identification (0x010000ed)     0x04 liveness: reads back ~value
    0x08 factorial: write n, read n!     0x20 status: 0x01 computing, 0x80 IRQ when done
    0x24 interrupt status                0x60 raise interrupt (OR into status)
    0x64 acknowledge interrupt (clear)   0x80 DMA source   0x88 DMA destination
    0x90 DMA count                       0x98 DMA command: 0x01 start, 0x02 device→RAM,
                                                            0x04 interrupt 0x100 when done

The DMA engine moves data between guest memory and a 4 KiB buffer that sits at
DMA address 0x40000. Factorials and transfers run in tasks after the register
write is answered (a transfer through DMA messages must not be awaited while the
client waits for that write). Interrupts go out as MSI once the guest enables
it, as INTx otherwise, and stay raised until acknowledged.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from typing import Any

import structlog

import muser

_log = structlog.get_logger("muser_samples.edu")

VENDOR_ID = 0x1234
DEVICE_ID = 0x11E8
CLASS_OTHER = 0xFF0000
IDENTIFICATION = 0x010000ED
BAR_SIZE = 1 << 20
BUFFER_ADDRESS = 0x40000
BUFFER_SIZE = 4096
DMA_MASK = (1 << 28) - 1
"""The device drives 28 address bits (256 MiB), as QEMU's edu does by default."""

ID, LIVENESS, FACTORIAL, STATUS, IRQ_STATUS = 0x00, 0x04, 0x08, 0x20, 0x24
IRQ_RAISE, IRQ_ACK = 0x60, 0x64
DMA_SOURCE, DMA_DESTINATION, DMA_COUNT, DMA_COMMAND = 0x80, 0x88, 0x90, 0x98
STATUS_COMPUTING, STATUS_IRQ_ON_FACTORIAL = 0x01, 0x80
DMA_START, DMA_TO_RAM, DMA_IRQ = 0x01, 0x02, 0x04
FACTORIAL_IRQ, DMA_IRQ_VALUE = 0x01, 0x100


class Edu(muser.PciDevice):
    def __init__(self) -> None:
        self.msi = muser.Msi(vectors=1)
        self.tasks: set[asyncio.Task[None]] = set()
        self.power_on()
        super().__init__(
            vendor_id=VENDOR_ID,
            device_id=DEVICE_ID,
            revision=0x10,
            class_code=CLASS_OTHER,
            intx=True,
            bars={0: muser.Bar(BAR_SIZE, read=self.read, write=self.write)},
            capabilities=[self.msi],
            name="edu",
        )

    def power_on(self) -> None:
        self.liveness = 0
        self.factorial = 0
        self.status = 0
        self.irq_status = 0
        self.dma_registers = {DMA_SOURCE: 0, DMA_DESTINATION: 0, DMA_COUNT: 0, DMA_COMMAND: 0}
        self.buffer = bytearray(BUFFER_SIZE)

    # MMIO

    def read(self, offset: int, count: int) -> bytes:
        registers = {
            ID: IDENTIFICATION,
            LIVENESS: self.liveness,
            FACTORIAL: self.factorial,
            STATUS: self.status,
            IRQ_STATUS: self.irq_status,
            **self.dma_registers,
        }
        if not self.valid(offset, count) or offset not in registers:
            return b"\xff" * count
        return (registers[offset] & ((1 << 8 * count) - 1)).to_bytes(count, "little")

    def write(self, offset: int, data: bytes) -> None:
        if not self.valid(offset, len(data)):
            return
        value = int.from_bytes(data, "little")
        if offset == LIVENESS:
            self.liveness = ~value & 0xFFFFFFFF
        elif offset == FACTORIAL and not self.status & STATUS_COMPUTING:
            self.factorial = value
            self.status |= STATUS_COMPUTING
            self.start(self.compute_factorial())
        elif offset == STATUS:
            self.status = (self.status & STATUS_COMPUTING) | (value & STATUS_IRQ_ON_FACTORIAL)
        elif offset == IRQ_RAISE:
            self.raise_irq(value)
        elif offset == IRQ_ACK:
            self.lower_irq(value)
        elif offset in self.dma_registers and not self.dma_registers[DMA_COMMAND] & DMA_START:
            self.dma_registers[offset] = value
            if offset == DMA_COMMAND and value & DMA_START:
                self.start(self.transfer())

    @staticmethod
    def valid(offset: int, count: int) -> bool:
        return count == 4 or (offset >= DMA_SOURCE and count == 8)

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` after this access is answered, keeping a reference to it."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # The work behind the registers

    async def compute_factorial(self) -> None:
        await asyncio.sleep(0)
        # n! has at least 32 factors of two from n = 34 on, so it wraps to 0 in 32 bits.
        n = self.factorial
        self.factorial = math.factorial(n) & 0xFFFFFFFF if n < 34 else 0
        self.status &= ~STATUS_COMPUTING
        if self.status & STATUS_IRQ_ON_FACTORIAL:
            self.raise_irq(FACTORIAL_IRQ)

    async def transfer(self) -> None:
        command = self.dma_registers[DMA_COMMAND]
        count = self.dma_registers[DMA_COUNT]
        to_ram = bool(command & DMA_TO_RAM)
        ram = (
            self.dma_registers[DMA_DESTINATION] if to_ram else self.dma_registers[DMA_SOURCE]
        ) & DMA_MASK
        device = self.dma_registers[DMA_SOURCE if to_ram else DMA_DESTINATION]
        start = device - BUFFER_ADDRESS
        if start >= 0 and start + count <= BUFFER_SIZE:
            try:
                if to_ram:
                    await self.dma.write(ram, self.buffer[start : start + count])
                else:
                    self.buffer[start : start + count] = await self.dma.read(ram, count)
            except muser.VfioUserError as exc:
                # A bad guest address: dropped, as on the real device, but said.
                _log.warning("DMA transfer dropped", address=hex(ram), count=count, error=str(exc))
        self.dma_registers[DMA_COMMAND] = command & ~DMA_START
        if command & DMA_IRQ:
            self.raise_irq(DMA_IRQ_VALUE)

    # Interrupts

    def msi_enabled(self) -> bool:
        control = self.config.register(self.config.offset_of(self.msi) + muser.Msi.CONTROL, 2)
        return bool(control & muser.Msi.ENABLE)

    def raise_irq(self, value: int) -> None:
        self.irq_status |= value
        if self.msi_enabled():
            self.irqs.msi.trigger(0)
        else:
            self.irqs.intx.set_level(True)

    def lower_irq(self, value: int) -> None:
        self.irq_status &= ~value
        if not self.irq_status and not self.msi_enabled():
            self.irqs.intx.set_level(False)

    def reset(self, reason: muser.ResetReason) -> None:
        if reason is not muser.ResetReason.LOST_CONNECTION:
            for task in self.tasks:
                task.cancel()
            self.power_on()


def create() -> Edu:
    return Edu()
