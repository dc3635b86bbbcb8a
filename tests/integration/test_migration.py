"""Migrating a stateful device from one muser server to another with the client."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import time
from collections.abc import AsyncIterator

import pytest

import muser
from muser import Bar, Client, Migration, MigrationState, Server, VfioUserError
from muser.device import migration
from muser.device.irq import Delivery
from muser.device.regions import SharedMemory
from muser.wire.constants import Command, FeatureFlag, IrqSetFlag, MigrationFlag
from muser.wire.messages import DmaLoggingReport, DmaLoggingStart, MigData, MigDataRead
from muser_samples import timer

S = MigrationState
TRIGGER_EVENTFD = IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.DATA_EVENTFD


class Stateful(muser.PciDevice):
    """Registers of its own (saved as several chunks), a mappable BAR, MSI-X."""

    def __init__(self, *, p2p: bool = False, fail_on: S | None = None) -> None:
        self.registers = bytearray(64)
        self.hops: list[tuple[S, S]] = []
        self.fail_on = fail_on
        self.loaded = 0
        super().__init__(
            vendor_id=0x1234,
            device_id=0x5AFE,
            bars={
                0: Bar(0x1000, read=self.read, write=self.write),
                2: Bar(0x4000, shared=SharedMemory(areas=((0, 0x2000),))),
            },
            capabilities=[
                muser.MsiX(
                    table_size=4, table_bar=2, table_offset=0x2000, pba_bar=2, pba_offset=0x3000
                )
            ],
            migration=Migration(pre_copy=True, p2p=p2p),
        )

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.registers[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        self.registers[offset : offset + len(data)] = data

    async def migration_transition(self, old: S, new: S) -> None:
        await asyncio.sleep(0)
        if new == self.fail_on:
            raise VfioUserError(errno.EIO, "the device cannot")
        self.hops.append((old, new))

    async def save_state(self, phase: S) -> AsyncIterator[bytes]:
        if phase == S.PRE_COPY:
            yield b"pre-copy:" + bytes(self.registers[:32])
        else:
            for start in range(0, 64, 16):
                yield bytes(self.registers[start : start + 16])

    async def load_state(self, chunks: AsyncIterator[bytes]) -> None:
        received = [chunk async for chunk in chunks]
        if len(received) != 5 or not received[0].startswith(b"pre-copy:"):
            raise VfioUserError(errno.EINVAL, "not my state")
        self.registers[:] = b"".join(received[1:])
        self.loaded += 1


@pytest.fixture
async def pair(sock_dir: str) -> AsyncIterator[tuple[Stateful, Client, Stateful, Client]]:
    source, destination = Stateful(), Stateful()
    async with (
        Server(source, os.path.join(sock_dir, "source.sock")) as source_server,
        Server(destination, os.path.join(sock_dir, "destination.sock")) as destination_server,
        await Client.connect(source_server.path, max_data_xfer_size=4096) as source_client,
        await Client.connect(destination_server.path) as destination_client,
    ):
        yield source, source_client, destination, destination_client


async def test_migrate_a_stateful_device(pair: tuple[Stateful, Client, Stateful, Client]) -> None:
    source, src, destination, dst = pair
    guest_fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(guest_fd, 0x10000)
    await src.dma_map(0x100000, 0x10000, fd=guest_fd)
    await src.device_feature(FeatureFlag.SET | 6, DmaLoggingStart(4096, 0, 0, ()).build())
    await src.region_write(0, 0, bytes(range(64)))
    await src.region_write(7, 0x10, (0xFE000000).to_bytes(4, "little"))
    msix_control = source.config.offset_of(source.config.capabilities[0][0]) + 2
    await src.region_write(7, msix_control, b"\x00\xc0")
    eventfd = os.eventfd(0, os.EFD_NONBLOCK)
    await src.set_irqs(2, TRIGGER_EVENTFD, 0, 1, fds=[eventfd])
    assert source.irqs.msix.trigger(0) is Delivery.PENDING, "function-masked"
    source.shared_memory(2)[0x1000:0x1005] = b"bar-2"
    source.dma.write_direct(0x103000, b"dirty")

    report = await muser.migrate(src, dst, pre_copy_rounds=3, chunk_size=4096)

    assert report.pre_copy_rounds >= 1
    assert report.pre_copy_bytes > 0x4000, "the mappable BAR went in pre-copy"
    assert await src.migration_state() == S.STOP
    assert await dst.migration_state() == S.RUNNING
    assert destination.loaded == 1
    assert destination.registers == bytes(range(64))
    assert destination.config.read(0, 256) == source.config.read(0, 256)
    assert bytes(destination.shared_memory(2)) == bytes(source.shared_memory(2))
    assert await dst.region_read(2, 0x3000, 8) == b"\x01" + bytes(7), "the PBA bit came along"
    bitmap = await src.device_feature(
        FeatureFlag.GET | 8,
        DmaLoggingReport(0x100000, 0x10000, 4096, b"").build(),
        argsz=8 + 24 + 8,
    )
    assert DmaLoggingReport.parse(bitmap.data).bitmap == (1 << 3).to_bytes(8, "little")
    assert source.hops == [
        (S.RUNNING, S.PRE_COPY),
        (S.PRE_COPY, S.STOP_COPY),
        (S.STOP_COPY, S.STOP),
    ]
    assert destination.hops == [
        (S.RUNNING, S.STOP),
        (S.STOP, S.RESUMING),
        (S.RESUMING, S.STOP),
        (S.STOP, S.RUNNING),
    ]

    # The destination keeps working: the pending vector goes out once unmasked.
    destination_fd = os.eventfd(0, os.EFD_NONBLOCK)
    await dst.set_irqs(2, TRIGGER_EVENTFD, 0, 1, fds=[destination_fd])
    await dst.region_write(7, msix_control, b"\x00\x80")
    assert os.eventfd_read(destination_fd) == 1
    await dst.region_write(0, 8, b"new")
    assert destination.registers[8:11] == b"new"
    for fd in (guest_fd, eventfd, destination_fd):
        os.close(fd)


async def test_reads_are_full_chunks_then_short_then_empty(
    pair: tuple[Stateful, Client, Stateful, Client],
) -> None:
    _source, src, _destination, _dst = pair
    await src.set_migration_state(S.STOP_COPY)
    sizes = []
    while True:
        data = await src.mig_data_read(4096)
        sizes.append(len(data))
        if not data:
            break
    assert sizes[-1] == 0
    assert sizes[-2] < 4096
    assert all(size == 4096 for size in sizes[:-2])


async def test_p2p_states(sock_dir: str) -> None:
    device = Stateful(p2p=True)
    async with (
        Server(device, os.path.join(sock_dir, "p2p.sock")) as server,
        await Client.connect(server.path) as client,
    ):
        flags = await client.migration_flags()
        assert flags == MigrationFlag.STOP_COPY | MigrationFlag.PRE_COPY | MigrationFlag.P2P
        await client.set_migration_state(S.STOP)
        await client.set_migration_state(S.PRE_COPY_P2P)
        assert device.hops == [
            (S.RUNNING, S.RUNNING_P2P),
            (S.RUNNING_P2P, S.STOP),
            (S.STOP, S.RUNNING_P2P),
            (S.RUNNING_P2P, S.PRE_COPY_P2P),
        ]
        assert await client.mig_data_read(4096), "PRE_COPY_P2P streams data too"
        assert device.irqs.msix.count == 4
        assert not device.irqs.running, "P2P states hold interrupts back"


async def test_without_p2p_its_states_are_refused(
    pair: tuple[Stateful, Client, Stateful, Client],
) -> None:
    source, src, _destination, _dst = pair
    for state in (S.RUNNING_P2P, S.PRE_COPY_P2P, S.ERROR, 8):
        with pytest.raises(VfioUserError) as caught:
            await src.device_feature(
                FeatureFlag.SET | 2, int(state).to_bytes(4, "little") + bytes(4)
            )
        assert caught.value.errno == errno.EINVAL
    assert await src.migration_state() == S.RUNNING
    assert source.hops == []


async def test_impossible_target_leaves_the_state(
    pair: tuple[Stateful, Client, Stateful, Client],
) -> None:
    _source, src, _destination, _dst = pair
    await src.set_migration_state(S.STOP_COPY)
    with pytest.raises(VfioUserError) as caught:
        await src.set_migration_state(S.PRE_COPY)
    assert caught.value.errno == errno.EINVAL
    assert await src.migration_state() == S.STOP_COPY


async def test_failing_hook_means_error_until_reset(sock_dir: str) -> None:
    device = Stateful(fail_on=S.STOP)
    async with (
        Server(device, os.path.join(sock_dir, "fail.sock")) as server,
        await Client.connect(server.path) as client,
    ):
        with pytest.raises(VfioUserError) as caught:
            await client.set_migration_state(S.STOP_COPY)
        assert caught.value.errno == errno.EIO
        assert await client.migration_state() == S.ERROR
        with pytest.raises(VfioUserError):
            await client.set_migration_state(S.RUNNING)
        assert await client.region_read(0, 0, 4) == bytes(4), "registers still answer"
        await client.reset()
        assert await client.migration_state() == S.RUNNING


async def test_commands_refused_by_state(pair: tuple[Stateful, Client, Stateful, Client]) -> None:
    source, src, _destination, _dst = pair

    async def refused(command: int, payload: bytes) -> None:
        reply = await src.exchange(command, payload)
        assert (reply.is_error, reply.error) == (True, errno.EINVAL)

    read = MigDataRead(8 + 64, 64).build()
    write = MigData(8 + 4, 4, b"junk").build()
    await refused(Command.MIG_DATA_READ, read)
    await refused(Command.MIG_DATA_WRITE, write)
    await src.set_migration_state(S.STOP)
    await refused(Command.MIG_DATA_READ, read)
    assert source.irqs.msix.trigger(0) is Delivery.DROPPED, "no eventfd: nothing to hold"
    with pytest.raises(VfioUserError) as caught:
        source.dma.read_direct(0, 1)
    assert caught.value.errno == errno.EBUSY
    await src.set_migration_state(S.STOP_COPY)
    await refused(Command.MIG_DATA_WRITE, write)
    await refused(Command.MIG_DATA_READ, MigDataRead(8 + 8192, 8192).build())
    await refused(Command.MIG_DATA_READ, MigDataRead(8, 64).build())
    await src.set_migration_state(S.RESUMING)
    await refused(Command.MIG_DATA_READ, read)
    await refused(Command.MIG_DATA_WRITE, MigData(8 + 4, 5, b"junk").build())
    await refused(Command.MIG_DATA_WRITE, MigData(8 + 3, 4, b"junk").build())
    await refused(Command.MIG_DATA_WRITE, MigData(8, 0, b"").build()[:6])
    huge = b"\x01\x00" + (1 << 50).to_bytes(8, "little")
    await refused(Command.MIG_DATA_WRITE, MigData(8 + len(huge), len(huge), huge).build())


async def test_a_bar_larger_than_a_piece_arrives_whole(
    pair: tuple[Stateful, Client, Stateful, Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mappable BAR memory is streamed a piece at a time and put back piece by
    piece, the pieces cut across the MIG_DATA messages that carry them."""
    source, src, destination, dst = pair
    monkeypatch.setattr(migration, "BAR_PIECE", 0x700)
    source.shared_memory(2)[:0x2000] = os.urandom(0x2000)
    await muser.migrate(src, dst, pre_copy_rounds=1, chunk_size=0x500)
    assert bytes(destination.shared_memory(2)) == bytes(source.shared_memory(2))
    assert destination.registers == source.registers


def bar_device(name: str) -> muser.PciDevice:
    """A mappable BAR of 1 MiB and a device that keeps no state of its own."""
    return muser.PciDevice(
        vendor_id=0x1234,
        device_id=0x5679,
        bars={2: Bar(1 << 20, shared=SharedMemory())},
        migration=Migration(max_device_data=4096),
        name=name,
    )


async def test_a_pre_copied_bar_is_not_charged_to_the_devices_bound(sock_dir: str) -> None:
    """Mappable BAR memory crosses in pre-copy and again in stop-copy; the
    destination's bound on the device's own data must not be charged for it."""
    source, destination = bar_device("src"), bar_device("dst")
    source.shared[2].memory[:6] = b"pages!"
    async with (
        Server(source, os.path.join(sock_dir, "src.sock")) as src_server,
        Server(destination, os.path.join(sock_dir, "dst.sock")) as dst_server,
        await Client.connect(src_server.path) as src,
        await Client.connect(dst_server.path) as dst,
    ):
        await muser.migrate(src, dst, pre_copy_rounds=1)
    assert bytes(destination.shared[2].memory[:6]) == b"pages!"


def stream(*records: tuple[int, bytes]) -> bytes:
    """A migration stream of these records, then its end."""
    return b"".join(
        tag.to_bytes(2, "little") + len(payload).to_bytes(8, "little") + payload
        for tag, payload in (*records, (migration.TAG_END, b""))
    )


@pytest.mark.parametrize(
    "misfit",
    [
        (migration.TAG_SHARED_BAR + 2, bytes(0x3FFF)),
        (migration.TAG_SHARED_BAR + 0, bytes(0x1000)),
        (migration.TAG_SHARED_BAR + 6, b""),
        (migration.TAG_CONFIG, bytes(3)),
    ],
    ids=["bar-size", "bar-not-shared", "bar-beyond-six", "config-size"],
)
async def test_a_record_that_does_not_fit_fails_the_load(
    pair: tuple[Stateful, Client, Stateful, Client], misfit: tuple[int, bytes]
) -> None:
    _source, src, _destination, _dst = pair
    await src.set_migration_state(S.RESUMING)
    await src.mig_data_write(stream(misfit))
    with pytest.raises(VfioUserError) as caught:
        await src.set_migration_state(S.STOP)
    assert caught.value.errno == errno.EINVAL
    assert await src.migration_state() == S.ERROR


@pytest.mark.parametrize(
    "misfit",
    [
        (migration.TAG_CONFIG, bytes(3)),
        (migration.TAG_SHARED_BAR + 0, bytes(0x1000)),
        (migration.TAG_INTERRUPTS, bytes(1)),
    ],
    ids=["config", "bar", "interrupts"],
)
async def test_a_refused_load_applies_none_of_muser_s_records(
    pair: tuple[Stateful, Client, Stateful, Client], misfit: tuple[int, bytes]
) -> None:
    """muser's records are all checked before any is applied: a record that does
    not fit, before or after the others, leaves config space and the mapped BAR
    (which the client sees) as they were."""
    source, src, _destination, _dst = pair
    config = bytearray(source.config.read(0, source.config.size))
    config[0x3C] = 0x5A  # Interrupt Line, writable
    good = [(migration.TAG_SHARED_BAR + 2, b"\xaa" * 0x4000), (migration.TAG_CONFIG, config)]
    for records in ([misfit, *good], [*good, misfit]):
        before = source.config.read(0, source.config.size)
        await src.set_migration_state(S.RESUMING)
        await src.mig_data_write(stream(*records))
        with pytest.raises(VfioUserError) as caught:
            await src.set_migration_state(S.STOP)
        assert caught.value.errno == errno.EINVAL
        assert source.config.read(0, source.config.size) == before
        assert bytes(source.shared_memory(2)) == bytes(0x4000)
        await src.reset()


async def test_incomplete_stream_fails_the_load(
    pair: tuple[Stateful, Client, Stateful, Client],
) -> None:
    _source, src, _destination, _dst = pair
    await src.set_migration_state(S.RESUMING)
    await src.mig_data_write(b"\x00\x02" + (3).to_bytes(8, "little") + b"abc")
    with pytest.raises(VfioUserError) as caught:
        await src.set_migration_state(S.STOP)
    assert caught.value.errno == errno.EINVAL
    assert await src.migration_state() == S.ERROR


async def test_interrupts_wait_while_stopped(
    pair: tuple[Stateful, Client, Stateful, Client],
) -> None:
    source, src, _destination, _dst = pair
    msix_control = source.config.offset_of(source.config.capabilities[0][0]) + 2
    await src.region_write(7, msix_control, b"\x00\x80")
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    await src.set_irqs(2, TRIGGER_EVENTFD, 0, 1, fds=[fd])
    await src.set_migration_state(S.STOP)
    assert source.irqs.msix.trigger(0) is Delivery.PENDING
    await src.set_migration_state(S.RUNNING)
    assert os.eventfd_read(fd) == 1
    os.close(fd)


async def test_device_without_migration(client: Client) -> None:
    for flags in (FeatureFlag.GET | 1, FeatureFlag.GET | 2, FeatureFlag.PROBE | 1):
        with pytest.raises(VfioUserError) as caught:
            await client.device_feature(flags, argsz=16)
        assert caught.value.errno == errno.EINVAL
    reply = await client.exchange(Command.MIG_DATA_READ, MigDataRead(8 + 64, 64).build())
    assert (reply.is_error, reply.error) == (True, errno.EINVAL)


class TestTimerSample:
    @pytest.fixture
    async def served(self, sock_dir: str) -> AsyncIterator[tuple[timer.Timer, Client]]:
        device = timer.create()
        async with (
            Server(device, os.path.join(sock_dir, "timer.sock")) as server,
            await Client.connect(server.path, max_data_xfer_size=1024) as client,
        ):
            yield device, client

    async def test_registers(self, served: tuple[timer.Timer, Client]) -> None:
        device, client = served
        config = await client.region_read(7, 0, 0x30)
        assert config[0:4] == b"\xad\xde\xef\xbe"
        assert config[0x2C:0x30] == b"\xfe\xca\xbe\xba"
        assert (await client.get_region_info(1, argsz=80))[0].size == 0x3000
        await client.region_write(0, 0, (int(time.time()) - 5).to_bytes(8, "little"))
        assert 5 <= int.from_bytes(await client.region_read(0, 0, 8), "little") <= 7
        for offset, count in ((0, 4), (4, 4)):
            reply = await client.exchange(
                Command.REGION_READ,
                offset.to_bytes(8, "little")
                + (0).to_bytes(4, "little")
                + count.to_bytes(4, "little"),
            )
            assert reply.error == errno.EINVAL
        await client.region_write(1, 0x1800, b"middle")
        assert bytes(device.shared_memory(1)[0x1800:0x1806]) == b"middle"

    async def test_the_timer_runs_only_while_a_client_is_attached(self, sock_dir: str) -> None:
        device = timer.create()
        async with Server(device, os.path.join(sock_dir, "timer.sock")) as server:
            async with await Client.connect(server.path) as client:
                await client.region_write(0, 0, (int(time.time()) + 60).to_bytes(8, "little"))
                assert device._timer is not None
            connection = server.connection
            assert connection is not None
            await connection.finished.wait()
            assert device._timer is None, "disarmed when its client left"
            async with await Client.connect(server.path):
                async with asyncio.timeout(5):
                    while device._timer is None:
                        await asyncio.sleep(0.001)
            assert device.deadline > time.time()

    async def test_expiry_interrupts_and_does_dma(
        self, served: tuple[timer.Timer, Client]
    ) -> None:
        device, client = served
        windows = []
        for index in range(2):
            fd = os.memfd_create(f"ram{index}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, 0x2000)
            memory = mmap.mmap(fd, 0x2000)
            await client.dma_map(0x100000 * (index + 1), 0x2000, fd=fd, backing=memory)
            os.close(fd)
            windows.append(memory)
        interrupt = os.eventfd(0, os.EFD_NONBLOCK)
        await client.set_irqs(0, TRIGGER_EVENTFD, 0, 1, fds=[interrupt])
        await client.region_write(0, 0, int(time.time()).to_bytes(8, "little"))
        for _ in range(500):
            if device.dma_matched:
                break
            await asyncio.sleep(0.01)
        assert device.dma_matched == [True]
        assert os.eventfd_read(interrupt) == 1
        assert windows[1][:4096] == timer.PATTERN, "written directly"
        assert windows[0][:4096] == timer.PATTERN, "written by DMA_WRITE messages"
        os.close(interrupt)

    async def test_migration_rearms_on_the_destination(self, sock_dir: str) -> None:
        source, destination = timer.create(), timer.create()
        async with (
            Server(source, os.path.join(sock_dir, "a.sock")) as a,
            Server(destination, os.path.join(sock_dir, "b.sock")) as b,
            await Client.connect(a.path) as src,
            await Client.connect(b.path) as dst,
        ):
            deadline = int(time.time()) + 3600
            await src.region_write(0, 0, deadline.to_bytes(8, "little"))
            source.shared_memory(1)[0x2000:0x2004] = b"file"
            await muser.migrate(src, dst)
            assert destination.deadline == deadline
            assert bytes(destination.shared_memory(1)[0x2000:0x2004]) == b"file"
            assert destination._timer is not None
            assert source._timer is None
