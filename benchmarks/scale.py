"""Many devices on one loop: set-up time, memory and aggregate REGION_READ rate.

For each count N of devices (10, 100, 1000; `--devices`) and each loop, a process
of its own, forked from a parent that has run no loop (so memory an earlier run
freed cannot hide this one's growth), serves N small devices (a 4 KiB memory
BAR0, its own `muser.Server` and socket) and drives them from the same loop:

- memory: VmRSS growth (after a garbage collection) per device served;
- set-up: one `muser.Client` per device, one device at a time, doing what QEMU
  does when it realizes a device: connect, VERSION, DEVICE_GET_INFO, 9
  DEVICE_GET_REGION_INFOs, 5 DEVICE_GET_IRQ_INFOs. Interleaved with them, the
  baseline: a raw AF_UNIX connect to a listener on the same loop and one 32-byte
  ping-pong, the least a connection costs. 10 repetitions of N / 10 devices;
- REGION_READ: one client reading alone (the baseline, all N connected), and all
  N at once, each R / N times; 5 repetitions, interleaved.

Then every core: `python -m muser.run` serving 4 `null` devices with `--workers
2` against the same with one worker (both running, measured in turn): one
process here drives all 4 devices with blocking raw sockets, 16 config-space
REGION_READs in flight per device, so that the client costs little next to the
servers it shares the cores with; aggregate round trips/s.

A warm-up device goes through every step first. The soft RLIMIT_NOFILE is raised
for the 3 fds each device needs.

    python benchmarks/scale.py [--devices 10,100,1000] [--quick] [--json] [--pin CPU]
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from common import (
    LOOP_FACTORIES,
    Burst,
    Result,
    Row,
    Series,
    argument_parser,
    compare,
    emit,
    loop_name,
    message,
    paired_ratio,
    parse_arguments,
    raw_session,
    round_trip_burst,
    run_interleaved,
)

import muser
from muser.wire import close_fds
from muser.wire.constants import Command, PciRegion

BAR_SIZE = 4096
READ_SIZE = 4
PING = 32
FULL: dict[str, Any] = {
    "devices": [10, 100, 1000], "reads": 5000, "warm_up": 1000, "worker_reads": 200_000,
}  # fmt: skip
QUICK: dict[str, Any] = {"devices": [10], "reads": 500, "warm_up": 100, "worker_reads": 640}
SETUP_REPETITIONS = 10
"""Devices are set up in this many repetitions of N / 10 (one each if 10 does not divide N)."""
READ_REPETITIONS = 5
PING_BASELINE = "raw connect + 32-byte ping-pong"
ALONE = "one client alone"


def rss_kib() -> int:
    """This process's resident set, after collecting garbage."""
    gc.collect()
    with open("/proc/self/status", encoding="utf-8") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


class PingListener:
    """The set-up baseline: a raw listener on the loop that echoes 32 bytes on every
    connection, and a raw client that connects, pings and closes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str) -> None:
        self._loop = loop
        self._path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen()
        self._listener.setblocking(False)
        loop.add_reader(self._listener.fileno(), self._accept)

    def _accept(self) -> None:
        peer, _address = self._listener.accept()
        peer.setblocking(False)
        self._loop.add_reader(peer.fileno(), self._echo, peer)

    def _echo(self, peer: socket.socket) -> None:
        data = peer.recv(PING)
        if data:
            peer.send(data)
        else:
            self._loop.remove_reader(peer.fileno())
            peer.close()

    async def connect_and_ping(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            await self._loop.sock_connect(sock, self._path)
            await self._loop.sock_sendall(sock, bytes(PING))
            received = 0
            while received < PING:
                received += len(await self._loop.sock_recv(sock, PING - received))

    def close(self) -> None:
        self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        os.unlink(self._path)


async def serve(stack: contextlib.AsyncExitStack, path: str, index: int) -> None:
    """Device `index`, whose BAR0 starts with its index, served at `path` until `stack` closes."""
    memory = bytearray(BAR_SIZE)
    memory[:READ_SIZE] = index.to_bytes(READ_SIZE, "little")
    device = muser.PciDevice(
        vendor_id=0x1234,
        device_id=0x11E8,
        bars={0: muser.Bar(BAR_SIZE, read=lambda offset, n: bytes(memory[offset : offset + n]))},
    )
    stack.callback(device.close)
    await stack.enter_async_context(muser.Server(device, path))


async def set_up(stack: contextlib.AsyncExitStack, path: str) -> muser.Client:
    """A client that did what QEMU does when it realizes a device."""
    client = await stack.enter_async_context(await muser.Client.connect(path))
    info = await client.get_device_info()
    for index in range(info.num_regions):
        _region, fds = await client.get_region_info(index)
        close_fds(fds)
    for index in range(info.num_irqs):
        await client.get_irq_info(index)
    return client


def reads(clients: list[muser.Client]) -> Burst:
    """`count` REGION_READs shared out among `clients`, all reading at once."""

    async def read(client: muser.Client, count: int) -> None:
        for _ in range(count):
            await client.region_read(0, 0, READ_SIZE)

    async def burst(count: int) -> None:
        await asyncio.gather(*(read(client, count // len(clients)) for client in clients))

    return burst


async def measure(directory: str, devices: int, reads_total: int, warm_up: int) -> list[Row]:
    """Serve `devices` devices, then set them up and read from them, on the running loop."""
    async with contextlib.AsyncExitStack() as stack:
        ping = PingListener(asyncio.get_running_loop(), os.path.join(directory, "ping.sock"))
        stack.callback(ping.close)
        async with contextlib.AsyncExitStack() as warm:
            await serve(warm, os.path.join(directory, "warm-up.sock"), 0)
            await ping.connect_and_ping()
            client = await set_up(warm, os.path.join(directory, "warm-up.sock"))
            await reads([client])(warm_up)
        before = rss_kib()
        paths = [os.path.join(directory, f"{index}.sock") for index in range(devices)]
        for index, path in enumerate(paths):
            await serve(stack, path, index)
        rss = Result.of([(rss_kib() - before) / devices])
        clients: list[muser.Client] = []

        async def set_up_next() -> None:
            clients.append(await set_up(stack, paths[len(clients)]))

        repetitions = devices if devices % SETUP_REPETITIONS else SETUP_REPETITIONS
        pings, setups = (
            Series(round_trip_burst(one), devices // repetitions)
            for one in (ping.connect_and_ping, set_up_next)
        )
        await run_interleaved((pings, setups), 0, repetitions)
        answers = await asyncio.gather(
            *(client.region_read(0, 0, READ_SIZE) for client in clients)
        )
        if answers != [index.to_bytes(READ_SIZE, "little") for index in range(devices)]:
            raise RuntimeError("a client read another device's bytes")
        count = max(1, reads_total // devices) * devices
        single, together = Series(reads(clients[:1]), count), Series(reads(clients), count)
        await run_interleaved((single, together), 0, READ_REPETITIONS)
    n = f"N = {devices}"
    return [
        compare(f"device set-up as QEMU does it, {n}", PING_BASELINE, "set-ups/s", setups, pings),
        Row(f"RSS per served device, {n}", "-", loop_name(), "KiB", rss, None, None),
        compare(f"REGION_READ, N clients at once, {n}", ALONE, "round trips/s", together, single),
    ]


WORKER_DEVICES = 4
PIPELINE = 16
"""REGION_READs each device has in flight in the workers benchmark."""
CONFIG_READ = message(Command.REGION_READ, struct.pack("<QII", 0, PciRegion.CONFIG, READ_SIZE))
REPLY_SIZE = len(CONFIG_READ) + READ_SIZE


class MuserRun:
    """`python -m muser.run` serving WORKER_DEVICES null devices with `workers`
    workers, and negotiated raw sockets to each."""

    def __init__(self, directory: str, workers: int, loop: str) -> None:
        self.paths = [
            os.path.join(directory, f"w{workers}-{i}.sock") for i in range(WORKER_DEVICES)
        ]
        command = [sys.executable, "-m", "muser.run", *["null"] * WORKER_DEVICES]
        command += [arg for path in self.paths for arg in ("--socket", path)]
        command += ["--workers", str(workers), "--loop", loop, "--log-level", "warning"]
        self.process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        self.sockets: list[socket.socket] = []

    async def connect(self) -> None:
        for path in self.paths:
            for _ in range(500):
                if os.path.exists(path):
                    break
                await asyncio.sleep(0.01)
            sock = await raw_session(path)
            sock.setblocking(True)
            self.sockets.append(sock)

    def burst(self) -> Burst:
        """`count` reads, shared out among the devices, PIPELINE at a time each."""
        request, expected = CONFIG_READ * PIPELINE, REPLY_SIZE * PIPELINE
        buffer = memoryview(bytearray(expected))

        async def burst(count: int) -> None:
            for _ in range(max(1, count // (PIPELINE * WORKER_DEVICES))):
                for sock in self.sockets:
                    sock.sendall(request)
                for sock in self.sockets:
                    received = 0
                    while received < expected:
                        received += sock.recv_into(buffer[received:])

        return burst

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(10)


async def workers(directory: str, loop: str, reads_total: int) -> Row:
    """Aggregate REGION_READs/s with two workers against one."""
    runs = {count: MuserRun(directory, count, loop) for count in (1, 2)}
    try:
        for run in runs.values():
            await run.connect()
        count = max(reads_total, PIPELINE * WORKER_DEVICES)
        one, two = (Series(runs[n].burst(), count) for n in (1, 2))
        await run_interleaved((one, two), count // 10, READ_REPETITIONS)
    finally:
        for run in runs.values():
            run.close()
    return Row(
        f"REGION_READ, {WORKER_DEVICES} devices, --workers 2", "--workers 1", loop,
        "round trips/s", two.result(), one.result(), paired_ratio(two.values, one.values),
    )  # fmt: skip


def run_in_process(
    loop: str, directory: str, devices: int, reads_total: int, warm_up: int
) -> list[Row]:
    """The rows of one run in a forked child: a process that has run no loop, built no device."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as child:
        return child.submit(in_child, loop, directory, devices, reads_total, warm_up).result()


def in_child(loop: str, directory: str, devices: int, reads_total: int, warm_up: int) -> list[Row]:
    with asyncio.Runner(loop_factory=LOOP_FACTORIES[loop]) as runner:
        return runner.run(measure(directory, devices, reads_total, warm_up))


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--devices", default="10,100,1000", help="comma-separated counts N")
    args = parse_arguments(parser)
    settings = (
        QUICK if args.quick else {**FULL, "devices": [int(n) for n in args.devices.split(",")]}
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 3 * max(settings["devices"]) + 64
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="muser-bench-") as directory:
        for devices in settings["devices"]:
            for loop in args.loops:
                rows += run_in_process(
                    loop, directory, devices, settings["reads"], settings["warm_up"]
                )
        for loop in args.loops:
            rows.append(asyncio.run(workers(directory, loop, settings["worker_reads"])))
    emit(args, settings, rows, started)


if __name__ == "__main__":
    main()
