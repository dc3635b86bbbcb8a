"""What every benchmark script shares: its loops, machine facts, percentiles, arguments,
the per-loop runner, and the round-trip timing and echo baseline of the read scripts.

The scripts run as `python benchmarks/<name>.py`, so this directory is first on
sys.path and they import it as `common`.
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
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import structlog
import uvloop

from muser.wire import encode_header
from muser.wire.constants import ERROR_BIT, HEADER_SIZE, PROTOCOL_MAJOR, PROTOCOL_MINOR, Command
from muser.wire.messages import HEADER_CODEC, RegionAccess, Version

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}

QUICK_HELP = "tiny counts, for a smoke test (overrides counts)"


def machine_facts(pinned: int | None) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "pinned_cpu": pinned,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "uvloop": importlib.metadata.version("uvloop"),
    }


def percentile(ordered: Sequence[int], percent: float) -> int:
    """Nearest-rank percentile of sorted samples."""
    return ordered[max(1, math.ceil(len(ordered) * percent / 100)) - 1]


def print_machine(machine: dict[str, Any], loop_classes: dict[str, str]) -> None:
    """The lines every script's table starts with: where and on what it ran."""
    pinned = machine["pinned_cpu"]
    print(
        f"machine: {machine['cpu_count']} CPUs, {machine['cpus_usable']} usable, "
        f"{'pinned to CPU ' + str(pinned) if pinned is not None else 'not pinned'}; "
        f"{machine['implementation']} {machine['python']}; uvloop {machine['uvloop']}"
    )
    print(f"platform: {machine['platform']}")
    print("loops: " + ", ".join(f"{name} = {loop}" for name, loop in loop_classes.items()))


def add_common_arguments(
    parser: argparse.ArgumentParser,
    quick_help: str = QUICK_HELP,
    pin_help: str = "run the process on this CPU only",
) -> None:
    """--loops, --json, --quick and --pin, the same in every script."""
    parser.add_argument(
        "--loops", default="asyncio,uvloop", help="comma-separated: asyncio, uvloop"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--pin", type=int, metavar="CPU", help=pin_help)


def parse_count_arguments(
    doc: str, counts: dict[str, tuple[int, str]], repetitions: int = 5
) -> argparse.Namespace:
    """The command line of a script whose settings are counts: `--NAME N` for each
    count (its default and help), `--repetitions`, and the common options, all
    checked, every count and the repetitions at least 1."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, (default, help_text) in counts.items():
        parser.add_argument(f"--{name}", type=int, default=default, help=help_text)
    parser.add_argument("--repetitions", type=int, default=repetitions)
    add_common_arguments(parser)
    args = parser.parse_args()
    check_common_arguments(parser, args)
    names = [*counts, "repetitions"]
    if min(getattr(args, name.replace("-", "_")) for name in names) < 1:
        options = ", ".join(f"--{name}" for name in names[:-1])
        parser.error(f"{options} and --repetitions must be at least 1")
    return args


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Splits --loops into names and checks them and --pin, or exits with a usage error."""
    args.loops = args.loops.split(",")
    unknown = set(args.loops) - LOOP_FACTORIES.keys()
    if unknown:
        parser.error(f"unknown loops: {', '.join(sorted(unknown))}")
    if args.pin is not None and args.pin not in os.sched_getaffinity(0):
        parser.error(f"CPU {args.pin} is not one this process may run on")


def run_per_loop(
    args: argparse.Namespace,
    settings: dict[str, Any],
    bench_loop: Callable[..., Coroutine[Any, Any, dict[str, Any]]],
    print_table: Callable[[dict[str, Any]], None],
) -> None:
    """Run `bench_loop(directory, **settings)` on each chosen loop (pinned if asked)
    and print the report as JSON or as the script's table."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    machine = machine_facts(args.pin)
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    started = time.perf_counter()
    loops: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="muser-bench-") as directory:
        for name in args.loops:
            with asyncio.Runner(loop_factory=LOOP_FACTORIES[name]) as runner:
                loops[name] = runner.run(bench_loop(directory, **settings))
    report = {
        "machine": machine,
        "settings": settings,
        "loops": loops,
        "elapsed_s": time.perf_counter() - started,
    }
    emit(report, args, print_table)


def emit(
    report: dict[str, Any],
    args: argparse.Namespace,
    print_table: Callable[[dict[str, Any]], None],
) -> None:
    """A script's report: JSON for the runner (`--json`), else its table."""
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


RoundTrip = Callable[[], Awaitable[object]]

REQUEST_SIZE = 32
"""A REGION_READ request: 16-byte header, offset/region/count."""
ANCILLARY_SIZE = socket.CMSG_SPACE(4 * 16)
"""Room for 16 fds, as a vfio-user endpoint must offer on every receive."""


@dataclass
class Result:
    """One round-trip benchmark on one loop."""

    round_trips_per_s: float
    """The median across repetitions."""
    per_repetition: list[float]
    spread: float
    """(max - min) / median of the repetitions' round trips/s."""
    p50_us: float
    p99_us: float


class Series:
    """Round-trip timings gathered repetition by repetition."""

    def __init__(self, round_trip: RoundTrip) -> None:
        self.round_trip = round_trip
        self.rates: list[float] = []
        self.latencies_ns: list[int] = []

    async def run(self, count: int) -> None:
        """Time `count` sequential round trips, each on its own and all together."""
        clock = time.perf_counter_ns
        round_trip = self.round_trip
        latencies = [0] * count
        start = clock()
        for i in range(count):
            before = clock()
            await round_trip()
            latencies[i] = clock() - before
        elapsed = clock() - start
        self.rates.append(count * 1e9 / elapsed)
        self.latencies_ns.extend(latencies)

    def result(self) -> Result:
        ordered = sorted(self.latencies_ns)
        median = statistics.median(self.rates)
        return Result(
            round_trips_per_s=median,
            per_repetition=self.rates,
            spread=(max(self.rates) - min(self.rates)) / median,
            p50_us=percentile(ordered, 50) / 1000,
            p99_us=percentile(ordered, 99) / 1000,
        )


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """One rate over another as the median of each repetition's own ratio. The two
    ran back to back in every repetition, so a slowdown of the shared machine that
    lasts longer than one repetition divides out, where a ratio of medians keeps it."""
    return statistics.median(
        top / bottom for top, bottom in zip(numerator, denominator, strict=True)
    )


async def run_interleaved(
    series: dict[str, Series], warm_up: int, repetitions: int, round_trips: int
) -> dict[str, dict[str, Any]]:
    """Warm every series up, then run their repetitions in turn, so that noise on a
    shared machine hits them alike; return each one's result as a dict."""
    for one in series.values():
        for _ in range(warm_up):
            await one.round_trip()
    for _ in range(repetitions):
        for one in series.values():
            await one.run(round_trips)
    return {name: asdict(one.result()) for name, one in series.items()}


class RawRequester:
    """A client without any framework: one socket driven by `add_reader` + `recvmsg`,
    sending prebuilt request bytes and waiting for a reply of known size. The echo
    baseline and muser's server are both timed through it, so that the two differ
    only in what answers."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self._sock = sock
        self._reply_size = 0
        self._waiter: asyncio.Future[bytes] = loop.create_future()
        loop.add_reader(sock.fileno(), self._answered)

    def _answered(self) -> None:
        size = self._reply_size
        data, _ancillary, _flags, _address = self._sock.recvmsg(size, ANCILLARY_SIZE)
        if len(data) == size:
            self._waiter.set_result(data)
        else:
            self._waiter.set_exception(RuntimeError(f"short reply of {len(data)} bytes"))

    def round_trip(self, request: bytes, reply_size: int) -> Callable[[], Awaitable[bytes]]:
        """One round trip of `request`, answered with `reply_size` bytes, to time."""
        loop, sock = self._loop, self._sock

        async def round_trip() -> bytes:
            self._reply_size = reply_size
            waiter: asyncio.Future[bytes] = loop.create_future()
            self._waiter = waiter
            sock.sendmsg([request])
            return await waiter

        return round_trip

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


class EchoBaseline:
    """Both ends of a socketpair on one loop: a `RawRequester` sending 32 bytes, and
    an `add_reader` + `recvmsg`/`sendmsg` echo answering `reply_size` bytes. The
    floor a perfect framework could reach for a REGION_READ on that loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reply_size: int) -> None:
        self._loop = loop
        client, self._server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        self._server.setblocking(False)
        self._reply = bytes(reply_size)
        self._requester = RawRequester(loop, client)
        self.round_trip = self._requester.round_trip(bytes(REQUEST_SIZE), reply_size)
        loop.add_reader(self._server.fileno(), self._serve)

    def _serve(self) -> None:
        self._server.recvmsg(REQUEST_SIZE, ANCILLARY_SIZE)
        self._server.sendmsg([self._reply])

    def close(self) -> None:
        self._requester.close()
        self._loop.remove_reader(self._server.fileno())
        self._server.close()


async def raw_session(path: str) -> socket.socket:
    """A connected socket on which VERSION has been negotiated by hand, for a
    `RawRequester` to drive muser's server with prebuilt messages."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, path)
    payload = Version(PROTOCOL_MAJOR, PROTOCOL_MINOR, b"{}\0").build()
    await loop.sock_sendall(sock, encode_header(0, Command.VERSION, len(payload), 0) + payload)
    header = await loop.sock_recv(sock, HEADER_SIZE)
    if len(header) != HEADER_SIZE:
        raise RuntimeError("the server closed instead of answering VERSION")
    _msg_id, _command, size, flags, error = HEADER_CODEC.unpack(header)
    if flags & ERROR_BIT:
        raise RuntimeError(f"VERSION refused: errno {error}")
    remaining = size - HEADER_SIZE
    while remaining:
        remaining -= len(await loop.sock_recv(sock, remaining))
    return sock


def region_read_request(region: int, offset: int, count: int) -> bytes:
    """A whole REGION_READ message, built once and sent as it is on every round trip."""
    payload = RegionAccess(offset, region, count).build()
    return encode_header(0, Command.REGION_READ, len(payload), 0) + payload
