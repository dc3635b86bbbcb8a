"""muser.testing, used as a device author would: the `muser_attach` fixture from the
installed pytest plugin, guest memory as a memfd and interrupts as eventfds."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest
import structlog

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


class Signals(muser.PciDevice):
    """MSI-X (4 vectors, table and PBA in 64-bit BAR0), MSI (2 vectors), INTx and a
    BAR2 of shared memory with two mappable areas."""

    def __init__(self) -> None:
        super().__init__(
            vendor_id=0x1234,
            device_id=0x5167,
            intx=True,
            bars={
                0: muser.Bar(0x4000, kind=muser.BarKind.MEMORY_64),
                2: muser.Bar(
                    0x4000,
                    shared=muser.SharedMemory(areas=((0, 0x1000), (0x2000, 0x2000))),
                ),
            },
            capabilities=[
                muser.Msi(vectors=2),
                muser.MsiX(table_size=4, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x800),
            ],
        )


async def test_enable_msix_lets_vectors_through(muser_attach: Attach) -> None:
    async with muser_attach(Signals()) as session:
        vector = await session.interrupt(IrqIndex.MSIX, 3)
        msix = session.device.irqs.msix
        assert msix.trigger(3) is muser.Delivery.DROPPED
        with pytest.raises(TimeoutError) as caught:
            await vector.wait(0.01)
        assert str(caught.value) == (
            "no MSIX interrupt on vector 3 in 0.01 s: a trigger now would be dropped or held, "
            "because the guest has not enabled MSI-X (Message Control bit 15)"
        )
        await session.enable_msix()
        assert msix.trigger(3) is muser.Delivery.DELIVERED
        assert await vector.wait(1.0) == 1


async def test_a_masked_vector_is_reported_pending(muser_attach: Attach) -> None:
    async with muser_attach(Signals()) as session:
        vector = await session.interrupt(IrqIndex.MSIX, 1)
        at = await session.capability(muser.MsiX.cap_id)
        await session.client.region_write(7, at + 2, (0x8000 | 0x4000).to_bytes(2, "little"))
        assert session.device.irqs.msix.trigger(1) is muser.Delivery.PENDING
        with pytest.raises(
            TimeoutError, match="it is pending, held back because the guest masked"
        ):
            await vector.wait(0.01)


async def test_enable_msi_and_a_silent_device(muser_attach: Attach) -> None:
    async with muser_attach(Signals()) as session:
        vector = await session.interrupt(IrqIndex.MSI, 1)
        await session.enable_msi(vectors=2)
        with pytest.raises(
            TimeoutError, match="nothing holds it back, so the device has not raised it"
        ):
            await vector.wait(0.01)
        assert session.device.irqs.msi.trigger(1) is muser.Delivery.DELIVERED
        assert await vector.wait(1.0) == 1
        with pytest.raises(ValueError, match="power of two"):
            await session.enable_msi(vectors=3)


async def test_intx_unmask_lets_the_next_interrupt_through(muser_attach: Attach) -> None:
    async with muser_attach(Signals()) as session:
        intx = await session.interrupt(IrqIndex.INTX)
        irq = session.device.irqs.intx
        assert irq.trigger() is muser.Delivery.DELIVERED
        assert await intx.wait(1.0) == 1
        assert irq.trigger() is muser.Delivery.PENDING
        with pytest.raises(
            TimeoutError, match="masked by its last delivery, until the client unmasks"
        ):
            await intx.wait(0.01)
        await intx.unmask()
        assert await intx.wait(1.0) == 1  # the pending one, released by the unmask


async def test_map_region_maps_the_shared_areas(muser_attach: Attach) -> None:
    device = Signals()  # its shared memory is its own, for life
    before = open_fds()
    async with muser_attach(device) as session:
        areas = await session.map_region(2)
        assert [(area.offset, len(area.memory)) for area in areas] == [
            (0, 0x1000),
            (0x2000, 0x2000),
        ]
        areas[1].memory[0x10:0x15] = b"guest"
        assert bytes(session.device.shared_memory(2)[0x2010:0x2015]) == b"guest"
        assert await session.client.region_read(2, 0x2010, 5) == b"guest"
        with pytest.raises(ValueError, match="region 0 cannot be mapped"):
            await session.map_region(0)
    assert open_fds() == before


def test_declaration_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="BAR1 is the upper half of 64-bit BAR0"):
        muser.PciDevice(
            vendor_id=1,
            device_id=1,
            bars={0: muser.Bar(0x4000, kind=muser.BarKind.MEMORY_64)},
            capabilities=[
                muser.MsiX(table_size=1, table_bar=1, table_offset=0, pba_bar=0, pba_offset=0x800)
            ],
        )
    device = muser.PciDevice(vendor_id=1, device_id=1)
    with pytest.raises(
        ValueError, match=r"the device has no INTX: declare it with PciDevice\(intx=True\)"
    ):
        device.irqs.intx.trigger()
    with pytest.raises(
        ValueError, match=r"declare an MsiX\(\) among PciDevice\(capabilities=...\)"
    ):
        device.irqs.msix.trigger(0)


async def test_a_dropped_trigger_is_logged_once_at_debug(muser_attach: Attach) -> None:
    async with muser_attach(Signals()) as session:
        await session.interrupt(IrqIndex.MSIX, 0)
        configured = structlog.get_config()["wrapper_class"]
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
        try:
            with structlog.testing.capture_logs() as logs:
                for _ in range(3):
                    session.device.irqs.msix.trigger(0)
        finally:
            structlog.configure(wrapper_class=configured)
        assert logs == [
            {
                "event": "interrupt dropped",
                "index": "MSIX",
                "vector": 0,
                "reason": "the guest has not enabled MSI-X (Message Control bit 15)",
                "log_level": "debug",
            }
        ]
