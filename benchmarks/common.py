"""What every benchmark script shares: arguments, machine facts, one Result and Row
shape, the per-loop runner with interleaved repetitions, the table printer, and the
raw baselines muser is held against.

Scripts run as `python benchmarks/<name>.py`, so this directory is first on
sys.path and they import this module as `common`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import math
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import structlog
import uvloop

from muser.wire import encode_header
from muser.wire.constants import ERROR_BIT, HEADER_SIZE, PROTOCOL_MAJOR, PROTOCOL_MINOR, Command
from muser.wire.messages import HEADER_CODEC, Version

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
ANCILLARY_SIZE = socket.CMSG_SPACE(4 * 16)
"""Room for 16 fds, as a vfio-user endpoint must offer on every receive."""

RoundTrip = Callable[[], Awaitable[object]]
Burst = Callable[[int], Awaitable[list[int] | None]]
"""Does `count` operations back to back; returns each one's latency in ns if it timed them."""
Settle = Callable[[int], Awaitable[None]]
"""Untimed, after a burst of `count` operations: checks their effect, readies the next."""


def argument_parser(doc: str, loops: str = "asyncio,uvloop") -> argparse.ArgumentParser:
    """--loops, --json, --quick and --pin, the same in every script."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--loops", default=loops, help="comma-separated: asyncio, uvloop")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="tiny counts, for a smoke test")
    parser.add_argument("--pin", type=int, metavar="CPU", help="run on this CPU only")
    return parser


def parse_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The checked arguments, --loops as a list; pins the process if asked."""
    args = parser.parse_args()
    args.loops = args.loops.split(",")
    unknown = set(args.loops) - LOOP_FACTORIES.keys()
    if unknown:
        parser.error(f"unknown loops: {', '.join(sorted(unknown))}")
    if args.pin is not None:
        if args.pin not in os.sched_getaffinity(0):
            parser.error(f"CPU {args.pin} is not one this process may run on")
        os.sched_setaffinity(0, {args.pin})
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    return args


def cpu_model() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        models = (
            line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
        )
        return next(models, platform.machine())


def machine_facts(pinned: int | None) -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "pinned_cpu": pinned,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "uvloop": importlib.metadata.version("uvloop"),
    }


@dataclass
class Result:
    """One quantity on one loop: its median across repetitions, each repetition's
    value and, where operations were timed one by one, their p50/p99 latency."""

    median: float
    per_repetition: list[float]
    p50_us: float | None = None
    p99_us: float | None = None

    @classmethod
    def of(cls, values: list[float], latencies_ns: Sequence[int] = ()) -> Result:
        """From each repetition's value and, if timed, every operation's latency."""
        ordered = sorted(latencies_ns)

        def percentile(percent: int) -> float | None:  # nearest rank
            rank = math.ceil(len(ordered) * percent / 100)
            return ordered[max(1, rank) - 1] / 1000 if ordered else None

        return cls(statistics.median(values), values, percentile(50), percentile(99))


@dataclass
class Row:
    """One line of a table: muser's figure, the baseline it is held against, their ratio."""

    benchmark: str
    against: str
    """What the baseline is."""
    loop: str
    unit: str
    muser: Result
    baseline: Result | None
    ratio: float | None
    """The median of the repetitions' own muser/baseline ratios (`paired_ratio`)."""


class Series:
    """One benchmark, timed repetition by repetition: each repetition is one
    `burst(count)`, and its value is `count * per_op` per second."""

    def __init__(
        self, burst: Burst, count: int, *, per_op: float = 1.0, settle: Settle | None = None
    ) -> None:
        self.burst = burst
        self.count = count
        self.per_op = per_op
        self.settle = settle
        self.values: list[float] = []
        self.latencies_ns: list[int] = []

    async def once(self, count: int) -> tuple[int, list[int] | None]:
        """A burst of `count` (settled after): the ns it took, and its latencies."""
        start = time.perf_counter_ns()
        latencies = await self.burst(count)
        elapsed = time.perf_counter_ns() - start
        if self.settle is not None:
            await self.settle(count)
        return elapsed, latencies

    async def run(self) -> None:
        elapsed, latencies = await self.once(self.count)
        self.values.append(self.count * self.per_op * 1e9 / elapsed)
        self.latencies_ns.extend(latencies or ())

    def result(self) -> Result:
        return Result.of(self.values, self.latencies_ns)


async def run_interleaved(series: Iterable[Series], warm_up: int, repetitions: int) -> None:
    """Warm every series up, then run their repetitions in turn, so that noise on a
    shared machine hits them alike."""
    ordered = list(series)
    for one in ordered:
        await one.once(warm_up)
    for _ in range(repetitions):
        for one in ordered:
            await one.run()


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """One rate over another as the median of each repetition's own ratio. The two
    ran back to back in every repetition, so a slowdown of the shared machine that
    lasts longer than one repetition divides out, where a ratio of medians keeps it."""
    return statistics.median(
        top / bottom for top, bottom in zip(numerator, denominator, strict=True)
    )


def loop_name() -> str:
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def compare(benchmark: str, against: str, unit: str, muser: Series, baseline: Series) -> Row:
    """A row for the running loop from two series that ran interleaved."""
    ratio = paired_ratio(muser.values, baseline.values)
    return Row(benchmark, against, loop_name(), unit, muser.result(), baseline.result(), ratio)


def round_trip_burst(round_trip: RoundTrip, *, timed: bool = True) -> Burst:
    """A burst of sequential round trips, each one timed unless told not to."""

    async def burst(count: int) -> list[int] | None:
        if not timed:
            for _ in range(count):
                await round_trip()
            return None
        clock = time.perf_counter_ns
        latencies = [0] * count
        for i in range(count):
            before = clock()
            await round_trip()
            latencies[i] = clock() - before
        return latencies

    return burst


def run_per_loop(
    args: argparse.Namespace,
    settings: dict[str, Any],
    bench_loop: Callable[..., Coroutine[Any, Any, list[Row]]],
) -> None:
    """Run `bench_loop(directory, **settings)` on each chosen loop and print its rows."""
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="muser-bench-") as directory:
        for name in args.loops:
            with asyncio.Runner(loop_factory=LOOP_FACTORIES[name]) as runner:
                rows += runner.run(bench_loop(directory, **settings))
    emit(args, settings, rows, started)


def emit(
    args: argparse.Namespace, settings: dict[str, Any], rows: list[Row], started: float
) -> None:
    """The report: one JSON object with `--json`, else a plain table."""
    report: dict[str, Any] = {
        "machine": machine_facts(args.pin),
        "settings": settings,
        "rows": [asdict(row) for row in rows],
        "elapsed_s": time.perf_counter() - started,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"machine: {json.dumps(report['machine'])}")
    print(f"settings: {json.dumps(settings)}; {report['elapsed_s']:.1f} s")
    print("\n".join(table(report["rows"])))


def number(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def latency(result: dict[str, Any] | None) -> str:
    if result is None or result["p50_us"] is None:
        return "-"
    return f"{result['p50_us']:.1f} / {result['p99_us']:.1f}"


def spread(result: dict[str, Any]) -> str:
    """(max - min) / median of the repetitions: how far to trust the median."""
    values = result["per_repetition"]
    return f"{(max(values) - min(values)) / result['median']:.1%}" if result["median"] else "-"


HEADER = (
    "benchmark", "against", "loop", "unit", "muser", "baseline", "muser/baseline",
    "spread", "p50 / p99 µs", "baseline p50 / p99 µs",
)  # fmt: skip


def table(rows: Iterable[dict[str, Any]], *, markdown: bool = False) -> list[str]:
    """Report rows (as JSON gives them) as a Markdown table or a plain aligned one."""
    cells = [list(HEADER)]
    for row in rows:
        muser, baseline, ratio = row["muser"], row["baseline"], row["ratio"]
        cells.append(
            [
                row["benchmark"],
                row["against"],
                row["loop"],
                row["unit"],
                number(muser["median"]),
                number(baseline and baseline["median"]),
                "-" if ratio is None else f"{ratio:.3f}",
                spread(muser),
                latency(muser),
                latency(baseline),
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in cells]
        return [lines[0], "|" + "---|" * 4 + "---:|" * (len(HEADER) - 4), *lines[1:]]
    widths = [max(len(line[column]) for line in cells) for column in range(len(HEADER))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    ]


class RawSocket:
    """One non-blocking socket on the loop, without any framework: sends what it is
    given (the rest once writable), receives exactly the bytes it expects into one
    buffer with `recvmsg_into`, then calls `received` (by default: the round trip
    under way is over) and expects as many again. As a client it drives both muser's
    server and the socket baseline, so that the two differ only in what answers."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        largest: int = 4096,
        received: Callable[[], None] | None = None,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._received = received or self._answered
        self._waiter: asyncio.Future[None] = loop.create_future()
        self._buffer = memoryview(bytearray(largest))
        self._whole = [self._buffer]
        self._window = self._whole
        """What is still to come of the expected bytes: one view, as `recvmsg_into` takes it."""
        self._unsent = memoryview(b"")
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)

    def round_trip(self, request: bytes | memoryview, reply_size: int) -> RoundTrip:
        """One round trip, to time; `reply()` then gives what came back."""

        async def round_trip() -> None:
            self._waiter = waiter = self._loop.create_future()
            self._whole = self._window = [self._buffer[:reply_size]]
            self.send(request)
            await waiter

        return round_trip

    def reply(self) -> bytes:
        return bytes(self._whole[0])

    def _answered(self) -> None:
        self._waiter.set_result(None)

    def _readable(self) -> None:
        count, _ancillary, _flags, _address = self._sock.recvmsg_into(self._window, ANCILLARY_SIZE)
        if not count:
            raise ConnectionError("the peer closed the socket")
        window = self._window[0]
        if count < len(window):
            self._window = [window[count:]]
        else:
            self._window = self._whole
            self._received()

    def send(self, data: bytes | memoryview) -> None:
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self._unsent = memoryview(data)[sent:]
            self._loop.add_writer(self._sock.fileno(), self._writable)

    def _writable(self) -> None:
        self._unsent = self._unsent[self._sock.send(self._unsent) :]
        if not self._unsent:
            self._loop.remove_writer(self._sock.fileno())

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


class SocketBaseline:
    """The floor of request/reply and of bulk copies: both ends of a socketpair on one
    loop, a `RawSocket` sending `request_size` bytes and another answering each with
    `reply_size` bytes, each received into one buffer, copied by nothing but the kernel."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, request_size: int, reply_size: int
    ) -> None:
        client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._reply = memoryview(bytes(reply_size))
        self._client = RawSocket(loop, client, reply_size)
        self._server = RawSocket(loop, server, request_size, self._requested)
        self.round_trip = self._client.round_trip(bytes(request_size), reply_size)

    def _requested(self) -> None:
        self._server.send(self._reply)

    def close(self) -> None:
        self._client.close()
        self._server.close()


def eventfd_writes(eventfd: int) -> Burst:
    """The floor of an interrupt: `os.eventfd_write` back to back, the system call
    every trigger ends in."""

    async def burst(count: int) -> None:
        write = os.eventfd_write
        for _ in range(count):
            write(eventfd, 1)

    return burst


class EventfdReader:
    """The floor of a doorbell: an eventfd the loop watches with `add_reader`, whose
    callback reads the counter and calls `handler(None, count)`, as muser calls a
    doorbell's."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, handler: Callable[[int | None, int], None]
    ) -> None:
        self._loop = loop
        self._handler = handler
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        self._handler(None, os.eventfd_read(self.fd))

    def close(self) -> None:
        self._loop.remove_reader(self.fd)
        os.close(self.fd)


def mmap_copies(memory: memoryview, size: int, walk: int) -> tuple[Burst, Burst]:
    """The floor of mapped DMA: reads (`bytes` of a slice) and writes (slice
    assignment) of `size` bytes on a plain mapping, walking `walk` bytes of it."""
    data = bytes(size)

    async def read(count: int) -> None:
        for i in range(count):
            offset = i * size % walk
            bytes(memory[offset : offset + size])

    async def write(count: int) -> None:
        for i in range(count):
            offset = i * size % walk
            memory[offset : offset + size] = data

    return read, write


async def raw_session(path: str, capabilities: bytes = b"{}") -> socket.socket:
    """A socket connected to muser's server on which VERSION has been negotiated by
    hand, for a `RawSocket` to drive it with prebuilt messages."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, path)
    version = Version(PROTOCOL_MAJOR, PROTOCOL_MINOR, capabilities + b"\0").build()
    await loop.sock_sendall(sock, message(Command.VERSION, version))
    header = await loop.sock_recv(sock, HEADER_SIZE)
    _msg_id, _command, size, flags, error = HEADER_CODEC.unpack(header)
    if flags & ERROR_BIT:
        raise RuntimeError(f"VERSION refused: errno {error}")
    remaining = size - HEADER_SIZE
    while remaining:
        remaining -= len(await loop.sock_recv(sock, remaining))
    return sock


def message(command: int, payload: bytes, flags: int = 0) -> bytes:
    """A whole message, built once and sent as it is on every round trip."""
    return encode_header(0, command, len(payload), flags) + payload
