"""Region fast paths through muser: posted writes, REGION_WRITE_MULTI and doorbells.

On each event loop (asyncio, uvloop) this measures, in one process, a
`muser.Client` against a `muser.Server` on a UNIX socket whose device has a 4 KiB
memory BAR0 with plain (non-async) read and write handlers, and a BAR2 with one
4-byte doorbell:

- REGION_READ: sequential `region_read(0, 0, 4)` calls, one outstanding at a time,
  the reference rate (as benchmarks/region_read.py measures it);
- posted REGION_WRITE: `region_write(0, offset, 4 bytes, posted=True)` N times back
  to back (a posted write returns once sent), then one `region_read`, which the
  server answers only after applying every write before it, in order. Rate: N over
  the time until that read returns;
- REGION_WRITE_MULTI: batches of 200 posted 4-byte writes (the most QEMU puts in one
  message), fenced the same way; the rate counts single writes;
- muser doorbell: `os.eventfd_write` on the eventfd DEVICE_GET_REGION_IO_FDS handed
  out for the doorbell, then waiting until its handler has been called, one
  wake-up at a time;
- raw eventfd: the doorbell's baseline, without any framework, an eventfd watched
  with `loop.add_reader` whose callback reads the counter and calls the same
  handler. It is the floor: what a perfect framework could reach on that loop.

Every write is proved applied: the write handler counts its calls, and the fence
read returns the last value written. Every wake-up is proved to answer exactly one
ring. Repetitions of the five are interleaved so that noise on a shared machine hits
them alike. Reported: the median operations/s across repetitions, p50/p99 latency
for the one-at-a-time benchmarks, each write rate over the REGION_READ rate, and the
doorbell's latency over the raw eventfd's.

    python benchmarks/fast_paths.py            # 5 repetitions per loop, under a minute
    python benchmarks/fast_paths.py --quick    # smoke test, a second or two
    python benchmarks/fast_paths.py --json --pin 1 --loops uvloop
"""

from __future__ import annotations

import abc
import asyncio
import functools
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from common import (
    parse_count_arguments,
    percentile,
    print_machine,
    run_per_loop,
)

import muser
from muser.device.regions import Doorbell

BAR_SIZE = 4096
ACCESS_SIZE = 4
SLOTS = BAR_SIZE // ACCESS_SIZE
"""Writes go to successive 4-byte slots of BAR0, wrapping around."""
DOORBELL_BAR = 2
BATCH = 200
"""Writes per REGION_WRITE_MULTI: QEMU's VFIO_USER_MULTI_MAX."""
CAPABILITIES = {"max_msg_fds": 16, "write_multiple": True}
"""What the client offers in VERSION: REGION_WRITE_MULTI, as QEMU does."""
WARM_UP = 2000
QUICK = {
    "round_trips": 500,
    "writes": 2000,
    "batches": 10,
    "wake_ups": 500,
    "repetitions": 2,
    "warm_up": 200,
}

THROUGHPUT = {
    "region_read": "REGION_READ",
    "posted_write": "posted REGION_WRITE",
    "write_multi": "REGION_WRITE_MULTI",
}
"""Result keys and the names the table shows them by: the rates, against the first."""
WAKE_UP = {"raw_eventfd": "raw eventfd", "doorbell": "muser doorbell"}
"""The same for the wake-up latencies, against the first."""

RoundTrip = Callable[[], Awaitable[object]]
Send = Callable[[], Awaitable[None]]
"""Puts prepared writes on the wire, back to back, without waiting for them."""
Prepare = Callable[[list[tuple[int, bytes]]], Send]
"""Readies (BAR0 offset, data) writes for sending."""


@dataclass
class Result:
    """One benchmark on one loop."""

    per_s: float
    """The median operations/s across repetitions."""
    per_repetition: list[float]
    spread: float
    """(max - min) / median of the repetitions' operations/s."""
    p50_us: float | None
    """Latency of one operation alone; None for the pipelined benchmarks."""
    p99_us: float | None


class Series(abc.ABC):
    """One benchmark, timed repetition by repetition."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self.latencies_ns: list[int] = []

    @abc.abstractmethod
    async def time(self, count: int) -> tuple[int, list[int]]:
        """Do `count` operations; return the ns they took, and each one's if timed alone."""

    async def run(self, count: int) -> None:
        elapsed, latencies = await self.time(count)
        self.rates.append(count * 1e9 / elapsed)
        self.latencies_ns.extend(latencies)

    def result(self) -> Result:
        ordered = sorted(self.latencies_ns)
        median = statistics.median(self.rates)
        return Result(
            per_s=median,
            per_repetition=self.rates,
            spread=(max(self.rates) - min(self.rates)) / median,
            p50_us=percentile(ordered, 50) / 1000 if ordered else None,
            p99_us=percentile(ordered, 99) / 1000 if ordered else None,
        )


class RoundTrips(Series):
    """Sequential round trips, each timed on its own and all together."""

    def __init__(self, round_trip: RoundTrip) -> None:
        super().__init__()
        self.round_trip = round_trip

    async def time(self, count: int) -> tuple[int, list[int]]:
        clock = time.perf_counter_ns
        round_trip = self.round_trip
        latencies = [0] * count
        start = clock()
        for i in range(count):
            before = clock()
            await round_trip()
            latencies[i] = clock() - before
        return clock() - start, latencies


class Pipeline(Series):
    """Writes to BAR0 sent back to back, then one REGION_READ that fences them."""

    def __init__(self, client: muser.Client, registers: Registers, prepare: Prepare) -> None:
        super().__init__()
        self.client = client
        self.registers = registers
        self.prepare = prepare

    async def time(self, count: int) -> tuple[int, list[int]]:
        """Send `count` writes, distinct values to successive slots, and check that the
        device applied them all before answering the fence."""
        writes = [
            (i % SLOTS * ACCESS_SIZE, i.to_bytes(ACCESS_SIZE, "little")) for i in range(count)
        ]
        send = self.prepare(writes)
        last_offset, last_value = writes[-1]
        applied_before = self.registers.writes
        clock = time.perf_counter_ns
        start = clock()
        await send()
        fenced = await self.client.region_read(0, last_offset, ACCESS_SIZE)
        elapsed = clock() - start
        applied = self.registers.writes - applied_before
        if applied != count:
            raise RuntimeError(f"{count} writes sent, the device applied {applied}")
        if fenced != last_value:
            raise RuntimeError("the fence read did not see the last write")
        return elapsed, []


def posted_writes(client: muser.Client) -> Prepare:
    """One posted REGION_WRITE per write."""

    def prepare(writes: list[tuple[int, bytes]]) -> Send:
        async def send() -> None:
            write = client.region_write
            for offset, data in writes:
                await write(0, offset, data, posted=True)

        return send

    return prepare


def multi_writes(client: muser.Client) -> Prepare:
    """A posted REGION_WRITE_MULTI per `BATCH` writes."""

    def prepare(writes: list[tuple[int, bytes]]) -> Send:
        batches = [
            [(0, offset, data) for offset, data in writes[start : start + BATCH]]
            for start in range(0, len(writes), BATCH)
        ]

        async def send() -> None:
            write_multi = client.region_write_multi
            for batch in batches:
                await write_multi(batch)

        return send

    return prepare


class Registers:
    """BAR0: 4 KiB of memory behind plain read and write handlers that count writes."""

    def __init__(self) -> None:
        self.memory = bytearray(range(256)) * (BAR_SIZE // 256)
        self.writes = 0

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.memory[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        self.memory[offset : offset + len(data)] = data
        self.writes += 1


class Wakeup:
    """Rings an eventfd and waits until `wake`, a doorbell handler, is called for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[int] = loop.create_future()

    def wake(self, _value: int | None, count: int) -> None:
        self._waiter.set_result(count)

    async def ring(self, eventfd: int) -> None:
        self._waiter = self._loop.create_future()
        os.eventfd_write(eventfd, 1)
        if await self._waiter != 1:
            raise RuntimeError("one ring was reported as several")


class RawEventfd:
    """An eventfd the loop watches, as muser watches a doorbell's, without muser."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.wakeup = Wakeup(loop)
        loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        self.wakeup.wake(None, os.eventfd_read(self.fd))

    def close(self) -> None:
        self._loop.remove_reader(self.fd)
        os.close(self.fd)


def fast_device(doorbell: Wakeup) -> tuple[muser.PciDevice, Registers]:
    """BAR0: registers; BAR2: nothing but a doorbell at offset 0 that wakes `doorbell`."""
    registers = Registers()
    device = muser.PciDevice(
        vendor_id=0x494F,
        device_id=0x0DC9,
        bars={
            0: muser.Bar(BAR_SIZE, read=registers.read, write=registers.write),
            DOORBELL_BAR: muser.Bar(
                BAR_SIZE, doorbells=(Doorbell(0, ACCESS_SIZE, doorbell.wake),)
            ),
        },
    )
    return device, registers


async def doorbell_eventfd(client: muser.Client) -> int:
    """The doorbell's eventfd, asked for as QEMU would: first for the size needed."""
    short, _none = await client.get_region_io_fds(DOORBELL_BAR)
    reply, fds = await client.get_region_io_fds(DOORBELL_BAR, argsz=short.argsz)
    if reply.count != 1 or len(fds) != 1:
        raise RuntimeError(f"{reply.count} doorbells and {len(fds)} fds for one doorbell")
    return fds[0]


async def bench_loop(
    directory: str,
    round_trips: int,
    writes: int,
    batches: int,
    wake_ups: int,
    repetitions: int,
    warm_up: int,
) -> dict[str, Any]:
    """The five benchmarks on the running loop, their repetitions interleaved."""
    loop = asyncio.get_running_loop()
    doorbell = Wakeup(loop)
    device, registers = fast_device(doorbell)
    path = os.path.join(directory, f"{type(loop).__name__}.sock")
    raw = RawEventfd(loop)
    try:
        async with (
            muser.Server(device, path),
            await muser.Client.connect(path, capabilities=CAPABILITIES) as client,
        ):
            if client.server is None or not client.server.write_multiple:
                raise RuntimeError("the server did not agree to REGION_WRITE_MULTI")
            read = functools.partial(client.region_read, 0, 0, ACCESS_SIZE)
            if await read() != registers.memory[:ACCESS_SIZE]:
                raise RuntimeError("muser returned the wrong bytes")
            eventfd = await doorbell_eventfd(client)
            try:
                series: dict[str, tuple[Series, int]] = {
                    "region_read": (RoundTrips(read), round_trips),
                    "posted_write": (Pipeline(client, registers, posted_writes(client)), writes),
                    "write_multi": (
                        Pipeline(client, registers, multi_writes(client)),
                        batches * BATCH,
                    ),
                    "raw_eventfd": (
                        RoundTrips(functools.partial(raw.wakeup.ring, raw.fd)),
                        wake_ups,
                    ),
                    "doorbell": (RoundTrips(functools.partial(doorbell.ring, eventfd)), wake_ups),
                }
                for one, _count in series.values():
                    await one.time(warm_up)
                for _ in range(repetitions):
                    for one, count in series.values():
                        await one.run(count)
            finally:
                os.close(eventfd)
    finally:
        raw.close()
    results = {name: asdict(one.result()) for name, (one, _count) in series.items()}
    read_rate = results["region_read"]["per_s"]
    raw_eventfd, muser_doorbell = results["raw_eventfd"], results["doorbell"]
    return {
        "loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
        **results,
        "ratio": {
            "posted_write/region_read": results["posted_write"]["per_s"] / read_rate,
            "write_multi/region_read": results["write_multi"]["per_s"] / read_rate,
            "doorbell/raw_eventfd p50": muser_doorbell["p50_us"] / raw_eventfd["p50_us"],
            "doorbell/raw_eventfd p99": muser_doorbell["p99_us"] / raw_eventfd["p99_us"],
        },
    }


def print_table(report: dict[str, Any]) -> None:
    machine, settings = report["machine"], report["settings"]
    print_machine(machine, {name: loop["loop"] for name, loop in report["loops"].items()})
    print(
        f"settings: warm-up {settings['warm_up']} operations, then {settings['repetitions']} x "
        f"({settings['round_trips']} REGION_READs, {settings['writes']} posted REGION_WRITEs, "
        f"{settings['batches']} REGION_WRITE_MULTIs of {BATCH}, {settings['wake_ups']} "
        f"wake-ups each way) per loop, interleaved; {ACCESS_SIZE}-byte accesses"
    )
    loops = report["loops"].items()
    header = (
        f"{'loop':<8} {'benchmark':<20} {'per second':>11} {'spread':>7} "
        f"{'p50 µs':>8} {'p99 µs':>8}"
    )
    print()
    print(f"{header} {'x REGION_READ':>14}")
    print("-" * (len(header) + 15))
    for name, loop in loops:
        for key, label in THROUGHPUT.items():
            row = format_row(name, label, loop[key])
            ratio = loop["ratio"].get(f"{key}/region_read")
            print(row if ratio is None else f"{row} {ratio:>14.2f}")
    print()
    print(f"{header} {'p50 / raw':>10} {'p99 / raw':>10}")
    print("-" * (len(header) + 22))
    for name, loop in loops:
        for key, label in WAKE_UP.items():
            row = format_row(name, label, loop[key])
            p50, p99 = (loop["ratio"].get(f"{key}/raw_eventfd {p}") for p in ("p50", "p99"))
            print(row if p50 is None else f"{row} {p50:>10.2f} {p99:>10.2f}")
    print()
    print(f"total time: {report['elapsed_s']:.1f} s")


def format_row(loop: str, label: str, result: dict[str, Any]) -> str:
    latencies = (
        f"{'':>17}"
        if result["p50_us"] is None
        else f"{result['p50_us']:>8.1f} {result['p99_us']:>8.1f}"
    )
    return f"{loop:<8} {label:<20} {result['per_s']:>11,.0f} {result['spread']:>7.1%} {latencies}"


def main() -> None:
    args = parse_count_arguments(
        __doc__,
        {
            "round-trips": (10000, "REGION_READs per repetition"),
            "writes": (30000, "posted REGION_WRITEs per repetition"),
            "batches": (100, f"REGION_WRITE_MULTIs of {BATCH} per repetition"),
            "wake-ups": (20000, "of each kind, per repetition"),
        },
    )
    settings = (
        QUICK
        if args.quick
        else {
            "round_trips": args.round_trips,
            "writes": args.writes,
            "batches": args.batches,
            "wake_ups": args.wake_ups,
            "repetitions": args.repetitions,
            "warm_up": WARM_UP,
        }
    )
    run_per_loop(args, settings, bench_loop, print_table)


if __name__ == "__main__":
    main()
