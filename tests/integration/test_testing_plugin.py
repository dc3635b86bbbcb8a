"""muser.testing, used as a device author would: the `muser_attach` fixture from the
installed pytest plugin, guest memory as a memfd and interrupts as eventfds."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest

import muser
from muser.testing import DeviceSession
from muser.wire.constants import IrqIndex
from tests.helpers import open_fds
from tests.integration.test_readme import readme_example

Attach = Callable[..., AbstractAsyncContextManager[DeviceSession]]
COPY_FROM, COPY_TO, GO = 0x0, 0x8, 0x10


class Copier(muser.PciDevice):
    """Writing GO copies 16 bytes of guest memory from COPY_FROM to COPY_TO, after
    the reply, then raises INTx."""

    def __init__(self) -> None:
        self.registers = {COPY_FROM: 0, COPY_TO: 0}
        self.resets: list[muser.ResetReason] = []
        self.tasks: set[asyncio.Task[None]] = set()
        super().__init__(
            vendor_id=0x1234,
            device_id=0xC0DE,
            class_code=0xFF0000,
            intx=True,
            bars={0: muser.Bar(0x1000, read=self.read, write=self.write)},
        )

    def read(self, offset: int, count: int) -> bytes:
        return bytes(count)

    def write(self, offset: int, data: bytes) -> None:
        if offset in self.registers:
            self.registers[offset] = int.from_bytes(data, "little")
        elif offset == GO:
            task = asyncio.get_running_loop().create_task(self.copy())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def copy(self) -> None:
        data = await self.dma.read(self.registers[COPY_FROM], 16)
        await self.dma.write(self.registers[COPY_TO], data)
        self.irqs.intx.trigger()

    def reset(self, reason: muser.ResetReason) -> None:
        self.resets.append(reason)


async def start_copy(session: DeviceSession, source: int, destination: int) -> None:
    await session.client.region_write(0, COPY_FROM, source.to_bytes(8, "little"))
    await session.client.region_write(0, COPY_TO, destination.to_bytes(8, "little"))
    await session.client.region_write(0, GO, bytes(4))


def test_the_plugin_is_installed(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.get_plugin("muser") is not None


def test_importing_muser_does_not_import_pytest() -> None:
    check = "import sys, muser, muser.trace; sys.exit('pytest' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], check=False).returncode == 0


async def test_device_dma_and_interrupt_reach_the_test(muser_attach: Attach) -> None:
    async with muser_attach(Copier()) as session:
        ram = await session.guest_memory(0x10000, 0x2000)
        intx = await session.interrupt(IrqIndex.INTX)
        ram[0x100:0x110] = b"sixteen bytes!!!"
        await start_copy(session, 0x10100, 0x11000)
        assert await intx.wait(2.0) == 1
        assert bytes(ram[0x1000:0x1010]) == b"sixteen bytes!!!"
        assert intx.count == 1


async def test_wait_times_out_when_the_device_stays_silent(muser_attach: Attach) -> None:
    async with muser_attach(Copier()) as session:
        intx = await session.interrupt(IrqIndex.INTX)
        with pytest.raises(TimeoutError):
            await intx.wait(0.05)
        assert intx.fired() == 0


async def test_wait_collects_signals_that_came_before_it(muser_attach: Attach) -> None:
    async with muser_attach(Copier()) as session:
        intx = await session.interrupt(IrqIndex.INTX)
        session.device.irqs.intx.trigger()
        await session.client.set_irqs(IrqIndex.INTX, 0x11, 0, 1)  # UNMASK | DATA_NONE
        session.device.irqs.intx.trigger()
        assert await intx.wait(0.5) == 2


async def test_read_only_memory_refuses_device_writes(muser_attach: Attach) -> None:
    device = Copier()
    async with muser_attach(device) as session:
        ram = await session.guest_memory(0x10000, 0x1000, writable=False)
        ram[:16] = b"guest wrote this"
        with pytest.raises(muser.VfioUserError):
            await device.dma.write(0x10000, b"device")
        assert await device.dma.read(0x10000, 16) == b"guest wrote this"


async def test_leaving_cleans_up_everything(muser_attach: Attach) -> None:
    before = open_fds()
    device = Copier()
    async with muser_attach(device) as session:
        await session.guest_memory(0, 0x1000)
        await session.interrupt(IrqIndex.INTX)
        path = session.server.path
        assert os.path.exists(path)
    assert device.resets == [muser.ResetReason.LOST_CONNECTION]
    assert not os.path.exists(os.path.dirname(path))
    assert open_fds() == before


class Done(muser.PciDevice):
    """The README example's device: a write at 0x10 puts b"done" at guest address
    0x10000, after the reply, and raises INTx."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        super().__init__(
            vendor_id=0x1234,
            device_id=0xD0E,
            class_code=0xFF0000,
            intx=True,
            bars={0: muser.Bar(0x1000, read=self.read, write=self.write)},
        )

    def read(self, offset: int, count: int) -> bytes:
        return bytes(count)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0x10:
            task = asyncio.get_running_loop().create_task(self.finish())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def finish(self) -> None:
        await self.dma.write(0x10000, b"done")
        self.irqs.intx.trigger()


async def test_the_readme_example_works_as_written(muser_attach: Attach) -> None:
    example = readme_example("async def test_copy")
    example["MyDevice"] = Done
    await example["test_copy"](muser_attach)
