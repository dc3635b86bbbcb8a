"""Interrupts end to end: eventfds passed over the socket by the client, fired by
the device, gated by config space, the MSI-X table and SET_IRQS masks."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

import muser
from muser import Bar, Client, Msi, MsiX, Server
from muser.device.irq import Delivery
from muser.pci import Reg
from muser.wire.constants import IrqIndex, IrqInfoFlag, IrqSetFlag
from tests.helpers import open_fds

TRIGGER_EVENTFD = IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.DATA_EVENTFD
TRIGGER_NONE = IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.DATA_NONE
TRIGGER_BOOL = IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.DATA_BOOL
MASK_NONE = IrqSetFlag.ACTION_MASK | IrqSetFlag.DATA_NONE
MASK_BOOL = IrqSetFlag.ACTION_MASK | IrqSetFlag.DATA_BOOL
UNMASK_NONE = IrqSetFlag.ACTION_UNMASK | IrqSetFlag.DATA_NONE
UNMASK_BOOL = IrqSetFlag.ACTION_UNMASK | IrqSetFlag.DATA_BOOL
UNMASK_EVENTFD = IrqSetFlag.ACTION_UNMASK | IrqSetFlag.DATA_EVENTFD
MSIX_TABLE = 0x2000
MSIX_PBA = 0x3000


class IrqDevice(muser.PciDevice):
    def __init__(self) -> None:
        self.msi_cap = Msi(vectors=4, per_vector_masking=True)
        self.msix_cap = MsiX(
            table_size=4, table_bar=0, table_offset=MSIX_TABLE, pba_bar=0, pba_offset=MSIX_PBA
        )
        self.bar0 = bytearray(0x4000)
        super().__init__(
            vendor_id=0x1234,
            device_id=0x11E8,
            intx=True,
            bars={0: Bar(0x4000, read=self.read, write=self.write)},
            capabilities=[self.msi_cap, self.msix_cap],
        )

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.bar0[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        self.bar0[offset : offset + len(data)] = data


@pytest.fixture
def device() -> IrqDevice:
    return IrqDevice()


@pytest.fixture
def eventfds() -> Iterator[list[int]]:
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
    yield fds
    for fd in fds:
        os.close(fd)


@pytest.fixture
async def client(device: IrqDevice, sock_path: str) -> AsyncIterator[Client]:
    async with Server(device, sock_path), await Client.connect(sock_path) as connected:
        yield connected


def counter(fd: int) -> int:
    """Read and reset an eventfd's counter (0 if nothing was signalled)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


async def config_write(client: Client, offset: int, value: int, size: int) -> None:
    await client.region_write(7, offset, value.to_bytes(size, "little"))


async def config_read(client: Client, offset: int, size: int) -> int:
    return int.from_bytes(await client.region_read(7, offset, size), "little")


async def eventually(condition: object) -> None:
    for _ in range(200):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


LINUX_IRQ_FLAGS = {
    IrqIndex.INTX: IrqInfoFlag.EVENTFD | IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED,
    IrqIndex.MSI: IrqInfoFlag.EVENTFD | IrqInfoFlag.NORESIZE,
    IrqIndex.MSIX: IrqInfoFlag.EVENTFD,
    IrqIndex.ERR: IrqInfoFlag.EVENTFD | IrqInfoFlag.NORESIZE,
    IrqIndex.REQ: IrqInfoFlag.EVENTFD | IrqInfoFlag.NORESIZE,
}
"""What Linux's vfio-pci reports per index, vectors or not (MSI-X as on a device
that can add vectors one at a time)."""


async def test_irq_info(client: Client) -> None:
    counts = dict(zip(IrqIndex, (1, 4, 4, 1, 1), strict=True))
    for index, count in counts.items():
        info = await client.get_irq_info(index)
        expected = (16, index, LINUX_IRQ_FLAGS[index], count)
        assert (info.argsz, info.index, info.flags, info.count) == expected


@pytest.mark.parametrize(
    ("payload", "name"),
    [
        (struct.pack("<4I", 16, 0, 5, 0), "index 5"),
        (struct.pack("<4I", 15, 0, 0, 0), "argsz 15"),
        (struct.pack("<3I", 16, 0, 0), "short"),
        (struct.pack("<4I", 16, 0, 0xFFFFFFFF, 0), "index 2**32-1"),
    ],
)
async def test_irq_info_invalid(client: Client, payload: bytes, name: str) -> None:
    reply = await client.exchange(7, payload)
    assert (reply.is_error, reply.error) == (True, errno.EINVAL)


async def test_device_without_interrupts(sock_path: str) -> None:
    """Every index still reports its flags, as Linux and libvfio-user do; count 0
    says it has no vectors."""
    plain = muser.PciDevice(vendor_id=1, device_id=2, err_irq=False, req_irq=False)
    async with Server(plain, sock_path), await Client.connect(sock_path) as client:
        for index, flags in LINUX_IRQ_FLAGS.items():
            info = await client.get_irq_info(index)
            assert (info.flags, info.count) == (flags, 0)
        assert await config_read(client, Reg.INTERRUPT_PIN, 1) == 0
        with pytest.raises(muser.VfioUserError) as caught:
            await client.set_irqs(0, TRIGGER_NONE, 0, 0)
        assert caught.value.errno == errno.EINVAL


class TestIntx:
    async def test_trigger_automask_unmask(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        intx = device.irqs.intx
        assert intx.trigger() is Delivery.DROPPED, "no eventfd yet"
        assert not intx.has_eventfd(0)
        await client.set_irqs(0, TRIGGER_EVENTFD, 0, 1, fds=[eventfds[0]])
        assert intx.has_eventfd(0)
        assert intx.trigger() is Delivery.DELIVERED
        assert counter(eventfds[0]) == 1
        assert intx.trigger() is Delivery.PENDING, "automasked until unmasked"
        assert counter(eventfds[0]) == 0
        assert await config_read(client, Reg.STATUS, 2) == 0x18, "Interrupt Status, Cap List"
        await client.set_irqs(0, UNMASK_NONE, 0, 1)
        assert counter(eventfds[0]) == 1, "the pending interrupt, once"
        assert await config_read(client, Reg.STATUS, 2) == 0x10

    async def test_interrupt_disable(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        await client.set_irqs(0, TRIGGER_EVENTFD, 0, 1, fds=[eventfds[0]])
        await config_write(client, Reg.COMMAND, 0x0400, 2)
        assert device.irqs.intx.trigger() is Delivery.PENDING
        assert counter(eventfds[0]) == 0
        await config_write(client, Reg.COMMAND, 0x0000, 2)
        assert counter(eventfds[0]) == 1

    async def test_level_resignals_on_unmask(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        intx = device.irqs.intx
        await client.set_irqs(0, TRIGGER_EVENTFD, 0, 1, fds=[eventfds[0]])
        assert intx.set_level(True) is Delivery.DELIVERED
        assert counter(eventfds[0]) == 1
        await client.set_irqs(0, UNMASK_NONE, 0, 1)
        assert counter(eventfds[0]) == 1, "still asserted: signalled again"
        intx.set_level(False)
        await client.set_irqs(0, UNMASK_NONE, 0, 1)
        assert counter(eventfds[0]) == 0
        assert not await config_read(client, Reg.STATUS, 2) & 0x8

    async def test_resample_eventfd_unmasks(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        """QEMU with KVM: the resampler signals an eventfd that the server reads."""
        trigger, resample = eventfds[0], eventfds[1]
        await client.set_irqs(0, TRIGGER_EVENTFD, 0, 1, fds=[trigger])
        await client.set_irqs(0, MASK_NONE, 0, 1)
        await client.set_irqs(0, UNMASK_EVENTFD, 0, 1, fds=[resample])
        await client.set_irqs(0, UNMASK_NONE, 0, 1)
        device.irqs.intx.set_level(True)
        assert counter(trigger) == 1
        os.eventfd_write(resample, 1)
        await eventually(lambda: counter(trigger) == 1)
        device.irqs.intx.set_level(False)
        os.eventfd_write(resample, 1)
        await eventually(lambda: not device.irqs.intx.is_masked(0))
        assert counter(trigger) == 0

    async def test_disable_closes_eventfds(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        before = open_fds()
        await client.set_irqs(0, TRIGGER_EVENTFD, 0, 1, fds=[eventfds[0]])
        await client.set_irqs(0, UNMASK_EVENTFD, 0, 1, fds=[eventfds[1]])
        assert len(open_fds()) == len(before) + 2
        await client.set_irqs(0, TRIGGER_NONE, 0, 0)
        assert open_fds() == before
        assert not device.irqs.intx.enabled
        assert device.irqs.intx.trigger() is Delivery.DROPPED


class TestMsi:
    async def test_enable_and_multiple_message_enable(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        msi = device.irqs.msi
        base = device.config.offset_of(device.msi_cap)
        await client.set_irqs(1, TRIGGER_EVENTFD, 0, 4, fds=eventfds)
        assert msi.trigger(0) is Delivery.DROPPED, "MSI Enable is clear"
        await config_write(client, base + 2, 0x0021, 2)
        assert msi.trigger(3) is Delivery.DELIVERED
        assert [counter(fd) for fd in eventfds] == [0, 0, 0, 1]
        await config_write(client, base + 2, 0x0011, 2)
        assert msi.trigger(3) is Delivery.DROPPED, "only 2 vectors enabled"
        assert msi.trigger(1) is Delivery.DELIVERED
        assert [counter(fd) for fd in eventfds] == [0, 1, 0, 0]

    async def test_per_vector_mask_and_pending_bits(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        msi = device.irqs.msi
        base = device.config.offset_of(device.msi_cap)
        mask, pending = base + 0x10, base + 0x14
        await client.set_irqs(1, TRIGGER_EVENTFD, 0, 4, fds=eventfds)
        await config_write(client, base + 2, 0x0021, 2)
        await config_write(client, mask, 0b0110, 4)
        assert msi.trigger(1) is Delivery.PENDING
        assert msi.trigger(2) is Delivery.PENDING
        assert msi.trigger(0) is Delivery.DELIVERED
        assert await config_read(client, pending, 4) == 0b0110
        assert [counter(fd) for fd in eventfds] == [1, 0, 0, 0]
        await config_write(client, mask, 0b0100, 4)
        assert [counter(fd) for fd in eventfds] == [0, 1, 0, 0]
        assert await config_read(client, pending, 4) == 0b0100
        await config_write(client, pending, 0, 4)
        assert await config_read(client, pending, 4) == 0b0100, "pending bits are read-only"


class TestMsiX:
    async def enable(self, client: Client, device: IrqDevice, control: int = 0x8000) -> None:
        await config_write(client, device.config.offset_of(device.msix_cap) + 2, control, 2)

    async def test_disabled_until_enabled(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        await client.set_irqs(2, TRIGGER_EVENTFD, 0, 4, fds=eventfds)
        assert device.irqs.msix.trigger(2) is Delivery.DROPPED
        await self.enable(client, device)
        assert device.irqs.msix.trigger(2) is Delivery.DELIVERED
        assert [counter(fd) for fd in eventfds] == [0, 0, 1, 0]

    async def test_untouched_table_does_not_mask(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        """QEMU emulates the table itself; its reset-time masks must not hold vectors."""
        await self.enable(client, device)
        await client.set_irqs(2, TRIGGER_EVENTFD, 0, 1, fds=eventfds[:1])
        assert device.irqs.msix.trigger(0) is Delivery.DELIVERED

    async def test_function_mask_and_pba(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        msix = device.irqs.msix
        await client.set_irqs(2, TRIGGER_EVENTFD, 0, 4, fds=eventfds)
        await self.enable(client, device, 0xC000)
        assert msix.trigger(1) is Delivery.PENDING
        assert msix.trigger(3) is Delivery.PENDING
        assert await client.region_read(0, MSIX_PBA, 8) == (0b1010).to_bytes(8, "little")
        await client.region_write(0, MSIX_PBA, b"\0" * 8)
        assert await client.region_read(0, MSIX_PBA, 8) == (0b1010).to_bytes(8, "little")
        assert [counter(fd) for fd in eventfds] == [0, 0, 0, 0]
        await self.enable(client, device, 0x8000)
        assert [counter(fd) for fd in eventfds] == [0, 1, 0, 1]
        assert await client.region_read(0, MSIX_PBA, 8) == bytes(8)

    async def test_table_entries_and_vector_mask(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        msix = device.irqs.msix
        await client.set_irqs(2, TRIGGER_EVENTFD, 0, 4, fds=eventfds)
        await self.enable(client, device)
        entry = MSIX_TABLE + 16 * 2
        assert await client.region_read(0, entry + 12, 4) == b"\x01\0\0\0", "masked at reset"
        await client.region_write(0, entry, struct.pack("<IIII", 0xFEE0000F, 0x1, 0x4041, 0xFF))
        assert struct.unpack("<IIII", await client.region_read(0, entry, 16)) == (
            0xFEE0000C,
            0x1,
            0x4041,
            0x1,
        )
        assert msix.trigger(2) is Delivery.PENDING
        await client.region_write(0, entry + 12, b"\0\0\0\0")
        assert [counter(fd) for fd in eventfds] == [0, 0, 1, 0]
        assert msix.trigger(2) is Delivery.DELIVERED

    async def test_rest_of_the_bar_reaches_the_device(
        self, client: Client, device: IrqDevice
    ) -> None:
        await client.region_write(0, MSIX_TABLE - 4, b"abcdefgh")
        assert device.bar0[MSIX_TABLE - 4 : MSIX_TABLE] == b"abcd"
        assert device.bar0[MSIX_TABLE : MSIX_TABLE + 4] == bytes(4), "table bytes are muser's"
        data = await client.region_read(0, MSIX_TABLE - 4, 8)
        assert data == b"abcddfgh", "a table entry's address bits 1:0 are reserved"

    async def test_sub_ranges_and_deassign(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        msix = device.irqs.msix
        await self.enable(client, device)
        await client.set_irqs(2, TRIGGER_EVENTFD, 0, 1)
        assert msix.enabled, "QEMU switches MSI-X on with no vector assigned"
        await client.set_irqs(2, TRIGGER_EVENTFD, 2, 2, fds=eventfds[2:])
        assert [msix.trigger(v) for v in range(4)] == [
            Delivery.DROPPED,
            Delivery.DROPPED,
            Delivery.DELIVERED,
            Delivery.DELIVERED,
        ]
        await client.set_irqs(2, TRIGGER_EVENTFD, 3, 1)
        assert msix.trigger(3) is Delivery.DROPPED
        assert msix.trigger(2) is Delivery.DELIVERED

    async def test_replaced_eventfd_is_closed(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        before = open_fds()
        await self.enable(client, device)
        await client.set_irqs(2, TRIGGER_EVENTFD, 0, 1, fds=eventfds[:1])
        await client.set_irqs(2, TRIGGER_EVENTFD, 0, 1, fds=eventfds[1:2])
        assert len(open_fds()) == len(before) + 1
        device.irqs.msix.trigger(0)
        assert [counter(fd) for fd in eventfds[:2]] == [0, 1]


Closer = Callable[[Client, IrqDevice, list[int]], Awaitable[None]]


async def function_mask(client: Client, device: IrqDevice, eventfds: list[int]) -> None:
    await TestMsiX().enable(client, device, 0xC000)


async def msix_disable(client: Client, device: IrqDevice, eventfds: list[int]) -> None:
    await TestMsiX().enable(client, device, 0)


async def table_mask(client: Client, device: IrqDevice, eventfds: list[int]) -> None:
    await client.region_write(0, MSIX_TABLE + 12, b"\1\0\0\0")


async def set_irqs_mask(client: Client, device: IrqDevice, eventfds: list[int]) -> None:
    await client.set_irqs(2, MASK_NONE, 0, 1)


async def new_eventfd(client: Client, device: IrqDevice, eventfds: list[int]) -> None:
    await client.set_irqs(2, TRIGGER_EVENTFD, 0, 1, fds=eventfds[1:2])


async def disable_index(client: Client, device: IrqDevice, eventfds: list[int]) -> None:
    await client.set_irqs(2, TRIGGER_NONE, 0, 0)


async def migration_stop(client: Client, device: IrqDevice, eventfds: list[int]) -> None:
    device.irqs.running = False


async def device_side_mask(client: Client, device: IrqDevice, eventfds: list[int]) -> None:
    control = device.config.offset_of(device.msix_cap) + 2
    device.config.set_register(control, 2, 0xC000)


async def device_reset(client: Client, device: IrqDevice, eventfds: list[int]) -> None:
    await client.reset()


async def intx_disable(client: Client, device: IrqDevice, eventfds: list[int]) -> None:
    await config_write(client, Reg.COMMAND, 0x0400, 2)


async def intx_new_eventfd(client: Client, device: IrqDevice, eventfds: list[int]) -> None:
    await client.set_irqs(0, TRIGGER_EVENTFD, 0, 1, fds=eventfds[1:2])


async def intx_disable_index(client: Client, device: IrqDevice, eventfds: list[int]) -> None:
    await client.set_irqs(0, TRIGGER_NONE, 0, 0)


class TestRememberedDelivery:
    """A trigger that found its vector open remembers the eventfd; every change that
    could close the vector again must make the next trigger decide afresh."""

    @pytest.mark.parametrize(
        ("close", "outcome", "signalled"),
        [
            (function_mask, Delivery.PENDING, [0, 0]),
            (msix_disable, Delivery.DROPPED, [0, 0]),
            (table_mask, Delivery.PENDING, [0, 0]),
            (set_irqs_mask, Delivery.PENDING, [0, 0]),
            (new_eventfd, Delivery.DELIVERED, [0, 1]),
            (disable_index, Delivery.DROPPED, [0, 0]),
            (migration_stop, Delivery.PENDING, [0, 0]),
            (device_side_mask, Delivery.PENDING, [0, 0]),
            (device_reset, Delivery.DROPPED, [0, 0]),
        ],
        ids=lambda value: getattr(value, "__name__", None),
    )
    async def test_msix(
        self,
        client: Client,
        device: IrqDevice,
        eventfds: list[int],
        close: Closer,
        outcome: Delivery,
        signalled: list[int],
    ) -> None:
        msix = device.irqs.msix
        await TestMsiX().enable(client, device)
        await client.region_write(0, MSIX_TABLE + 12, b"\0\0\0\0")  # the client owns the table
        await client.set_irqs(2, TRIGGER_EVENTFD, 0, 1, fds=eventfds[:1])
        assert [msix.trigger(0), msix.trigger(0)] == [Delivery.DELIVERED] * 2
        assert counter(eventfds[0]) == 2
        await close(client, device, eventfds)
        assert msix.trigger(0) is outcome
        assert [counter(fd) for fd in eventfds[:2]] == signalled

    async def test_intx_open_from_unmask_to_delivery(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        """INTx is remembered open from an unmask until the next delivery masks it."""
        intx = device.irqs.intx
        await client.set_irqs(0, TRIGGER_EVENTFD, 0, 1, fds=eventfds[:1])
        for _ in range(3):  # the first decides; each unmask reopens the remembered path
            assert intx.trigger() is Delivery.DELIVERED
            await client.set_irqs(0, UNMASK_NONE, 0, 1)  # the guest's EOI, as QEMU sends it
        assert intx.trigger() is Delivery.DELIVERED
        assert intx.trigger() is Delivery.PENDING, "masked by the delivery"
        assert counter(eventfds[0]) == 4
        await client.set_irqs(0, UNMASK_NONE, 0, 1)
        assert counter(eventfds[0]) == 1, "the held one, at the unmask"
        assert intx.delivered == 5

    @pytest.mark.parametrize(
        ("close", "outcome", "signalled"),
        [
            (intx_disable, Delivery.PENDING, [0, 0]),
            (intx_new_eventfd, Delivery.DELIVERED, [0, 1]),
            (intx_disable_index, Delivery.DROPPED, [0, 0]),
            (migration_stop, Delivery.PENDING, [0, 0]),
            (device_reset, Delivery.DELIVERED, [1, 0]),
        ],
        ids=lambda value: getattr(value, "__name__", None),
    )
    async def test_intx(
        self,
        client: Client,
        device: IrqDevice,
        eventfds: list[int],
        close: Closer,
        outcome: Delivery,
        signalled: list[int],
    ) -> None:
        """A change while INTx waits for its unmask: the unmask must not reopen it
        from what was decided before."""
        intx = device.irqs.intx
        await client.set_irqs(0, TRIGGER_EVENTFD, 0, 1, fds=eventfds[:1])
        assert intx.trigger() is Delivery.DELIVERED
        await client.set_irqs(0, UNMASK_NONE, 0, 1)
        assert intx.trigger() is Delivery.DELIVERED, "by the remembered path"
        assert counter(eventfds[0]) == 2
        await close(client, device, eventfds)
        await client.set_irqs(0, UNMASK_NONE, 0, 1)
        assert intx.trigger() is outcome
        assert [counter(fd) for fd in eventfds[:2]] == signalled

    async def test_msi_vector_mask(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        msi = device.irqs.msi
        base = device.config.offset_of(device.msi_cap)
        await client.set_irqs(1, TRIGGER_EVENTFD, 0, 4, fds=eventfds)
        await config_write(client, base + 2, 0x0021, 2)
        assert msi.trigger(1) is Delivery.DELIVERED
        await config_write(client, base + 0x10, 0b0010, 4)
        assert msi.trigger(1) is Delivery.PENDING
        assert [counter(fd) for fd in eventfds] == [0, 1, 0, 0]

    async def test_vectors_out_of_range_are_refused(self, device: IrqDevice) -> None:
        for vector in (-1, 4):
            with pytest.raises(ValueError, match="MSIX has no vector"):
                device.irqs.msix.trigger(vector)


class TestSetIrqsActions:
    async def test_loopback_trigger_none_and_bool(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        await TestMsiX().enable(client, device)
        await client.set_irqs(2, TRIGGER_EVENTFD, 0, 4, fds=eventfds)
        await client.set_irqs(2, TRIGGER_NONE, 1, 2)
        assert [counter(fd) for fd in eventfds] == [0, 1, 1, 0]
        await client.set_irqs(2, TRIGGER_BOOL, 0, 4, data=b"\1\0\0\1")
        assert [counter(fd) for fd in eventfds] == [1, 0, 0, 1]

    async def test_mask_and_unmask_with_bool(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        msix = device.irqs.msix
        await TestMsiX().enable(client, device)
        await client.set_irqs(2, TRIGGER_EVENTFD, 0, 4, fds=eventfds)
        await client.set_irqs(2, MASK_BOOL, 0, 4, data=b"\0\1\1\0")
        assert [msix.trigger(v) for v in range(4)] == [
            Delivery.DELIVERED,
            Delivery.PENDING,
            Delivery.PENDING,
            Delivery.DELIVERED,
        ]
        await client.set_irqs(2, UNMASK_BOOL, 0, 4, data=b"\0\0\1\0")
        assert [counter(fd) for fd in eventfds] == [1, 0, 1, 1]
        await client.set_irqs(2, UNMASK_NONE, 1, 1)
        assert [counter(fd) for fd in eventfds] == [0, 1, 0, 0]

    async def test_err_and_req(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        await client.set_irqs(3, TRIGGER_EVENTFD, 0, 1, fds=eventfds[:1])
        await client.set_irqs(4, TRIGGER_EVENTFD, 0, 1, fds=eventfds[1:2])
        assert device.irqs.err.trigger() is Delivery.DELIVERED
        assert device.irqs.req.trigger() is Delivery.DELIVERED
        assert [counter(fd) for fd in eventfds[:2]] == [1, 1]
        await client.set_irqs(4, TRIGGER_EVENTFD, 0, 1)
        assert device.irqs.req.trigger() is Delivery.DROPPED

    async def test_reset_clears_pending_and_keeps_eventfds(
        self, client: Client, device: IrqDevice, eventfds: list[int]
    ) -> None:
        await client.set_irqs(0, TRIGGER_EVENTFD, 0, 1, fds=eventfds[:1])
        await client.set_irqs(0, MASK_NONE, 0, 1)
        assert device.irqs.intx.trigger() is Delivery.PENDING
        await client.reset()
        assert not device.irqs.intx.is_pending(0)
        assert not device.irqs.intx.is_masked(0)
        assert device.irqs.intx.trigger() is Delivery.DELIVERED
        assert counter(eventfds[0]) == 1

    async def test_lost_connection_closes_eventfds(
        self, device: IrqDevice, sock_path: str, eventfds: list[int]
    ) -> None:
        before = open_fds()
        async with Server(device, sock_path) as server:
            async with await Client.connect(sock_path) as client:
                await client.set_irqs(2, TRIGGER_EVENTFD, 0, 4, fds=eventfds)
                await client.set_irqs(0, TRIGGER_EVENTFD, 0, 1, fds=eventfds[:1])
                await client.set_irqs(0, UNMASK_EVENTFD, 0, 1, fds=eventfds[1:2])
            while server.connection is not None:
                await asyncio.sleep(0.01)
            assert device.irqs.msix.trigger(0) is Delivery.DROPPED
            assert not device.irqs.intx.enabled
        assert open_fds() == before


def set_irqs(
    argsz: int, flags: int, index: int, start: int, count: int, data: bytes = b""
) -> bytes:
    return struct.pack("<5I", argsz, flags, index, start, count) + data


INVALID = [
    ("empty payload", b"", 0),
    ("short payload", struct.pack("<2I", 0, 0), 0),
    ("argsz 3", set_irqs(3, TRIGGER_NONE, 4, 0, 0), 0),
    ("argsz 19", set_irqs(19, TRIGGER_NONE, 4, 0, 0), 0),
    ("argsz below bool data", set_irqs(20, TRIGGER_BOOL, 2, 0, 2, b"\1\1"), 0),
    ("index 5", set_irqs(20, TRIGGER_NONE, 5, 0, 0), 0),
    ("index 2**32-1", set_irqs(20, TRIGGER_NONE, 0xFFFFFFFF, 0, 0), 0),
    (
        "MASK and UNMASK",
        set_irqs(20, IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK, 2, 0, 0),
        0,
    ),
    ("no action", set_irqs(20, IrqSetFlag.DATA_NONE, 2, 0, 1), 0),
    ("no data type", set_irqs(20, IrqSetFlag.ACTION_TRIGGER, 2, 0, 1), 0),
    ("NONE and BOOL", set_irqs(20, MASK_NONE | IrqSetFlag.DATA_BOOL, 2, 0, 0), 0),
    ("unknown flag 0x40", set_irqs(20, TRIGGER_NONE | 0x40, 2, 0, 1), 0),
    ("unknown flag 2**31", set_irqs(20, TRIGGER_NONE | 0x80000000, 2, 0, 1), 0),
    ("start + count past the end", set_irqs(20, MASK_NONE, 2, 3, 2), 0),
    ("start past the end", set_irqs(20, MASK_NONE, 2, 5, 1), 0),
    ("start + count overflows u32", set_irqs(20, MASK_NONE, 2, 1, 0xFFFFFFFF), 0),
    ("count 0 with start 1", set_irqs(20, TRIGGER_NONE, 2, 1, 0), 0),
    ("count 0 with MASK", set_irqs(20, MASK_NONE, 2, 0, 0), 0),
    ("count 0 with BOOL", set_irqs(20, TRIGGER_BOOL, 2, 0, 0), 0),
    ("ERR with MASK", set_irqs(20, MASK_NONE, 3, 0, 1), 0),
    ("REQ with UNMASK", set_irqs(20, UNMASK_NONE, 4, 0, 1), 0),
    ("ERR count 2", set_irqs(20, TRIGGER_NONE, 3, 0, 2), 0),
    ("BOOL data too short", set_irqs(21, TRIGGER_BOOL, 2, 0, 2, b"\1"), 0),
    ("BOOL data too long", set_irqs(23, TRIGGER_BOOL, 2, 0, 2, b"\1\1\1"), 0),
    ("data with DATA_NONE", set_irqs(21, TRIGGER_NONE, 2, 0, 1, b"\1"), 0),
    ("fds with DATA_NONE", set_irqs(20, TRIGGER_NONE, 2, 0, 1), 1),
    ("fds with DATA_BOOL", set_irqs(21, TRIGGER_BOOL, 2, 0, 1, b"\0"), 1),
    ("fewer fds than count", set_irqs(20, TRIGGER_EVENTFD, 2, 0, 2), 1),
    ("more fds than count", set_irqs(20, TRIGGER_EVENTFD, 2, 0, 1), 2),
    ("fds for count 0", set_irqs(20, TRIGGER_EVENTFD, 2, 0, 0), 1),
    ("not an eventfd", set_irqs(20, TRIGGER_EVENTFD, 2, 0, 1), -1),
    ("index without vectors", set_irqs(20, TRIGGER_NONE, 1, 0, 0), 0),
]


@pytest.fixture
async def sparse_client(sock_path: str) -> AsyncIterator[Client]:
    """A device with MSI-X (4), ERR and REQ, INTx, but no MSI."""
    device = muser.PciDevice(
        vendor_id=1,
        device_id=2,
        intx=True,
        bars={0: Bar(0x4000)},
        capabilities=[
            MsiX(table_size=4, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x1000)
        ],
    )
    async with Server(device, sock_path), await Client.connect(sock_path) as connected:
        yield connected


@pytest.mark.parametrize(("name", "payload", "nfds"), INVALID, ids=[row[0] for row in INVALID])
async def test_invalid_set_irqs(
    sparse_client: Client, name: str, payload: bytes, nfds: int
) -> None:
    before = open_fds()
    fds = [os.memfd_create("not-eventfd")] if nfds < 0 else [os.eventfd(0) for _ in range(nfds)]
    reply = await sparse_client.exchange(8, payload, fds)
    for fd in fds:
        os.close(fd)
    assert (reply.is_error, reply.error) == (True, errno.EINVAL), name
    assert open_fds() == before
    assert (await sparse_client.get_irq_info(2)).count == 4


async def test_mask_with_eventfds_is_not_supported(sparse_client: Client) -> None:
    before = open_fds()
    fd = os.eventfd(0)
    reply = await sparse_client.exchange(
        8, set_irqs(20, IrqSetFlag.ACTION_MASK | IrqSetFlag.DATA_EVENTFD, 0, 0, 1), [fd]
    )
    os.close(fd)
    assert (reply.is_error, reply.error) == (True, errno.ENOTSUP)
    assert open_fds() == before
    await sparse_client.set_irqs(0, IrqSetFlag.ACTION_MASK | IrqSetFlag.DATA_EVENTFD, 0, 1)
