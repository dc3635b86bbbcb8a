"""The NVMe sample driven by a small host driver (tests/nvme_driver.py) over a real
socket, with guest memory shared (a memfd) or reached by DMA messages: enabling,
Identify, I/O queue pairs, 4 MiB through PRP lists, interrupts on eventfds, the
statuses a malformed command gets, a full completion queue, shadow doorbells,
reset and shutdown, and data that outlives the server in its backing file."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog

from muser import IrqIndex
from muser.testing import attach
from muser_samples import nvme
from muser_samples.nvme.spec import (
    AERL,
    CQE_SIZE,
    CSTS_RDY,
    MAX_TRANSFER,
    PAGE_SIZE,
    AdminOpcode,
    Cns,
    Feature,
    IoOpcode,
    LogPage,
    Reg,
    Status,
)
from tests.helpers import open_fds
from tests.nvme_driver import Completion, NvmeHost, pattern

NAMESPACE = 64 << 20
BLOCK = 512
DNR = 0x4000


def blocks(count: int) -> int:
    """CDW12's 0's based block count."""
    return count - 1


@pytest.fixture(params=["shared", "messages"])
async def host(request: pytest.FixtureRequest) -> AsyncIterator[NvmeHost]:
    async with attach(nvme.create(size=NAMESPACE)) as session:
        driver = await NvmeHost.attach(session, size=24 << 20, shared=request.param == "shared")
        await driver.enable()
        yield driver


@pytest.fixture
async def shared_host() -> AsyncIterator[NvmeHost]:
    async with attach(nvme.create(size=NAMESPACE, namespaces=2)) as session:
        driver = await NvmeHost.attach(session)
        await driver.enable()
        yield driver


async def io(host: NvmeHost, qid: int, opcode: int, lba: int, buffer: int, size: int) -> int:
    """Read or write `size` bytes at block `lba` of namespace 1; the status."""
    prp1, prp2 = host.prps(buffer, size)
    done = await host.command(
        qid, opcode, nsid=1, prp1=prp1, prp2=prp2, cdw=(lba, 0, blocks(size // BLOCK))
    )
    return done.status


def submit_transfers(
    host: NvmeHost, qid: int, opcode: int, buffer: int, size: int
) -> list[asyncio.Future[Completion]]:
    """`size` bytes at `buffer` as MDTS-sized commands on queue `qid`, block 1 on
    (not yet rung)."""
    futures = []
    for position in range(0, size, MAX_TRANSFER):
        prp1, prp2 = host.prps(buffer + position, MAX_TRANSFER)
        lba, count = (position + BLOCK) // BLOCK, blocks(MAX_TRANSFER // BLOCK)
        futures.append(host.submit(qid, opcode, nsid=1, prp1=prp1, prp2=prp2, cdw=(lba, 0, count)))
    return futures


async def test_identify_queues_and_4_mib_through_prp_lists(host: NvmeHost) -> None:
    done, controller = await host.identify(Cns.CONTROLLER)
    assert done.status == 0
    assert struct.unpack_from("<HH", controller, 0) == (0x1234, 0x1234)
    assert controller[77] == 5  # MDTS: 128 KiB
    assert controller[512:514] == b"\x66\x44"  # SQES, CQES
    done, namespace = await host.identify(Cns.NAMESPACE, nsid=1)
    assert struct.unpack_from("<QQ", namespace, 0) == (NAMESPACE // BLOCK,) * 2
    done, active = await host.identify(Cns.ACTIVE_NAMESPACES)
    assert struct.unpack_from("<II", active, 0) == (1, 0)

    done = await host.command(
        0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 1 << 16 | 1)
    )
    assert done.result == 1 << 16 | 1
    await host.create_queue_pair(1, 64, vector=1)
    await host.create_queue_pair(2, 64, vector=2)

    size = 4 << 20
    data = pattern(size, seed=4)
    source, sink = host.allocate(size + PAGE_SIZE), host.allocate(size + PAGE_SIZE)
    host.view(source + BLOCK, size)[:] = data  # off a page boundary: PRP1 has an offset
    writes = submit_transfers(host, 1, IoOpcode.WRITE, source + BLOCK, size)
    await host.ring(1)  # one doorbell for 32 commands: they run concurrently
    statuses = [(await host.wait(1, write)).status for write in writes]
    assert statuses == [0] * len(writes)

    reads = submit_transfers(host, 2, IoOpcode.READ, sink + BLOCK, size)
    await host.ring(2)
    for read in reads:
        completion = await host.wait(2, read)
        assert (completion.status, completion.sq_id) == (0, 2)
    assert bytes(host.view(sink + BLOCK, size)) == data
    assert host.queues[1].interrupt.count > 0
    assert host.queues[2].interrupt.count > 0
    assert host.queues[0].interrupt.count > 0

    done = await host.command(0, AdminOpcode.ABORT, cdw=(1 | writes[0].result().cid << 16,))
    assert (done.status, done.result & 1) == (0, 1)  # nothing to abort: it completed

    csts = await host.shutdown()
    assert (csts & CSTS_RDY, csts >> 2 & 3) == (CSTS_RDY, 2)


async def test_malformed_commands_get_nvme_statuses(shared_host: NvmeHost) -> None:
    host = shared_host
    await host.create_queue_pair(1, 16, vector=1)
    buffer = host.allocate(4 * PAGE_SIZE)
    last_block = NAMESPACE // BLOCK - 1

    async def status(qid: int, opcode: int, **fields: object) -> int:
        done = await host.command(qid, opcode, **fields)
        assert done.do_not_retry or done.code == 0
        return done.code

    with structlog.testing.capture_logs() as logs:
        assert await status(0, 0x7F) == Status.INVALID_OPCODE
        assert await status(1, 0x7F, nsid=1) == Status.INVALID_OPCODE
        read = {"nsid": 1, "prp1": buffer}
        assert (
            await status(1, IoOpcode.READ, **read, cdw=(last_block, 0, 1))
            == Status.LBA_OUT_OF_RANGE
        )
        assert await status(1, IoOpcode.READ, **read, cdw=(last_block, 0, 0)) == 0
        assert await status(1, IoOpcode.READ, nsid=3, prp1=buffer) == Status.INVALID_NAMESPACE
        misaligned = {"nsid": 1, "prp1": buffer, "prp2": buffer + PAGE_SIZE + 8}
        assert (
            await status(1, IoOpcode.READ, **misaligned, cdw=(0, 0, 15))
            == Status.INVALID_PRP_OFFSET
        )
        too_big = blocks(2 * MAX_TRANSFER // BLOCK)
        assert await status(1, IoOpcode.READ, **read, cdw=(0, 0, too_big)) == Status.INVALID_FIELD
        queue = host.allocate(PAGE_SIZE)
        again = (15 << 16 | 1, 1 << 16 | 0x3)
        assert (
            await status(0, AdminOpcode.CREATE_IO_CQ, prp1=queue, cdw=again)
            == Status.INVALID_QUEUE_ID
        )
        assert (
            await status(0, AdminOpcode.CREATE_IO_CQ, prp1=queue, cdw=(0 << 16 | 2, 0x3))
            == Status.INVALID_QUEUE_SIZE
        )
        assert (
            await status(0, AdminOpcode.CREATE_IO_CQ, prp1=queue, cdw=(15 << 16 | 2, 99 << 16 | 3))
            == Status.INVALID_INTERRUPT_VECTOR
        )
        assert (
            await status(0, AdminOpcode.CREATE_IO_CQ, prp1=queue + 64, cdw=(15 << 16 | 2, 3))
            == Status.INVALID_PRP_OFFSET
        )
        assert (
            await status(0, AdminOpcode.CREATE_IO_SQ, prp1=queue, cdw=(15 << 16 | 2, 9 << 16 | 1))
            == Status.INVALID_COMPLETION_QUEUE
        )
        assert await status(0, AdminOpcode.DELETE_IO_CQ, cdw=(1,)) == Status.INVALID_QUEUE_DELETION
        assert await status(0, AdminOpcode.DELETE_IO_SQ, cdw=(7,)) == Status.INVALID_QUEUE_ID
        assert (
            await status(0, AdminOpcode.IDENTIFY, prp1=buffer, cdw=(0x55,)) == Status.INVALID_FIELD
        )
        assert (
            await status(0, AdminOpcode.GET_LOG_PAGE, prp1=buffer, cdw=(0x7F | 15 << 16,))
            == Status.INVALID_LOG_PAGE
        )
        assert (
            await status(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 0))
            == Status.COMMAND_SEQUENCE_ERROR
        )
        assert await status(0, AdminOpcode.SET_FEATURES, cdw=(0x80,)) == Status.INVALID_FIELD
        held = [host.submit(0, AdminOpcode.ASYNC_EVENT_REQUEST) for _ in range(AERL + 1)]
        assert await status(0, AdminOpcode.ASYNC_EVENT_REQUEST) == Status.AER_LIMIT_EXCEEDED
        assert not any(request.done() for request in held)  # held until an event
        assert await status(0, AdminOpcode.DELETE_IO_SQ, cdw=(1,)) == 0
        assert await status(0, AdminOpcode.DELETE_IO_CQ, cdw=(1,)) == 0
        assert (
            await status(
                0, AdminOpcode.GET_LOG_PAGE, prp1=buffer, cdw=(LogPage.SMART_HEALTH | 127 << 16,)
            )
            == 0
        )
    assert [
        entry for entry in logs if entry["log_level"] in ("warning", "error", "critical")
    ] == []


async def test_a_full_completion_queue_holds_completions_until_the_host_reaps(
    shared_host: NvmeHost,
) -> None:
    host = shared_host
    await host.create_queue_pair(1, 4, vector=1)  # room for 3 completions at a time
    flushes = [host.submit(1, IoOpcode.FLUSH, nsid=1) for _ in range(3)]
    await host.ring(1)
    await host.queues[1].interrupt.wait()
    await asyncio.sleep(0.05)
    queue = host.queues[1]
    posted = [host.view(queue.cq + slot * CQE_SIZE, CQE_SIZE)[14] & 1 for slot in range(4)]
    assert posted == [1, 1, 1, 0]  # the fourth slot stays free: head == tail + 1 is full
    more = [host.submit(1, IoOpcode.FLUSH, nsid=1) for _ in range(2)]
    await host.ring(1)
    await asyncio.sleep(0.05)
    assert [host.view(queue.cq + slot * CQE_SIZE, CQE_SIZE)[14] & 1 for slot in range(4)] == posted
    for future in flushes + more:  # reaping frees room; the held completions follow
        assert (await host.wait(1, future)).status == 0


async def test_shadow_doorbells_publish_the_event_index(shared_host: NvmeHost) -> None:
    """Doorbell Buffer Config: the controller takes tails from the shadow page and
    writes the tail it reached as the event index, or the host would stop ringing."""
    host = shared_host
    await host.create_queue_pair(1, 16, vector=1)
    shadow, events = host.allocate(PAGE_SIZE), host.allocate(PAGE_SIZE)
    done = await host.command(0, AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=shadow, prp2=events)
    assert done.status == 0
    for round_ in range(1, 4):
        future = host.submit(1, IoOpcode.FLUSH, nsid=1)
        host.view(shadow + 8, 4)[:] = host.queues[1].tail.to_bytes(4, "little")
        await host.write32(0x1000 + 8, 0, posted=True)  # the value is the shadow's
        assert (await host.wait(1, future)).status == 0
        event_index = int.from_bytes(host.view(events + 8, 4), "little")
        assert event_index == round_


async def test_a_submission_racing_the_event_index_is_not_lost(shared_host: NvmeHost) -> None:
    """The host submits just before the controller publishes its event index, sees
    the old index and does not ring: the controller must look at the shadow tail
    once more after publishing."""
    host = shared_host
    device = host.session.device
    assert isinstance(device, nvme.NvmeController)
    await host.create_queue_pair(1, 16, vector=1)
    shadow, events = host.allocate(PAGE_SIZE), host.allocate(PAGE_SIZE)
    await host.command(0, AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=shadow, prp2=events)
    first = host.submit(1, IoOpcode.FLUSH, nsid=1)
    host.view(shadow + 8, 4)[:] = (1).to_bytes(4, "little")
    second = host.submit(1, IoOpcode.FLUSH, nsid=1)
    publish = device._set_event_index

    async def submit_meanwhile(index: int, value: int) -> None:
        host.view(shadow + 8, 4)[:] = (2).to_bytes(4, "little")  # no ring: index was 0
        await publish(index, value)

    device._set_event_index = submit_meanwhile  # type: ignore[method-assign]
    await host.write32(0x1000 + 8, 1, posted=True)
    assert (await host.wait(1, first)).status == 0
    assert (await host.wait(1, second)).status == 0


async def test_intx_when_msix_is_off() -> None:
    async with attach(nvme.create(size=NAMESPACE)) as session:
        host = await NvmeHost.attach(session)
        await host.enable(msix=False)
        done, _identity = await host.identify(Cns.CONTROLLER)
        assert done.status == 0
        assert host.queues[0].interrupt.count == 1


async def test_deallocate_and_write_zeroes_read_back_zeros(tmp_path: Path) -> None:
    backing = tmp_path / "disk.img"
    async with attach(nvme.create(str(backing), size=NAMESPACE)) as session:
        host = await NvmeHost.attach(session)
        await host.enable()
        await host.create_queue_pair(1, 16, vector=1)
        size = 1 << 20
        buffer = host.allocate(size)
        host.view(buffer, size)[:] = pattern(size, seed=7)
        for lba in range(0, size // BLOCK, MAX_TRANSFER // BLOCK):
            assert await io(host, 1, IoOpcode.WRITE, lba, buffer + lba * BLOCK, MAX_TRANSFER) == 0
        written = os.stat(backing).st_blocks
        ranges = host.allocate(PAGE_SIZE)
        host.view(ranges, 16)[:] = struct.pack("<IIQ", 0, 1024, 0)  # 512 KiB from block 0
        done = await host.command(
            1, IoOpcode.DATASET_MANAGEMENT, nsid=1, prp1=ranges, cdw=(0, 1 << 2)
        )
        assert done.status == 0
        zeroes = await host.command(1, IoOpcode.WRITE_ZEROES, nsid=1, cdw=(1024, 0, blocks(256)))
        assert zeroes.status == 0
        sink = host.allocate(size)
        for lba in range(0, size // BLOCK, MAX_TRANSFER // BLOCK):
            assert await io(host, 1, IoOpcode.READ, lba, sink + lba * BLOCK, MAX_TRANSFER) == 0
        image = bytes(host.view(sink, size))
        assert image[: 1280 * BLOCK] == bytes(1280 * BLOCK)
        assert image[1280 * BLOCK :] == bytes(
            host.view(buffer + 1280 * BLOCK, size - 1280 * BLOCK)
        )
        assert os.stat(backing).st_blocks < written  # the zeroed range is a hole


async def test_reset_and_a_new_server_keep_the_data(tmp_path: Path) -> None:
    backing = str(tmp_path / "disk.img")
    data = pattern(MAX_TRANSFER, seed=9)
    async with attach(nvme.create(backing, size=NAMESPACE)) as session:
        host = await NvmeHost.attach(session)
        await host.enable()
        await host.create_queue_pair(1, 16, vector=1)
        buffer = host.allocate(MAX_TRANSFER)
        host.view(buffer, MAX_TRANSFER)[:] = data
        assert await io(host, 1, IoOpcode.WRITE, 100, buffer, MAX_TRANSFER) == 0
        await session.client.reset()
        assert (await host.read32(Reg.CSTS), await host.read32(Reg.CC)) == (0, 0)
        host.queues.clear()
        await host.enable()
        await host.create_queue_pair(1, 16, vector=1)
        sink = host.allocate(MAX_TRANSFER)
        assert await io(host, 1, IoOpcode.READ, 100, sink, MAX_TRANSFER) == 0
        assert bytes(host.view(sink, MAX_TRANSFER)) == data
    assert os.path.getsize(backing) == NAMESPACE
    second = nvme.create(backing, size=NAMESPACE)
    async with attach(second) as session:
        host = await NvmeHost.attach(session, shared=False)
        await host.enable()
        await host.create_queue_pair(1, 16, vector=1)
        sink = host.allocate(MAX_TRANSFER)
        assert await io(host, 1, IoOpcode.READ, 100, sink, MAX_TRANSFER) == 0
        assert bytes(host.view(sink, MAX_TRANSFER)) == data
    fd = second.storage.fd
    second.close()
    assert fd not in open_fds()
    second.close()  # closing twice is harmless


async def test_a_lost_client_leaves_a_powered_on_controller() -> None:
    device = nvme.create(size=NAMESPACE)
    async with attach(device) as session:
        host = await NvmeHost.attach(session)
        await host.enable()
        await host.create_queue_pair(1, 16, vector=1)
        host.submit(0, AdminOpcode.ASYNC_EVENT_REQUEST)
        await host.ring(0)
        await asyncio.sleep(0.01)
    assert (device.cc, device.csts) == (0, 0)
    assert not device.submission_queues
    assert not device.tasks
    assert device.admin.event_requests == []


def test_command_line_options(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "muser.run", "nvme", "--help"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    assert "--backing FILE" in result.stdout
    assert "--namespaces" in result.stdout
    command = [sys.executable, "-m", "muser.run", "nvme", "--socket", str(tmp_path / "s")]
    bad = subprocess.run(
        [*command, "--size", "1000"], capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "512-byte blocks" in bad.stderr
    assert (nvme.size("1G"), nvme.size("4096")) == (1 << 30, 4096)


async def test_interrupt_per_queue_follows_the_vector_it_was_created_with(
    shared_host: NvmeHost,
) -> None:
    host = shared_host
    await host.create_queue_pair(1, 16, vector=3)
    await host.create_queue_pair(2, 16, vector=5)
    assert (await host.command(2, IoOpcode.FLUSH, nsid=1)).status == 0
    assert (await host.command(1, IoOpcode.FLUSH, nsid=1)).status == 0
    for qid, vector in ((1, 3), (2, 5)):
        assert host.queues[qid].interrupt.vector == vector
        assert host.queues[qid].interrupt.count >= 1
    interrupt = await host.session.interrupt(IrqIndex.MSIX, 4)  # no queue uses vector 4
    assert interrupt.fired() == 0
