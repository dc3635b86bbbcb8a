"""DMA through muser, mapped and by message, against a bare mmap copy and a bare socket copy.

On each loop, one process, for transfers of 4 KiB, 64 KiB and 1 MiB:

- mapped: a `muser.Client` maps 64 MiB of a memfd (DMA_MAP with the fd); device
  code copies with `device.dma.read_direct` (returns bytes), `write_direct` from
  bytes, and zero-copy `with device.dma.view(..., write=True) as v: v[:] = src`.
  Baseline: the same copies by memoryview slicing of a plain mmap of that memfd
  (common.mmap_copies). Addresses walk 32 MiB, so copies do not keep hitting the
  same cache lines.
- message: a `muser.Client` maps a 4 MiB window without an fd, so that `await
  device.dma.read()`/`write()` become DMA_READ/DMA_WRITE round trips the client
  serves from its memory (muser on both ends). Baseline: a socketpair moving a
  32-byte request and a 32 + n byte reply (common.SocketBaseline).

Every window is written and read back through muser and checked from the other
side before timing. Those checks also free 4 MiB buffers, which raises glibc's
dynamic mmap threshold above 1 MiB, so the timed 1 MiB buffers come from the heap
instead of fresh, page-faulting mmaps. Repetitions of all are interleaved;
figures in GB/s (10^9 bytes/s).

    python benchmarks/dma.py [--quick] [--json] [--pin CPU] [--loops uvloop]
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os

from common import (
    Burst,
    Row,
    Series,
    SocketBaseline,
    argument_parser,
    compare,
    mmap_copies,
    parse_arguments,
    round_trip_burst,
    run_interleaved,
    run_per_loop,
)

import muser

KiB, MiB = 1024, 1024 * 1024
SIZES = (4 * KiB, 64 * KiB, 1 * MiB)
BASE = 0x100000
MAPPED_SIZE = 64 * MiB
WALK = 32 * MiB
"""The span of the mapped window that copies walk over."""
MESSAGE_SIZE = 4 * MiB
"""The window without an fd; copies walk over all of it."""
REQUEST_SIZE = 32
"""A DMA_READ request: header, address and count; its reply adds the data."""
MMAP = "memoryview copy on a plain mmap"
SOCKET = "socketpair, 32 -> 32 + n bytes"
FULL = {"mapped": 64 * MiB, "message": 4 * MiB, "min_ops": 64, "repetitions": 9, "warm_up": 32}
QUICK = {"mapped": 2 * MiB, "message": 256 * KiB, "min_ops": 4, "repetitions": 2, "warm_up": 2}
"""Bytes each mapped and each message benchmark moves per repetition, in at least min_ops."""


def mapped_bursts(device: muser.PciDevice, size: int) -> tuple[Burst, Burst, Burst]:
    """read_direct, write_direct and a view write of `size` bytes, walking the window."""
    dma, data, source = device.dma, bytes(size), memoryview(bytearray(size))

    async def read_direct(count: int) -> None:
        for i in range(count):
            dma.read_direct(BASE + i * size % WALK, size)

    async def write_direct(count: int) -> None:
        for i in range(count):
            dma.write_direct(BASE + i * size % WALK, data)

    async def view_write(count: int) -> None:
        for i in range(count):
            with dma.view(BASE + i * size % WALK, size, write=True) as window:
                window[:] = source

    return read_direct, write_direct, view_write


def message_bursts(device: muser.PciDevice, size: int) -> tuple[Burst, Burst]:
    """`await dma.read()` and `await dma.write()` of `size` bytes, walking the window."""
    dma, data = device.dma, bytes(size)

    async def read(count: int) -> None:
        for i in range(count):
            await dma.read(BASE + i * size % MESSAGE_SIZE, size)

    async def write(count: int) -> None:
        for i in range(count):
            await dma.write(BASE + i * size % MESSAGE_SIZE, data)

    return read, write


async def check(device: muser.PciDevice, memory: memoryview, size: int) -> None:
    """Write `size` bytes through muser and through the other side, reading each back
    through the other: both see the same memory (and both mappings are faulted in)."""
    data = bytes(range(256)) * (size // 256)
    await device.dma.write(BASE, data)
    if bytes(memory[:size]) != data:
        raise RuntimeError("the other side does not see muser's DMA write")
    memory[:size] = bytes(size)
    if await device.dma.read(BASE, size) != bytes(size):
        raise RuntimeError("muser's DMA read does not see the other side's write")


async def serve(
    stack: contextlib.AsyncExitStack, path: str
) -> tuple[muser.PciDevice, muser.Client]:
    device = muser.PciDevice(vendor_id=0x1234, device_id=0x11E8)
    await stack.enter_async_context(muser.Server(device, path))
    return device, await stack.enter_async_context(await muser.Client.connect(path))


async def bench_loop(
    directory: str, mapped: int, message: int, min_ops: int, repetitions: int, warm_up: int
) -> list[Row]:
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        memfd = os.memfd_create("muser-bench-dma", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        stack.callback(os.close, memfd)
        os.ftruncate(memfd, MAPPED_SIZE)
        mapped_device, client = await serve(stack, os.path.join(directory, "mapped.sock"))
        await client.dma_map(BASE, MAPPED_SIZE, fd=memfd)
        memory = stack.enter_context(
            memoryview(stack.enter_context(mmap.mmap(memfd, MAPPED_SIZE)))
        )
        await check(mapped_device, memory, WALK)
        message_device, client = await serve(stack, os.path.join(directory, "message.sock"))
        backing = bytearray(MESSAGE_SIZE)
        await client.dma_map(BASE, MESSAGE_SIZE, backing=backing)
        await check(message_device, memoryview(backing), MESSAGE_SIZE)
        pairs: list[tuple[str, str, Series, Series]] = []
        for size in SIZES:
            label = f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"
            ops = max(mapped // size, min_ops)
            read, write = (
                Series(burst, ops, per_op=size / 1e9) for burst in mmap_copies(memory, size, WALK)
            )
            muser_read, muser_write, muser_view = (
                Series(burst, ops, per_op=size / 1e9)
                for burst in mapped_bursts(mapped_device, size)
            )
            pairs += [
                (f"mapped DMA read_direct, {label}", MMAP, muser_read, read),
                (f"mapped DMA write_direct, {label}", MMAP, muser_write, write),
                (f"mapped DMA view write, {label}", MMAP, muser_view, write),
            ]
            ops = max(message // size, min_ops)
            sockets = SocketBaseline(loop, REQUEST_SIZE, REQUEST_SIZE + size)
            stack.callback(sockets.close)
            copy = Series(
                round_trip_burst(sockets.round_trip, timed=False), ops, per_op=size / 1e9
            )
            message_read, message_write = (
                Series(burst, ops, per_op=size / 1e9)
                for burst in message_bursts(message_device, size)
            )
            pairs += [
                (f"message DMA read, {label}", SOCKET, message_read, copy),
                (f"message DMA write, {label}", SOCKET, message_write, copy),
            ]
        every = dict.fromkeys(
            series
            for *_names, muser_series, baseline in pairs
            for series in (baseline, muser_series)
        )
        await run_interleaved(every, warm_up, repetitions)
    return [
        compare(name, against, "GB/s", muser_series, baseline)
        for name, against, muser_series, baseline in pairs
    ]


if __name__ == "__main__":
    args = parse_arguments(argument_parser(__doc__))
    run_per_loop(args, QUICK if args.quick else FULL, bench_loop)
