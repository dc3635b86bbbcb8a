"""DMA copies through muser, against bare memory and a bare socket on the same loop.

On each event loop (asyncio, uvloop) this measures, in one process, for transfers
of 4 KiB, 64 KiB and 1 MiB:

- mapped: a `muser.Client` maps 64 MiB of a memfd at 0x100000 (DMA_MAP with the
  fd) on a `muser.Server`; device code then copies with
  `device.dma.read_direct` (returns bytes: one copy), `device.dma.write_direct`
  from a bytes object, and zero-copy `with device.dma.view(..., write=True) as v:
  v[:] = src` from a bytearray. Baseline: the same copies on a plain `mmap` of
  the same memfd, by memoryview slicing (`bytes(mv[a:a + n])`, `mv[a:a + n] =
  data`). It is the floor: what a perfect framework could reach.
- message: a client maps a 4 MiB window without an fd, so that `await
  device.dma.read()`/`write()` (awaited from the benchmark's task, not from a
  handler) become DMA_READ/DMA_WRITE round trips that the client serves from
  its memory, in both payload layouts (SPEC and QEMU, each on its own server).
  The client is raw, without any framework, as QEMU is to muser: driven by
  `loop.add_reader` + `recv_into` one buffer, it answers from a bytearray with
  `sendmsg` of the reply's header, fixed fields and a view of the data. So
  muser/baseline is the cost of muser's server. The SPEC rows marked
  "muser.Client" time the same through `muser.Client` instead, what a Python
  test driving a device pays end to end.
  Baseline: a socketpair whose ends are driven by `loop.add_reader` (and
  `add_writer` for what the socket does not take at once), a 32-byte request
  one way and a 32 + n byte reply the other, received with `recvmsg_into` into
  one buffer until all of it is there.

Addresses walk across 32 MiB of the mapped window (4 MiB of the message one),
`base + (i * n) % span`, so the copies do not keep hitting the same cache lines.
Repetitions of every benchmark are interleaved so that noise on a shared machine
hits them alike. Reported: the median GB/s (10^9 bytes) across repetitions, the
ops/s at that median, the spread, and muser/baseline, the median of the
repetitions' own ratios (common.paired_ratio).

Before timing, every window is written and read back through muser and checked
from the other side. Those checks also free 4 MiB buffers, which raises glibc's
dynamic mmap threshold above 1 MiB: the 1 MiB buffers of the timed copies then
come from the heap and are reused, instead of being mmapped fresh (and faulted
in page by page) on every allocation. A process that never freed a buffer much
larger than 1 MiB stays on that slow path, several times slower for 1 MiB
copies; run with MALLOC_MMAP_THRESHOLD_=131072 to measure it.

    python benchmarks/dma_copy.py            # 9 repetitions per loop, ~30 s on 2 cores
    python benchmarks/dma_copy.py --quick    # smoke test, a few seconds
    python benchmarks/dma_copy.py --json --pin 1 --loops uvloop
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from common import (
    paired_ratio,
    parse_count_arguments,
    print_machine,
    raw_session,
    run_per_loop,
)

import muser
from muser.device.dma import DmaLayout, DmaSpace
from muser.wire import encode_header
from muser.wire.constants import FLAGS_REPLY, HEADER_SIZE, Command, DmaMapFlag
from muser.wire.messages import (
    DMA_ACCESS_CODEC,
    DMA_DATA_QEMU_PREFIX,
    HEADER_CODEC,
    QEMU_DMA_PADDING,
    DmaMap,
)

KiB = 1024
MiB = 1024 * KiB
SIZES = (4 * KiB, 64 * KiB, 1 * MiB)
MAPPED_BASE = 0x100000
MAPPED_SIZE = 64 * MiB
MAPPED_WALK = 32 * MiB
"""The span of the mapped window that the copies walk over."""
MESSAGE_BASE = 0x100000
MESSAGE_SIZE = 4 * MiB
"""The window without an fd; the copies walk over all of it."""
REQUEST_SIZE = 32
"""A DMA_READ request: 16-byte header, address and count."""
ANCILLARY_SIZE = socket.CMSG_SPACE(4 * 16)
"""Room for 16 fds, as a vfio-user endpoint must offer on every receive."""
MIN_OPS = 64
"""Transfers per repetition at least, however large they are."""
WARM_UP = 32
"""Untimed transfers of every benchmark before the first repetition."""
QUICK = {
    "mapped_bytes": 4 * MiB,
    "message_bytes": 256 * KiB,
    "min_ops": 4,
    "repetitions": 2,
    "warm_up": 4,
}

MAPPED = {
    "read_direct": ("read_direct -> bytes", "baseline_read"),
    "write_direct": ("write_direct(bytes)", "baseline_write"),
    "view_write": ("view(write=True)[:] = src", "baseline_write"),
}
"""Mapped-window benchmarks: result key -> (what the table calls it, its baseline)."""
MESSAGE = {
    "spec_read": ("SPEC await read", "baseline"),
    "spec_write": ("SPEC await write", "baseline"),
    "qemu_read": ("QEMU await read", "baseline"),
    "qemu_write": ("QEMU await write", "baseline"),
    "client_spec_read": ("SPEC read, muser.Client", "baseline"),
    "client_spec_write": ("SPEC write, muser.Client", "baseline"),
}
"""Message-based benchmarks, the same way."""
LAYOUTS = {"spec": DmaLayout.SPEC, "qemu": DmaLayout.QEMU}

Burst = Callable[[int], Awaitable[None]]
"""Does `count` transfers back to back."""


@dataclass
class Result:
    """One benchmark at one transfer size on one loop."""

    gb_per_s: float
    """The median across repetitions, in 10^9 bytes per second."""
    ops_per_s: float
    """At that median."""
    per_repetition: list[float]
    """GB/s of each repetition."""
    spread: float
    """(max - min) / median of the repetitions' GB/s."""


class Series:
    """One way of copying `size` bytes, timed repetition by repetition."""

    def __init__(self, burst: Burst, size: int, ops: int) -> None:
        self.burst = burst
        self.size = size
        self.ops = ops
        """Transfers per repetition."""
        self.rates: list[float] = []

    async def run(self) -> None:
        clock = time.perf_counter_ns
        start = clock()
        await self.burst(self.ops)
        elapsed = clock() - start
        self.rates.append(self.ops * self.size / elapsed)

    def result(self) -> Result:
        median = statistics.median(self.rates)
        return Result(
            gb_per_s=median,
            ops_per_s=median * 1e9 / self.size,
            per_repetition=self.rates,
            spread=(max(self.rates) - min(self.rates)) / median,
        )


def pattern(size: int) -> bytes:
    return bytes(range(256)) * (size // 256)


def mapped_bursts(dma: DmaSpace, memory: memoryview, size: int) -> dict[str, Burst]:
    """The mapped-window copies of `size` bytes, through muser and on `memory`, a
    plain mapping of the same file."""
    data = pattern(size)
    source = memoryview(bytearray(data))

    async def baseline_read(count: int) -> None:
        for i in range(count):
            offset = (i * size) % MAPPED_WALK
            bytes(memory[offset : offset + size])

    async def baseline_write(count: int) -> None:
        for i in range(count):
            offset = (i * size) % MAPPED_WALK
            memory[offset : offset + size] = data

    async def read_direct(count: int) -> None:
        read = dma.read_direct
        for i in range(count):
            read(MAPPED_BASE + (i * size) % MAPPED_WALK, size)

    async def write_direct(count: int) -> None:
        write = dma.write_direct
        for i in range(count):
            write(MAPPED_BASE + (i * size) % MAPPED_WALK, data)

    async def view_write(count: int) -> None:
        view = dma.view
        for i in range(count):
            with view(MAPPED_BASE + (i * size) % MAPPED_WALK, size, write=True) as window:
                window[:] = source

    return {
        "baseline_read": baseline_read,
        "read_direct": read_direct,
        "baseline_write": baseline_write,
        "write_direct": write_direct,
        "view_write": view_write,
    }


def message_bursts(dma: DmaSpace, size: int) -> tuple[Burst, Burst]:
    """`await dma.read()` and `await dma.write()` of `size` bytes, walking the window."""
    data = pattern(size)

    async def read(count: int) -> None:
        for i in range(count):
            await dma.read(MESSAGE_BASE + (i * size) % MESSAGE_SIZE, size)

    async def write(count: int) -> None:
        for i in range(count):
            await dma.write(MESSAGE_BASE + (i * size) % MESSAGE_SIZE, data)

    return read, write


class SocketBaseline:
    """Both ends of a socketpair on one loop: a 32-byte request, a 32 + size byte reply."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self._loop = loop
        self._client, self._server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._client.setblocking(False)
        self._server.setblocking(False)
        self._request = bytes(REQUEST_SIZE)
        self._reply = memoryview(bytes(REQUEST_SIZE + size))
        self._unsent = self._reply[:0]
        self._buffer = memoryview(bytearray(len(self._reply)))
        self._received = 0
        self._waiter: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self._server.fileno(), self._serve)
        loop.add_reader(self._client.fileno(), self._answered)

    def _serve(self) -> None:
        self._server.recvmsg(REQUEST_SIZE, ANCILLARY_SIZE)
        sent = self._server.sendmsg([self._reply])
        if sent < len(self._reply):
            self._unsent = self._reply[sent:]
            self._loop.add_writer(self._server.fileno(), self._send_rest)

    def _send_rest(self) -> None:
        self._unsent = self._unsent[self._server.sendmsg([self._unsent]) :]
        if not self._unsent:
            self._loop.remove_writer(self._server.fileno())

    def _answered(self) -> None:
        size, _ancillary, _flags, _address = self._client.recvmsg_into(
            [self._buffer[self._received :]], ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
        )
        if not size:
            self._waiter.set_exception(RuntimeError("the socketpair closed"))
            return
        self._received += size
        if self._received == len(self._buffer):
            self._waiter.set_result(None)

    async def round_trip(self) -> None:
        self._waiter = self._loop.create_future()
        self._received = 0
        self._client.sendmsg([self._request])
        await self._waiter

    async def burst(self, count: int) -> None:
        round_trip = self.round_trip
        for _ in range(count):
            await round_trip()

    def close(self) -> None:
        if self._unsent:
            self._loop.remove_writer(self._server.fileno())
        self._loop.remove_reader(self._client.fileno())
        self._loop.remove_reader(self._server.fileno())
        self._client.close()
        self._server.close()


class RawDmaClient:
    """A client without any framework that serves the server's DMA_READ and
    DMA_WRITE from its memory, as QEMU serves them from guest RAM, in one layout."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, layout: DmaLayout
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._qemu = layout is DmaLayout.QEMU
        self._prefix = DMA_DATA_QEMU_PREFIX if self._qemu else DMA_ACCESS_CODEC
        self.memory = memoryview(bytearray(MESSAGE_SIZE))
        self._received = memoryview(bytearray(HEADER_SIZE + 32 + MiB))
        """Room for the largest message: a DMA_WRITE of 1 MiB in either layout."""
        self._filled = 0
        self._unsent: list[memoryview] = []
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        received = self._received
        count = self._sock.recv_into(received[self._filled :])
        if not count:
            raise RuntimeError("the server closed the connection")
        self._filled += count
        while self._filled >= HEADER_SIZE:
            msg_id, command, size, _flags, _error = HEADER_CODEC.unpack_from(received)
            if self._filled < size:
                return
            self._answer(msg_id, command, received[HEADER_SIZE:size])
            rest = self._filled - size
            received[:rest] = received[size : self._filled]
            self._filled = rest

    def _answer(self, msg_id: int, command: int, payload: memoryview) -> None:
        prefix = self._prefix
        address, count = prefix.unpack_from(payload)
        data = self.memory[address - MESSAGE_BASE : address - MESSAGE_BASE + count]
        if command == Command.DMA_READ:
            parts = [prefix.pack(address, count), data]
            if self._qemu:
                parts.append(QEMU_DMA_PADDING)
            size = sum(map(len, parts))
            self._send([encode_header(msg_id, command, size, FLAGS_REPLY), *parts])
        elif command == Command.DMA_WRITE:
            data[:] = payload[prefix.size : prefix.size + count]
            answer = b"" if self._qemu else DMA_ACCESS_CODEC.pack(address, count)
            self._send([encode_header(msg_id, command, len(answer), FLAGS_REPLY), answer])
        else:
            raise RuntimeError(f"the server sent command {command}")

    def _send(self, buffers: list[Any]) -> None:
        if self._unsent:
            self._unsent.append(memoryview(b"".join(buffers)))
            return
        sent = self._sock.sendmsg(buffers)
        if sent < sum(map(len, buffers)):
            self._unsent.append(memoryview(b"".join(buffers))[sent:])
            self._loop.add_writer(self._sock.fileno(), self._writable)

    def _writable(self) -> None:
        while self._unsent:
            sent = self._sock.send(self._unsent[0])
            self._unsent[0] = self._unsent[0][sent:]
            if self._unsent[0]:
                return
            self._unsent.pop(0)
        self._loop.remove_writer(self._sock.fileno())

    def close(self) -> None:
        if self._unsent:
            self._loop.remove_writer(self._sock.fileno())
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


async def serve(stack: contextlib.AsyncExitStack, path: str, layout: DmaLayout) -> muser.PciDevice:
    """A device without regions of its own, served at `path` until `stack` closes."""
    device = muser.PciDevice(vendor_id=0x1234, device_id=0x11E8)
    await stack.enter_async_context(muser.Server(device, path, dma_layout=layout))
    return device


async def attach_raw(
    stack: contextlib.AsyncExitStack, path: str, layout: DmaLayout
) -> tuple[muser.PciDevice, RawDmaClient]:
    """A device served at `path`, with a raw client that mapped the message window."""
    loop = asyncio.get_running_loop()
    device = await serve(stack, path, layout)
    sock = await raw_session(path)
    flags = DmaMapFlag.READ | DmaMapFlag.WRITE
    request = DmaMap(32, flags, 0, MESSAGE_BASE, MESSAGE_SIZE).build()
    await loop.sock_sendall(sock, encode_header(1, Command.DMA_MAP, len(request), 0) + request)
    reply = await loop.sock_recv(sock, HEADER_SIZE)
    if HEADER_CODEC.unpack(reply)[3] != FLAGS_REPLY:
        raise RuntimeError("DMA_MAP was refused")
    client = RawDmaClient(loop, sock, layout)
    stack.callback(client.close)
    return device, client


async def attach(
    stack: contextlib.AsyncExitStack, path: str, layout: DmaLayout
) -> tuple[muser.PciDevice, muser.Client]:
    """A device served at `path`, and a client connected to it, both closed by `stack`."""
    device = await serve(stack, path, layout)
    client = await stack.enter_async_context(await muser.Client.connect(path, dma_layout=layout))
    return device, client


def check_mapped(dma: DmaSpace, memory: memoryview) -> None:
    """Write the walked span through each side and read it through the other: this
    proves both see the same memory, and faults in both mappings before timing."""
    data = pattern(MAPPED_WALK)
    dma.write_direct(MAPPED_BASE, data)
    if bytes(memory[:MAPPED_WALK]) != data:
        raise RuntimeError("the plain mapping does not see muser's write")
    memory[:MAPPED_WALK] = bytes(MAPPED_WALK)
    if dma.read_direct(MAPPED_BASE, MAPPED_WALK) != bytes(MAPPED_WALK):
        raise RuntimeError("muser does not see the plain mapping's write")


async def check_message(dma: DmaSpace, backing: bytearray | memoryview) -> None:
    """Write the window through muser and read it back, checking the client's memory."""
    data = pattern(MESSAGE_SIZE)
    await dma.write(MESSAGE_BASE, data)
    if bytes(backing) != data:
        raise RuntimeError("DMA_WRITE did not reach the client's memory")
    backing[:] = bytes(MESSAGE_SIZE)
    if await dma.read(MESSAGE_BASE, MESSAGE_SIZE) != bytes(backing):
        raise RuntimeError("DMA_READ did not return the client's memory")


def operations(volume: int, size: int, min_ops: int) -> int:
    return max(volume // size, min_ops)


async def bench_loop(
    directory: str,
    mapped_bytes: int,
    message_bytes: int,
    min_ops: int,
    repetitions: int,
    warm_up: int,
) -> dict[str, Any]:
    """Every benchmark on the running loop, their repetitions interleaved."""
    loop = asyncio.get_running_loop()
    prefix = os.path.join(directory, type(loop).__name__)
    memfd = os.memfd_create("muser-bench-dma", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    baselines: list[SocketBaseline] = []
    try:
        os.ftruncate(memfd, MAPPED_SIZE)
        async with contextlib.AsyncExitStack() as stack:
            mapped, client = await attach(stack, f"{prefix}-mapped.sock", DmaLayout.SPEC)
            await client.dma_map(MAPPED_BASE, MAPPED_SIZE, fd=memfd)
            mapping = stack.enter_context(mmap.mmap(memfd, MAPPED_SIZE))
            memory = stack.enter_context(memoryview(mapping))
            check_mapped(mapped.dma, memory)
            messaging: dict[str, DmaSpace] = {}
            for name, layout in LAYOUTS.items():
                device, raw = await attach_raw(stack, f"{prefix}-{name}.sock", layout)
                await check_message(device.dma, raw.memory)
                messaging[name] = device.dma
            device, client = await attach(stack, f"{prefix}-client.sock", DmaLayout.SPEC)
            backing = bytearray(MESSAGE_SIZE)
            await client.dma_map(MESSAGE_BASE, MESSAGE_SIZE, backing=backing)
            await check_message(device.dma, backing)
            messaging["client_spec"] = device.dma
            series: dict[str, dict[int, dict[str, Series]]] = {"mapped": {}, "message": {}}
            for size in SIZES:
                ops = operations(mapped_bytes, size, min_ops)
                series["mapped"][size] = {
                    name: Series(burst, size, ops)
                    for name, burst in mapped_bursts(mapped.dma, memory, size).items()
                }
                ops = operations(message_bytes, size, min_ops)
                baselines.append(SocketBaseline(loop, size))
                message = {"baseline": Series(baselines[-1].burst, size, ops)}
                for name, dma in messaging.items():
                    read, write = message_bursts(dma, size)
                    message[f"{name}_read"] = Series(read, size, ops)
                    message[f"{name}_write"] = Series(write, size, ops)
                series["message"][size] = message
            groups = [by_name for path in series.values() for by_name in path.values()]
            for by_name in groups:
                for one in by_name.values():
                    await one.burst(warm_up)
            for _ in range(repetitions):
                for by_name in groups:
                    for one in by_name.values():
                        await one.run()
    finally:
        for baseline in baselines:
            baseline.close()
        os.close(memfd)
    return {
        "loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
        "mapped": report_path(series["mapped"], MAPPED),
        "message": report_path(series["message"], MESSAGE),
    }


def report_path(
    by_size: dict[int, dict[str, Series]], compared: dict[str, tuple[str, str]]
) -> dict[str, Any]:
    """Results by size (a str, for JSON), each benchmark's ratio to its baseline."""
    report: dict[str, Any] = {}
    for size, by_name in by_size.items():
        results = {name: asdict(one.result()) for name, one in by_name.items()}
        report[str(size)] = {
            **results,
            "ops_per_repetition": next(iter(by_name.values())).ops,
            "ratio": {
                name: paired_ratio(
                    results[name]["per_repetition"], results[baseline]["per_repetition"]
                )
                for name, (_label, baseline) in compared.items()
            },
        }
    return report


def size_label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def print_table(report: dict[str, Any]) -> None:
    machine, settings = report["machine"], report["settings"]
    print_machine(machine, {name: loop["loop"] for name, loop in report["loops"].items()})
    print(
        f"settings: warm-up {settings['warm_up']} ops, then {settings['repetitions']} "
        f"repetitions of every benchmark, interleaved, each moving "
        f"{size_label(settings['mapped_bytes'])} (mapped) or "
        f"{size_label(settings['message_bytes'])} (message), and at least "
        f"{settings['min_ops']} ops"
    )
    print(
        "baselines: mapped = the same copies on a plain mmap of the memfd; "
        "message = a socketpair ping-pong of 32 / 32 + n bytes"
    )
    print("GB/s = 10^9 bytes/s; spread = (max - min) / median over the repetitions")
    print()
    header = (
        f"{'loop':<8} {'path':<8} {'operation':<26} {'size':>6} {'GB/s':>7} {'ops/s':>9} "
        f"{'spread':>7} {'baseline':>8} {'spread':>7} {'muser/baseline':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, loop in report["loops"].items():
        for path, compared in (("mapped", MAPPED), ("message", MESSAGE)):
            for size, results in loop[path].items():
                for key, (label, baseline_key) in compared.items():
                    result, baseline = results[key], results[baseline_key]
                    print(
                        f"{name:<8} {path:<8} {label:<26} {size_label(int(size)):>6} "
                        f"{result['gb_per_s']:>7.3f} {result['ops_per_s']:>9,.0f} "
                        f"{result['spread']:>7.1%} {baseline['gb_per_s']:>8.3f} "
                        f"{baseline['spread']:>7.1%} {results['ratio'][key]:>14.3f}"
                    )
    print()
    print(f"total time: {report['elapsed_s']:.1f} s")


def main() -> None:
    args = parse_count_arguments(
        __doc__,
        {
            "mapped-mib": (64, "MiB each mapped benchmark moves per repetition"),
            "message-mib": (4, "MiB each message benchmark moves per repetition"),
        },
        repetitions=9,
    )
    settings = (
        QUICK
        if args.quick
        else {
            "mapped_bytes": args.mapped_mib * MiB,
            "message_bytes": args.message_mib * MiB,
            "min_ops": MIN_OPS,
            "repetitions": args.repetitions,
            "warm_up": WARM_UP,
        }
    )
    run_per_loop(args, settings, bench_loop, print_table)


if __name__ == "__main__":
    main()
