"""Many devices on one loop: set-up time, memory and aggregate REGION_READ rate at scale.

For each count N of devices (10, 100, 1000 by default) and each event loop
(asyncio, uvloop), a run serves N devices from one process and one loop, and
drives them from the same process and loop:

- build: N small `muser.PciDevice`s (vendor 0x1234, device 0x11e8, a 4 KiB memory
  BAR0 with plain read and write handlers), each with its own `muser.Server`
  started on its own UNIX socket, one after another, timed per device;
- set-up: then one `muser.Client` per device, one device at a time, doing what
  QEMU does when it realizes a vfio-user device: connect, negotiate VERSION,
  DEVICE_GET_INFO, DEVICE_GET_REGION_INFO for all 9 regions and
  DEVICE_GET_IRQ_INFO for all 5 indexes. Timed per device, and in three parts:
  connect (the socket's connect and the client object), negotiate (the VERSION
  round trip; the server accepts the connection during it) and info (the 15
  queries);
- baseline: before each device's set-up, a raw AF_UNIX connect to a listener on
  the same loop and one 32-byte ping-pong, both ends driven by `loop.add_reader`
  + `recvmsg`/`sendmsg`, the socket closed afterwards. It is the floor: the least
  a connection with one exchange costs on that loop;
- memory: VmRSS from /proc/self/status (after a garbage collection) before
  anything is built, once the devices and servers are serving, and once every
  client is connected and negotiated. Per device: the servers alone (device,
  server, listening socket, 4 KiB of BAR memory), and servers plus clients, since
  both ends of every connection live in this process;
- REGION_READ: a first read from every client checks that each reaches its own
  device; then one client does R sequential `region_read(0, 0, 4)` calls alone
  (single, the one-device rate with all N connected), then all N clients read at
  once under `asyncio.gather`, each K = R // N sequential reads (aggregate).

Before any of that, a warm-up device goes through every step (build, set-up,
baseline, reads) and is closed again, so that what runs first in a process (code
paths, caches, shared library pages) is neither timed nor counted per device.
Every run is a process of its own, forked from a parent that has run no loop, so
that memory an earlier run freed can't hide a later run's growth, nor its
leftovers slow it; runs of every loop and N are interleaved, repetition by
repetition, so that noise on a shared machine hits them alike. Each device needs
3 fds (listener, server-side connection, client); the soft RLIMIT_NOFILE is raised
towards the hard limit if that is not enough.
Reported per loop and N: the median across repetitions of each run's median time
per device, with spread, and the p99 over every device of every repetition;
set-up/baseline; RSS per device (median across repetitions); single and aggregate
round trips/s (medians) and aggregate/single; the time to close everything.

    python benchmarks/scale.py                   # N = 10, 100, 1000, 3 repetitions, under a minute
    python benchmarks/scale.py --quick           # smoke test: N = 10, a second or two
    python benchmarks/scale.py --json --devices 100,1000 --loops uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import logging
import math
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

import structlog
from common import (
    LOOP_FACTORIES,
    add_common_arguments,
    check_common_arguments,
    emit,
    machine_facts,
    percentile,
    print_machine,
)

import muser
from muser.wire import close_fds
from muser.wire.constants import PCI_NUM_IRQS, PCI_NUM_REGIONS, PciRegion

BAR_SIZE = 0x1000
READ_SIZE = 4
PING_SIZE = 32
"""The baseline's request and answer."""
ANCILLARY_SIZE = socket.CMSG_SPACE(4 * 16)
"""Room for 16 fds, as a vfio-user endpoint must offer on every receive."""
FDS_PER_DEVICE = 3
"""The server's listening socket, its end of the connection, and the client's."""
SPARE_FDS = 64
"""For the interpreter, the loop, the baseline's sockets."""
DEVICES = [10, 100, 1000]
WARM_UP = 1000
QUICK = {"devices": [10], "reads": 1000, "repetitions": 2, "warm_up": 100}

FORK = multiprocessing.get_context("fork")

PARTS = ("build", "connect", "negotiate", "info", "setup", "baseline")
"""The per-device times a run gathers; setup is connect + negotiate + info."""


@dataclass
class Run:
    """What one run (one process, one loop, N devices) measured."""

    loop: str
    """The loop's class."""
    times_ns: dict[str, list[int]]
    """Per part (PARTS), one time per device, in device order."""
    rss_before_kib: int
    rss_servers_kib: int
    """Once every device and server was built and serving."""
    rss_clients_kib: int
    """Once every client was connected too."""
    single_per_s: float
    aggregate_per_s: float
    teardown_s: float


@dataclass
class Timing:
    """One per-device time, for one loop and N, over the repetitions."""

    median_us: float
    """The median across repetitions of each run's median over its devices."""
    per_repetition: list[float]
    spread: float
    """(max - min) / median of the repetitions' medians."""
    p99_us: float
    """Over every device of every repetition."""


@dataclass
class Stat:
    """One per-run quantity, for one loop and N, over the repetitions."""

    median: float
    per_repetition: list[float]
    spread: float
    """(max - min) / median."""


def stat(values: list[float]) -> Stat:
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median if median else math.inf
    return Stat(median=median, per_repetition=values, spread=spread)


def timing(runs: list[list[int]]) -> Timing:
    medians = stat([statistics.median(times) / 1000 for times in runs])
    pooled = sorted(time_ns for times in runs for time_ns in times)
    return Timing(
        median_us=medians.median,
        per_repetition=medians.per_repetition,
        spread=medians.spread,
        p99_us=percentile(pooled, 99) / 1000,
    )


def rss_kib() -> int:
    """This process's resident set, after collecting garbage."""
    gc.collect()
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


class PingListener:
    """The baseline: a raw listener on the loop that echoes 32 bytes on each connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str) -> None:
        self._loop = loop
        self._path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(path)
        self._listener.listen()
        self._listener.setblocking(False)
        self._peers: set[socket.socket] = set()
        self._ping = bytes(PING_SIZE)
        loop.add_reader(self._listener.fileno(), self._accept)

    def _accept(self) -> None:
        peer, _address = self._listener.accept()
        peer.setblocking(False)
        self._peers.add(peer)
        self._loop.add_reader(peer.fileno(), self._echo, peer)

    def _echo(self, peer: socket.socket) -> None:
        data, _ancillary, _flags, _address = peer.recvmsg(PING_SIZE, ANCILLARY_SIZE)
        if data:
            peer.sendmsg([data])
        else:
            self._drop(peer)

    def _drop(self, peer: socket.socket) -> None:
        self._loop.remove_reader(peer.fileno())
        peer.close()
        self._peers.discard(peer)

    @staticmethod
    def _answered(sock: socket.socket, waiter: asyncio.Future[bytes]) -> None:
        data, _ancillary, _flags, _address = sock.recvmsg(PING_SIZE, ANCILLARY_SIZE)
        if len(data) == PING_SIZE:
            waiter.set_result(data)
        else:
            waiter.set_exception(RuntimeError(f"short answer of {len(data)} bytes"))

    async def connect_and_ping(self) -> int:
        """Connect, send 32 bytes, wait for them to come back: the ns it took."""
        clock = time.perf_counter_ns
        start = clock()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            await self._loop.sock_connect(sock, self._path)
            waiter: asyncio.Future[bytes] = self._loop.create_future()
            self._loop.add_reader(sock.fileno(), self._answered, sock, waiter)
            try:
                sock.sendmsg([self._ping])
                await waiter
            finally:
                self._loop.remove_reader(sock.fileno())
            return clock() - start
        finally:
            sock.close()

    def close(self) -> None:
        self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        for peer in list(self._peers):
            self._drop(peer)
        os.unlink(self._path)


def small_device(index: int) -> muser.PciDevice:
    """A device whose 4 KiB BAR0 starts with its own index, so reads show which one answered."""
    memory = bytearray(BAR_SIZE)
    memory[:READ_SIZE] = index.to_bytes(READ_SIZE, "little")

    def read(offset: int, count: int) -> bytes:
        return bytes(memory[offset : offset + count])

    def write(offset: int, data: bytes) -> None:
        memory[offset : offset + len(data)] = data

    return muser.PciDevice(
        vendor_id=0x1234, device_id=0x11E8, bars={0: muser.Bar(BAR_SIZE, read=read, write=write)}
    )


async def query(client: muser.Client) -> None:
    """What QEMU asks a device it realizes: its info, every region's, every IRQ index's."""
    info = await client.get_device_info()
    if (info.num_regions, info.num_irqs) != (PCI_NUM_REGIONS, PCI_NUM_IRQS):
        raise RuntimeError(f"{info.num_regions} regions and {info.num_irqs} IRQ indexes")
    for index in range(info.num_regions):
        _region, fds = await client.get_region_info(index)
        close_fds(fds)
    for index in range(info.num_irqs):
        await client.get_irq_info(index)


async def sequential_reads(client: muser.Client, count: int) -> None:
    read = functools.partial(client.region_read, PciRegion.BAR0, 0, READ_SIZE)
    for _ in range(count):
        await read()


async def read_rates(clients: list[muser.Client], reads: int) -> tuple[float, float]:
    """Round trips/s of one client alone, then of all of them at once."""
    answers = await asyncio.gather(
        *(client.region_read(PciRegion.BAR0, 0, READ_SIZE) for client in clients)
    )
    for index, answer in enumerate(answers):
        if answer != index.to_bytes(READ_SIZE, "little"):
            raise RuntimeError(f"client {index} read another device's bytes")
    clock = time.perf_counter_ns
    start = clock()
    await sequential_reads(clients[0], reads)
    single = reads * 1e9 / (clock() - start)
    each = max(1, reads // len(clients))
    start = clock()
    await asyncio.gather(*(sequential_reads(client, each) for client in clients))
    aggregate = each * len(clients) * 1e9 / (clock() - start)
    return single, aggregate


async def serve(
    stack: contextlib.AsyncExitStack, index: int, path: str, times: dict[str, list[int]]
) -> None:
    """Build device `index` and start its server at `path`, closed with `stack`."""
    clock = time.perf_counter_ns
    start = clock()
    device = small_device(index)
    stack.callback(device.close)
    await stack.enter_async_context(muser.Server(device, path))
    times["build"].append(clock() - start)


async def set_up(
    stack: contextlib.AsyncExitStack, path: str, times: dict[str, list[int]]
) -> muser.Client:
    """Connect a client to the server at `path` as QEMU would, closed with `stack`."""
    clock = time.perf_counter_ns
    start = clock()
    client = await muser.Client.connect(path, negotiate=False)
    connected = clock()
    stack.push_async_exit(client)
    await client.negotiate()
    negotiated = clock()
    await query(client)
    done = clock()
    times["connect"].append(connected - start)
    times["negotiate"].append(negotiated - connected)
    times["info"].append(done - negotiated)
    times["setup"].append(done - start)
    return client


def no_times() -> dict[str, list[int]]:
    return {part: [] for part in PARTS}


async def warm_up_once(directory: str, ping: PingListener, reads: int) -> None:
    """One device through every step, then closed: what runs first in a process (code
    paths, caches, shared library pages) is then neither timed nor counted as memory
    per device."""
    async with contextlib.AsyncExitStack() as stack:
        path = os.path.join(directory, "warm-up.sock")
        await serve(stack, 0, path, no_times())
        client = await set_up(stack, path, no_times())
        await ping.connect_and_ping()
        await read_rates([client], reads)


async def bench_devices(directory: str, devices: int, reads: int, warm_up: int) -> Run:
    """Build, connect, read from and close `devices` devices on the running loop."""
    loop = asyncio.get_running_loop()
    times = no_times()
    async with contextlib.AsyncExitStack() as stack:
        ping = PingListener(loop, os.path.join(directory, "ping.sock"))
        stack.callback(ping.close)
        await warm_up_once(directory, ping, warm_up)
        rss_before = rss_kib()
        paths = [os.path.join(directory, f"{index}.sock") for index in range(devices)]
        for index, path in enumerate(paths):
            await serve(stack, index, path, times)
        rss_servers = rss_kib()
        clients: list[muser.Client] = []
        for path in paths:
            times["baseline"].append(await ping.connect_and_ping())
            clients.append(await set_up(stack, path, times))
        rss_clients = rss_kib()
        single, aggregate = await read_rates(clients, reads)
        clock = time.perf_counter_ns
        start = clock()
        await stack.aclose()
        teardown = clock() - start
    return Run(
        loop=f"{type(loop).__module__}.{type(loop).__qualname__}",
        times_ns=times,
        rss_before_kib=rss_before,
        rss_servers_kib=rss_servers,
        rss_clients_kib=rss_clients,
        single_per_s=single,
        aggregate_per_s=aggregate,
        teardown_s=teardown / 1e9,
    )


def run_in_child(
    sender: Connection, loop: str, directory: str, devices: int, reads: int, warm_up: int
) -> None:
    with asyncio.Runner(loop_factory=LOOP_FACTORIES[loop]) as runner:
        sender.send(runner.run(bench_devices(directory, devices, reads, warm_up)))


def run_in_process(loop: str, directory: str, devices: int, reads: int, warm_up: int) -> Run:
    """One run in a forked child: a process that has run no loop, built no device."""
    receiver, sender = FORK.Pipe(duplex=False)
    child = FORK.Process(
        target=run_in_child, args=(sender, loop, directory, devices, reads, warm_up)
    )
    child.start()
    sender.close()
    try:
        run: Run = receiver.recv()
    except EOFError:
        raise RuntimeError(f"the {loop} run with {devices} devices failed") from None
    finally:
        receiver.close()
        child.join()
    return run


def summarize(runs: list[Run], devices: int, reads: int) -> dict[str, Any]:
    """One loop and N, over the repetitions."""
    times = {part: asdict(timing([run.times_ns[part] for run in runs])) for part in PARTS}
    single = stat([run.single_per_s for run in runs])
    aggregate = stat([run.aggregate_per_s for run in runs])
    return {
        **times,
        "setup/baseline": times["setup"]["median_us"] / times["baseline"]["median_us"],
        "rss_before_kib": statistics.median(run.rss_before_kib for run in runs),
        "rss_servers_kib_per_device": asdict(
            stat([(run.rss_servers_kib - run.rss_before_kib) / devices for run in runs])
        ),
        "rss_kib_per_device": asdict(
            stat([(run.rss_clients_kib - run.rss_before_kib) / devices for run in runs])
        ),
        "reads_per_client": max(1, reads // devices),
        "single_per_s": asdict(single),
        "aggregate_per_s": asdict(aggregate),
        "aggregate/single": aggregate.median / single.median,
        "teardown_s": asdict(stat([run.teardown_s for run in runs])),
    }


def raise_fd_limit(needed: int) -> dict[str, int]:
    """Raise the soft RLIMIT_NOFILE to `needed` if it is lower, as far as the hard
    limit allows (the forked runs inherit it); the limits before and after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    if soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {
        "fds_needed": needed,
        "fd_limit_before": before,
        "fd_limit": soft,
        "fd_limit_hard": hard,
    }


def print_table(report: dict[str, Any]) -> None:
    machine, settings, limits = report["machine"], report["settings"], report["fd_limits"]
    print_machine(machine, report["loop_classes"])
    print(
        f"fds: {limits['fds_needed']} needed; soft limit {limits['fd_limit']} "
        f"(was {limits['fd_limit_before']}), hard limit {limits['fd_limit_hard']}"
    )
    print(
        f"settings: N = {', '.join(map(str, settings['devices']))} devices; "
        f"{settings['repetitions']} repetitions, each run its own process, interleaved; "
        f"REGION_READ of {READ_SIZE} bytes: {settings['warm_up']} on a warm-up device, then "
        f"{settings['reads']} by one client (single), and {settings['reads']} // N by "
        "each of the N clients at once (aggregate)"
    )
    results = report["results"]
    print()
    print("set-up per device, µs: medians (setup and baseline also p99 and spread)")
    header = (
        f"{'loop':<8} {'N':>5} {'build':>7} {'connect':>8} {'negotiate':>9} {'info':>7} "
        f"{'setup':>7} {'p99':>7} {'spread':>7} {'baseline':>8} {'p99':>7} {'spread':>7} "
        f"{'setup/baseline':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, by_count in results.items():
        for count, result in by_count.items():
            setup, baseline = result["setup"], result["baseline"]
            print(
                f"{name:<8} {count:>5} {result['build']['median_us']:>7.1f} "
                f"{result['connect']['median_us']:>8.1f} "
                f"{result['negotiate']['median_us']:>9.1f} {result['info']['median_us']:>7.1f} "
                f"{setup['median_us']:>7.1f} {setup['p99_us']:>7.1f} {setup['spread']:>7.1%} "
                f"{baseline['median_us']:>8.1f} {baseline['p99_us']:>7.1f} "
                f"{baseline['spread']:>7.1%} {result['setup/baseline']:>14.2f}"
            )
    print()
    print("memory: VmRSS before building, then growth per device, KiB (medians)")
    header = (
        f"{'loop':<8} {'N':>5} {'RSS before':>10} {'servers':>8} {'spread':>7} "
        f"{'+ clients':>9} {'spread':>7} {'clients':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, by_count in results.items():
        for count, result in by_count.items():
            servers, total = result["rss_servers_kib_per_device"], result["rss_kib_per_device"]
            print(
                f"{name:<8} {count:>5} {result['rss_before_kib']:>10,.0f} "
                f"{servers['median']:>8.1f} {servers['spread']:>7.1%} "
                f"{total['median']:>9.1f} {total['spread']:>7.1%} "
                f"{total['median'] - servers['median']:>8.1f}"
            )
    print()
    print("REGION_READ round trips/s (medians), and closing every client and server")
    header = (
        f"{'loop':<8} {'N':>5} {'single':>9} {'spread':>7} {'K':>5} {'aggregate':>9} "
        f"{'spread':>7} {'aggregate/single':>16} {'teardown ms':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, by_count in results.items():
        for count, result in by_count.items():
            single, aggregate = result["single_per_s"], result["aggregate_per_s"]
            print(
                f"{name:<8} {count:>5} {single['median']:>9,.0f} {single['spread']:>7.1%} "
                f"{result['reads_per_client']:>5} {aggregate['median']:>9,.0f} "
                f"{aggregate['spread']:>7.1%} {result['aggregate/single']:>16.3f} "
                f"{result['teardown_s']['median'] * 1000:>11.1f}"
            )
    print()
    print(f"total time: {report['elapsed_s']:.1f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--devices",
        default=",".join(map(str, DEVICES)),
        help="comma-separated device counts N",
    )
    parser.add_argument(
        "--reads", type=int, default=5000, help="per rate measurement, R (K = R // N)"
    )
    parser.add_argument("--repetitions", type=int, default=3)
    add_common_arguments(
        parser,
        quick_help="N = 10 and tiny counts, for a smoke test (overrides --devices and counts)",
        pin_help="run the processes on this CPU only",
    )
    args = parser.parse_args()
    check_common_arguments(parser, args)
    try:
        args.devices = [int(count) for count in args.devices.split(",")]
    except ValueError:
        parser.error("--devices takes comma-separated integers")
    if min(args.devices) < 1 or args.reads < 1 or args.repetitions < 1:
        parser.error("--devices, --reads and --repetitions must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    settings: dict[str, Any] = (
        QUICK
        if args.quick
        else {
            "devices": args.devices,
            "reads": args.reads,
            "repetitions": args.repetitions,
            "warm_up": WARM_UP,
        }
    )
    limits = raise_fd_limit(FDS_PER_DEVICE * max(settings["devices"]) + SPARE_FDS)
    if limits["fd_limit"] < limits["fds_needed"]:
        sys.exit(
            f"error: {limits['fds_needed']} fds needed, but the hard limit is "
            f"{limits['fd_limit_hard']}"
        )
    machine = machine_facts(args.pin)
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    started = time.perf_counter()
    runs: dict[tuple[str, int], list[Run]] = {
        (loop, count): [] for loop in args.loops for count in settings["devices"]
    }
    with tempfile.TemporaryDirectory(prefix="muser-bench-") as directory:
        for _ in range(settings["repetitions"]):
            for (loop, count), done in runs.items():
                done.append(
                    run_in_process(loop, directory, count, settings["reads"], settings["warm_up"])
                )
        leftovers = os.listdir(directory)
    if leftovers:
        raise RuntimeError(f"runs left files behind: {', '.join(sorted(leftovers))}")
    results: dict[str, dict[int, Any]] = {loop: {} for loop in args.loops}
    for (loop, count), done in runs.items():
        results[loop][count] = summarize(done, count, settings["reads"])
    report = {
        "machine": machine,
        "fd_limits": limits,
        "settings": settings,
        "loop_classes": {loop: done[0].loop for (loop, _count), done in runs.items()},
        "results": results,
        "elapsed_s": time.perf_counter() - started,
    }
    emit(report, args, print_table)


if __name__ == "__main__":
    main()
