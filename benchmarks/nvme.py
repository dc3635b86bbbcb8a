"""The NVMe sample's I/O rate through the test driver, against os.preadv/os.pwritev
on the same backing file.

On each loop, one process: `samples/nvme` serves a namespace backed by a file in a
temporary directory (so in the page cache: what is measured is the controller and
muser, not a disk), and tests/nvme_driver.py drives it as Linux's driver would,
over a real socket, guest memory shared as a memfd, interrupts on eventfds:

- 4 KiB random reads and writes at queue depth 1 and 32 (the first 64 MiB of the
  namespace, written before timing; depth 32 keeps 32 commands in flight, refilling
  and ringing once per reaped batch);
- 128 KiB sequential reads and writes at queue depth 8 (PRP lists).

Baseline: the same transfers made by `os.preadv`/`os.pwritev` on the backing file
from the same process, one after another: what the storage costs with no
controller at all. Figures in IOPS (4 KiB) and MB/s (128 KiB); repetitions
interleaved.

    python benchmarks/nvme.py [--quick] [--json] [--pin CPU] [--loops uvloop]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
from collections import deque
from pathlib import Path

from common import Burst, Row, Series, argument_parser, compare, parse_arguments, run_per_loop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test driver, in tests/

from muser.testing import attach
from muser_samples import nvme
from muser_samples.nvme.spec import AdminOpcode, Feature, IoOpcode
from tests.nvme_driver import Completion, NvmeHost

KiB, MiB = 1024, 1024 * 1024
REGION = 64 * MiB
"""The part of the namespace the transfers touch."""
FULL = {"ops": 4000, "repetitions": 7, "warm_up": 200}
QUICK = {"ops": 64, "repetitions": 2, "warm_up": 8}
PREADV = "os.preadv on the backing file"
PWRITEV = "os.pwritev on the backing file"


def offsets(size: int, sequential: bool) -> list[int]:
    """Byte offsets in the region for transfers of `size`: shuffled or in order."""
    slots = list(range(0, REGION, size))
    if not sequential:
        random.Random(size).shuffle(slots)
    return slots


def nvme_burst(host: NvmeHost, opcode: int, size: int, depth: int, sequential: bool) -> Burst:
    """`count` commands of `size` bytes, `depth` in flight, on I/O queue 1."""
    slots = [host.allocate(size) for _ in range(depth)]
    prps = [host.prps(buffer, size) for buffer in slots]
    where = offsets(size, sequential)
    position = 0

    def submit(slot: int) -> tuple[int, asyncio.Future[Completion]]:
        nonlocal position
        lba = where[position % len(where)] // 512
        position += 1
        prp1, prp2 = prps[slot]
        future = host.submit(
            1, opcode, nsid=1, prp1=prp1, prp2=prp2, cdw=(lba, 0, size // 512 - 1)
        )
        return slot, future

    async def burst(count: int) -> None:
        flying = deque(submit(slot) for slot in range(min(depth, count)))
        submitted = len(flying)
        await host.ring(1)
        while flying:
            await host.wait(1, flying[0][1])
            refilled = False
            while flying and flying[0][1].done():  # the oldest done: reuse their slots
                slot, future = flying.popleft()
                if future.result().status:
                    raise RuntimeError(f"NVMe status {future.result().status:#x}")
                if submitted < count:
                    flying.append(submit(slot))
                    submitted, refilled = submitted + 1, True
            if refilled:
                await host.ring(1)
        return

    return burst


def file_burst(fd: int, write: bool, size: int, sequential: bool) -> Burst:
    buffer = [memoryview(bytearray(os.urandom(size)))]
    where = offsets(size, sequential)
    position = 0

    async def burst(count: int) -> None:
        nonlocal position
        move = os.pwritev if write else os.preadv
        for _ in range(count):
            move(fd, buffer, where[position % len(where)])
            position += 1
        return

    return burst


async def bench_loop(directory: str, ops: int, repetitions: int, warm_up: int) -> list[Row]:
    backing = os.path.join(directory, "namespace.img")
    with open(backing, "wb") as image:
        image.truncate(2 * REGION)
        for _ in range(REGION // MiB):
            image.write(os.urandom(MiB))
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(attach(nvme.create(backing, size=2 * REGION)))
        host = await NvmeHost.attach(session, size=32 * MiB)
        await host.enable()
        await host.command(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 0))
        await host.create_queue_pair(1, 64, vector=1)
        fd = os.open(backing, os.O_RDWR | os.O_CLOEXEC)
        stack.callback(os.close, fd)
        cases = [
            ("4 KiB random read, QD1", IoOpcode.READ, 4 * KiB, 1, False),
            ("4 KiB random write, QD1", IoOpcode.WRITE, 4 * KiB, 1, False),
            ("4 KiB random read, QD32", IoOpcode.READ, 4 * KiB, 32, False),
            ("4 KiB random write, QD32", IoOpcode.WRITE, 4 * KiB, 32, False),
            ("128 KiB sequential read, QD8", IoOpcode.READ, 128 * KiB, 8, True),
            ("128 KiB sequential write, QD8", IoOpcode.WRITE, 128 * KiB, 8, True),
        ]
        pairs = []
        for name, opcode, size, depth, sequential in cases:
            per_op = 1.0 if size == 4 * KiB else size / 1e6
            count = ops if size == 4 * KiB else max(ops // 8, 8)
            write = opcode == IoOpcode.WRITE
            controller = Series(
                nvme_burst(host, opcode, size, depth, sequential), count, per_op=per_op
            )
            baseline = Series(file_burst(fd, write, size, sequential), count, per_op=per_op)
            unit = "IOPS" if size == 4 * KiB else "MB/s"
            pairs.append((name, PWRITEV if write else PREADV, unit, controller, baseline))
        for _name, _against, _unit, controller, baseline in pairs:
            await controller.once(warm_up)
            await baseline.once(warm_up)
        for _ in range(repetitions):
            for _name, _against, _unit, controller, baseline in pairs:
                await controller.run()
                await baseline.run()
        await host.shutdown()
    return [
        compare(name, against, unit, controller, baseline)
        for name, against, unit, controller, baseline in pairs
    ]


if __name__ == "__main__":
    args = parse_arguments(argument_parser(__doc__))
    run_per_loop(args, QUICK if args.quick else FULL, bench_loop)
