"""The samples, driven as a guest driver would: through the client, over a real
socket, with real eventfds for interrupts and a memfd for guest memory."""

from __future__ import annotations

import asyncio
import mmap
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest

from muser import Client, Server
from muser.testing import DeviceSession
from muser.wire.constants import IrqIndex, IrqSetFlag
from muser_samples import edu, gpio

TRIGGER_EVENTFD = IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.DATA_EVENTFD
Attached = AbstractAsyncContextManager[DeviceSession]


def counter(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


async def until(condition: Callable[[], object], timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition never became true")
        await asyncio.sleep(0.001)


class TestGpio:
    @pytest.fixture
    def device(self) -> gpio.Gpio:
        return gpio.create()

    @pytest.fixture
    async def client(self, device: gpio.Gpio, sock_path: str) -> AsyncIterator[Client]:
        async with Server(device, sock_path), await Client.connect(sock_path) as connected:
            yield connected

    async def register(self, client: Client, offset: int) -> int:
        return (await client.region_read(2, offset, 1))[0]

    async def test_identity(self, client: Client) -> None:
        config = await client.region_read(7, 0, 64)
        assert config[0:4] == b"\x4f\x49\xc8\x0d"
        assert config[9:12] == b"\x00\x80\x11"
        assert config[0x18] == 0x01, "BAR2 is I/O space"
        assert config[0x3D] == 1, "INTA"
        info, _ = await client.get_region_info(2)
        assert info.size == 256
        for index in (0, 3, 4):
            assert (await client.get_irq_info(index)).count == 1

    async def test_outputs_count_inputs(self, client: Client) -> None:
        assert await self.register(client, gpio.IN_0_7) == 0xFF, "every counter is 0"
        await client.region_write(2, gpio.OUT_0_7, b"\x05")
        assert await self.register(client, gpio.OUT_0_7) == 0x05, "outputs read back"
        assert await self.register(client, gpio.IN_0_7) == 0xFA
        await client.region_write(2, gpio.OUT_0_7, b"\x01")
        await client.region_write(2, gpio.OUT_0_7, b"\x01")
        assert await self.register(client, gpio.IN_0_7) == 0xFB, "pin 0 counted to 3"
        await client.region_write(2, gpio.OUT_8_15, b"\x80")
        assert await self.register(client, gpio.OUT_8_15) == 0x80
        assert await self.register(client, gpio.IN_8_15) == 0x7F
        assert await self.register(client, 0x10) == 0

    async def test_change_of_state_interrupt(self, client: Client, device: gpio.Gpio) -> None:
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        await client.set_irqs(0, TRIGGER_EVENTFD, 0, 1, fds=[fd])
        await client.region_write(2, gpio.OUT_0_7, b"\x01")
        assert counter(fd) == 0, "interrupts start disabled"
        await self.register(client, gpio.IRQ_CONTROL)
        await client.region_write(2, gpio.OUT_0_7, b"\x02")
        assert counter(fd) == 1
        assert await self.register(client, gpio.IRQ_STATUS) == gpio.IRQ_PENDING
        assert await client.region_read(7, 6, 1) == b"\x08", "Interrupt Status in config"
        await client.region_write(2, gpio.IN_0_7, b"\x00")
        assert await self.register(client, gpio.IRQ_STATUS) == 0
        await client.region_write(2, gpio.IRQ_CONTROL, b"\x00")
        await client.set_irqs(0, IrqSetFlag.ACTION_UNMASK | IrqSetFlag.DATA_NONE, 0, 1)
        await client.region_write(2, gpio.OUT_0_7, b"\x04")
        assert counter(fd) == 0, "disabled again"
        os.close(fd)

    async def test_reset(self, client: Client) -> None:
        await client.region_write(2, gpio.OUT_0_7, b"\xff")
        await client.reset()
        assert await self.register(client, gpio.OUT_0_7) == 0
        assert await self.register(client, gpio.IN_0_7) == 0xFF


class TestEdu:
    @pytest.fixture
    def device(self) -> edu.Edu:
        return edu.create()

    @pytest.fixture
    async def session(
        self, device: edu.Edu, muser_attach: Callable[..., Attached]
    ) -> AsyncIterator[DeviceSession]:
        async with muser_attach(device) as attached:
            yield attached

    @pytest.fixture
    def client(self, session: DeviceSession) -> Client:
        return session.client

    async def read32(self, client: Client, offset: int) -> int:
        return int.from_bytes(await client.region_read(0, offset, 4), "little")

    async def write32(self, client: Client, offset: int, value: int) -> None:
        await client.region_write(0, offset, value.to_bytes(4, "little"))

    async def write64(self, client: Client, offset: int, value: int) -> None:
        await client.region_write(0, offset, value.to_bytes(8, "little"))

    async def test_identification_and_liveness(self, client: Client) -> None:
        assert await self.read32(client, edu.ID) == 0x010000ED
        assert await self.read32(client, edu.LIVENESS) == 0
        await self.write32(client, edu.LIVENESS, 0x12345678)
        assert await self.read32(client, edu.LIVENESS) == 0xEDCBA987
        assert await client.region_read(0, edu.ID, 2) == b"\xff\xff", "only 4-byte accesses"
        assert await client.region_read(0, 0x10, 4) == b"\xff" * 4
        assert (await client.get_region_info(0))[0].size == 1 << 20

    async def test_factorial_with_interrupt(
        self, session: DeviceSession, client: Client, device: edu.Edu
    ) -> None:
        intx = await session.interrupt(IrqIndex.INTX)
        await self.write32(client, edu.STATUS, edu.STATUS_IRQ_ON_FACTORIAL)
        await self.write32(client, edu.FACTORIAL, 10)
        await until(lambda: not device.status & edu.STATUS_COMPUTING)
        assert await self.read32(client, edu.FACTORIAL) == 3628800
        assert await self.read32(client, edu.IRQ_STATUS) == edu.FACTORIAL_IRQ
        assert await intx.wait() == 1
        await self.write32(client, edu.IRQ_ACK, edu.FACTORIAL_IRQ)
        assert await self.read32(client, edu.IRQ_STATUS) == 0
        assert not device.irqs.intx.level
        await self.write32(client, edu.FACTORIAL, 13)
        await until(lambda: not device.status & edu.STATUS_COMPUTING)
        assert await self.read32(client, edu.FACTORIAL) == 6227020800 & 0xFFFFFFFF

    async def test_raise_and_acknowledge_with_msi(
        self, session: DeviceSession, client: Client, device: edu.Edu
    ) -> None:
        control = device.config.offset_of(device.msi) + 2
        await client.region_write(7, control, b"\x01\x00")
        msi = await session.interrupt(IrqIndex.MSI)
        await self.write32(client, edu.IRQ_RAISE, 0x30)
        assert await msi.wait() == 1
        assert await self.read32(client, edu.IRQ_STATUS) == 0x30
        await self.write32(client, edu.IRQ_ACK, 0x10)
        assert await self.read32(client, edu.IRQ_STATUS) == 0x20

    @pytest.mark.parametrize("shared", [True, False], ids=["memfd", "messages"])
    async def test_dma_both_directions(
        self, client: Client, device: edu.Edu, shared: bool
    ) -> None:
        fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 0x100000)
        ram = mmap.mmap(fd, 0x100000)
        backing = bytearray(0x100000)
        memory: bytearray | mmap.mmap = ram if shared else backing
        if shared:
            await client.dma_map(0, 0x100000, fd=fd)
        else:
            await client.dma_map(0, 0x100000, backing=backing)
        irq = os.eventfd(0, os.EFD_NONBLOCK)
        await client.set_irqs(0, TRIGGER_EVENTFD, 0, 1, fds=[irq])
        payload = os.urandom(100)
        memory[0x10000 : 0x10000 + 100] = payload
        await self.write64(client, edu.DMA_SOURCE, 0x10000)
        await self.write64(client, edu.DMA_DESTINATION, edu.BUFFER_ADDRESS + 8)
        await self.write64(client, edu.DMA_COUNT, 100)
        await self.write64(client, edu.DMA_COMMAND, edu.DMA_START | edu.DMA_IRQ)
        await until(lambda: not device.dma_registers[edu.DMA_COMMAND] & edu.DMA_START)
        assert device.buffer[8:108] == payload
        assert await self.read32(client, edu.IRQ_STATUS) == edu.DMA_IRQ_VALUE
        assert counter(irq) == 1
        await self.write32(client, edu.IRQ_ACK, edu.DMA_IRQ_VALUE)
        await self.write64(client, edu.DMA_SOURCE, edu.BUFFER_ADDRESS + 8)
        await self.write64(client, edu.DMA_DESTINATION, 0x20000)
        await self.write64(client, edu.DMA_COMMAND, edu.DMA_START | edu.DMA_TO_RAM)
        await until(lambda: not device.dma_registers[edu.DMA_COMMAND] & edu.DMA_START)
        assert bytes(memory[0x20000 : 0x20000 + 100]) == payload
        assert int.from_bytes(await client.region_read(0, edu.DMA_COUNT, 8), "little") == 100
        ram.close()
        os.close(fd)
        os.close(irq)

    async def test_dma_outside_the_buffer_is_dropped(
        self, client: Client, device: edu.Edu
    ) -> None:
        await self.write64(client, edu.DMA_SOURCE, 0)
        await self.write64(client, edu.DMA_DESTINATION, edu.BUFFER_ADDRESS + 4000)
        await self.write64(client, edu.DMA_COUNT, 200)
        await self.write64(client, edu.DMA_COMMAND, edu.DMA_START)
        await until(lambda: not device.dma_registers[edu.DMA_COMMAND] & edu.DMA_START)
        assert device.buffer == bytearray(edu.BUFFER_SIZE)
