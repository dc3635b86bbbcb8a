"""Live migration of a device's state through muser, against a raw socket relay on the same loop.

On each event loop (asyncio, uvloop) this measures, in one process, how fast
`muser.migrate(source, destination)` moves 64 MiB of device state from one
`muser.Server` to another, each on its own UNIX socket with its own `muser.Client`:

- device-owned state: a `PciDevice` (no pre-copy) that keeps the 64 MiB in a
  bytearray of its own; its `save_state` yields it in 1 MiB chunks at STOP_COPY and
  its `load_state` puts the chunks back in place. 64 MiB cross the wire;
- muser-carried state: a device whose 64-bit mappable BAR0 (`SharedMemory`) holds
  the 64 MiB, which muser migrates itself, in pre-copy and again in stop-copy, so
  128 MiB cross the wire;
- baseline: the same traffic shape without any framework, two socketpairs on the
  loop, driven by `loop.add_reader` + `recvmsg_into`/`sendmsg` (and `add_writer` for
  what a socket does not take at once). For each 1 MiB, the middle (the client)
  sends a 24-byte MIG_DATA_READ-sized request to the source end, receives the
  24-byte header and 1 MiB reply into one buffer, sends that on to the destination
  end, and waits for its 16-byte reply; the data leave the source's memory and land
  in the destination's without a copy in user space. It is the floor: what a
  perfect framework could reach on that loop.

Each timed migration runs from the first state change to the destination
RUNNING. Untimed, around it: the destination's copy is zeroed before, and after,
its hash is checked against the source's and the source is set RUNNING again.
An untimed warm-up migration of each kind comes first; then the repetitions of
the three are interleaved so that noise on a shared machine hits them alike.
Reported: the median MB/s (10^6 bytes/s) across repetitions, of the state and of
what crossed the wire (the migration stream, muser's record framing included),
the spread, the median seconds, and muser/baseline for both.

    python benchmarks/migration.py               # 5 x 64 MiB per kind and loop, under a minute
    python benchmarks/migration.py --quick       # smoke test of 4 MiB, a few seconds
    python benchmarks/migration.py --json --size-mib 256 --loops uvloop
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import errno
import hashlib
import os
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

from common import (
    add_common_arguments,
    check_common_arguments,
    print_machine,
    run_per_loop,
)

import muser
from muser.device.regions import SharedMemory

KiB = 1024
MiB = 1024 * KiB
CHUNK = 1 * MiB
"""What the device-owned state is saved in, and what each MIG_DATA_READ asks for."""
READ_REQUEST_SIZE = 24
"""A MIG_DATA_READ request: 16-byte header, argsz and size."""
DATA_HEADER_SIZE = 24
"""Ahead of the data of a MIG_DATA_READ reply or MIG_DATA_WRITE request: 16-byte
header, argsz and size."""
WRITE_REPLY_SIZE = 16
"""A MIG_DATA_WRITE reply: the header alone."""
ANCILLARY_SIZE = socket.CMSG_SPACE(4 * 16)
"""Room for 16 fds, as a vfio-user endpoint must offer on every receive."""
WARM_UP = 1
"""Untimed migrations of every kind before the first repetition."""
QUICK = {"state_bytes": 4 * MiB, "repetitions": 2, "warm_up": 1}

BENCHMARKS = {
    "baseline": "socket relay",
    "device_owned": "device-owned state",
    "muser_carried": "muser-carried BAR",
}
"""Result keys and the names the table shows them by."""


@dataclass
class Result:
    """One benchmark on one loop."""

    state_mb_per_s: float
    """The median across repetitions, of the state moved, in 10^6 bytes per second."""
    wire_mb_per_s: float
    """The median across repetitions, of what crossed the wire."""
    per_repetition: list[float]
    """State MB/s of each repetition."""
    spread: float
    """(max - min) / median of the repetitions' state MB/s."""
    seconds: float
    """The median time of one migration."""
    wire_bytes: int
    """What crossed the wire in one migration."""


class Series(abc.ABC):
    """One way of moving the state from source to destination, timed repetition by
    repetition and checked after each."""

    def __init__(self, state_bytes: int) -> None:
        self.state_bytes = state_bytes
        self.elapsed_ns: list[int] = []
        self.wire_bytes = 0

    @abc.abstractmethod
    def clear(self) -> None:
        """Zero the destination's copy of the state."""

    @abc.abstractmethod
    async def move(self) -> int:
        """The timed part: move the state; return the bytes that crossed the wire."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Prove the destination has the source's state, and ready the next move."""

    async def once(self) -> int:
        """One checked move; the ns it took."""
        self.clear()
        clock = time.perf_counter_ns
        start = clock()
        self.wire_bytes = await self.move()
        elapsed = clock() - start
        await self.check()
        return elapsed

    async def run(self) -> None:
        self.elapsed_ns.append(await self.once())

    def result(self) -> Result:
        rates = [self.state_bytes * 1e3 / elapsed for elapsed in self.elapsed_ns]
        median = statistics.median(rates)
        return Result(
            state_mb_per_s=median,
            wire_mb_per_s=statistics.median(
                self.wire_bytes * 1e3 / elapsed for elapsed in self.elapsed_ns
            ),
            per_repetition=rates,
            spread=(max(rates) - min(rates)) / median,
            seconds=statistics.median(self.elapsed_ns) / 1e9,
            wire_bytes=self.wire_bytes,
        )


def digest(memory: bytes | memoryview) -> bytes:
    return hashlib.blake2b(memory).digest()


def consumed(buffers: list[memoryview], count: int) -> list[memoryview]:
    """`buffers` without their first `count` bytes."""
    rest = list(buffers)
    while count:
        first = rest[0]
        if count < len(first):
            rest[0] = first[count:]
            break
        count -= len(first)
        rest.pop(0)
    return rest


class Outbox:
    """Sends lists of buffers on a non-blocking socket; what the socket does not take
    at once goes when it is writable."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self._sock = sock
        self._pending: list[memoryview] = []
        self._watching = False

    def send(self, buffers: list[memoryview]) -> None:
        self._pending = buffers
        self._flush()

    def _flush(self) -> None:
        try:
            sent = self._sock.sendmsg(self._pending)
        except BlockingIOError:
            sent = 0
        self._pending = consumed(self._pending, sent)
        if self._pending and not self._watching:
            self._loop.add_writer(self._sock.fileno(), self._flush)
            self._watching = True
        elif not self._pending and self._watching:
            self._loop.remove_writer(self._sock.fileno())
            self._watching = False

    def stop(self) -> None:
        if self._watching:
            self._loop.remove_writer(self._sock.fileno())
            self._watching = False


class RelayBaseline(Series):
    """Source end -> client -> destination end over two socketpairs, a chunk at a
    time, the way `muser.migrate` moves the stream. Every end knows the schedule:
    which chunk of the state comes next, and its size."""

    def __init__(self, loop: asyncio.AbstractEventLoop, source: bytes) -> None:
        super().__init__(len(source))
        self._loop = loop
        self._source = memoryview(source)
        self._expected = digest(source)
        self._destination = memoryview(bytearray(len(source)))
        self._buffer = memoryview(bytearray(DATA_HEADER_SIZE + CHUNK))
        """The client's: a reply from the source, then the same bytes sent on."""
        self._read_header = memoryview(bytes(DATA_HEADER_SIZE))
        self._write_header = b"\xff" * DATA_HEADER_SIZE
        self._received_header = memoryview(bytearray(DATA_HEADER_SIZE))
        self._read_request = bytes(READ_REQUEST_SIZE)
        self._write_reply = bytes(WRITE_REPLY_SIZE)
        self._received_reply = memoryview(bytearray(WRITE_REPLY_SIZE))
        self._offset = 0
        self._count = 0
        self._expecting: dict[socket.socket, list[memoryview]] = {}
        self._waiter: asyncio.Future[None] = loop.create_future()
        self._to_source, self._source_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._to_destination, self._destination_end = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_STREAM
        )
        self._sockets = (
            self._to_source,
            self._source_end,
            self._to_destination,
            self._destination_end,
        )
        for sock in self._sockets:
            sock.setblocking(False)
        self._source_outbox = Outbox(loop, self._source_end)
        self._client_outbox = Outbox(loop, self._to_destination)
        loop.add_reader(self._source_end.fileno(), self._serve_read)
        for sock, complete in (
            (self._to_source, self._wake),
            (self._destination_end, self._serve_write),
            (self._to_destination, self._wake),
        ):
            loop.add_reader(sock.fileno(), self._receive, sock, complete)

    def _serve_read(self) -> None:
        self._source_end.recvmsg(READ_REQUEST_SIZE, ANCILLARY_SIZE)
        data = self._source[self._offset : self._offset + self._count]
        self._source_outbox.send([self._read_header, data])

    def _receive(self, sock: socket.socket, complete: Callable[[], None]) -> None:
        size, _ancillary, _flags, _address = sock.recvmsg_into(
            self._expecting[sock], ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
        )
        if not size:
            self._waiter.set_exception(RuntimeError("a socketpair closed"))
            return
        self._expecting[sock] = rest = consumed(self._expecting[sock], size)
        if not rest:
            complete()

    def _serve_write(self) -> None:
        self._destination_end.sendmsg([self._write_reply])

    def _wake(self) -> None:
        self._waiter.set_result(None)

    def _expect(self, sock: socket.socket, buffers: list[memoryview]) -> asyncio.Future[None]:
        """A future done once `buffers` are filled from `sock`."""
        self._waiter = self._loop.create_future()
        self._expecting[sock] = buffers
        return self._waiter

    def clear(self) -> None:
        self._destination[:] = bytes(self.state_bytes)

    async def move(self) -> int:
        buffer = self._buffer
        for offset in range(0, self.state_bytes, CHUNK):
            self._offset = offset
            self._count = count = min(CHUNK, self.state_bytes - offset)
            message = buffer[: DATA_HEADER_SIZE + count]
            self._expecting[self._destination_end] = [
                self._received_header,
                self._destination[offset : offset + count],
            ]
            reply = self._expect(self._to_source, [message])
            self._to_source.sendmsg([self._read_request])
            await reply
            buffer[:DATA_HEADER_SIZE] = self._write_header
            written = self._expect(self._to_destination, [self._received_reply])
            self._client_outbox.send([message])
            await written
        return self.state_bytes

    async def check(self) -> None:
        if digest(self._destination) != self._expected:
            raise RuntimeError("the relay delivered the wrong bytes")

    def close(self) -> None:
        self._source_outbox.stop()
        self._client_outbox.stop()
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()


class OwnedState(muser.PciDevice):
    """Keeps its state in a bytearray of its own: saved in chunks at STOP_COPY (the
    only phase, without pre-copy), put back in place when loaded."""

    def __init__(self, size: int) -> None:
        self.state = bytearray(size)
        super().__init__(
            vendor_id=0x1234, device_id=0x11E8, migration=muser.Migration(pre_copy=False)
        )

    async def save_state(self, phase: muser.MigrationState) -> AsyncIterator[bytes]:
        state = memoryview(self.state)
        for start in range(0, len(state), CHUNK):
            yield bytes(state[start : start + CHUNK])

    async def load_state(self, chunks: AsyncIterator[bytes]) -> None:
        state = memoryview(self.state)
        offset = 0
        async for chunk in chunks:
            state[offset : offset + len(chunk)] = chunk
            offset += len(chunk)
        if offset != len(state):
            raise muser.VfioUserError(errno.EINVAL, f"{offset} bytes of state, not {len(state)}")


def carried_device(size: int) -> muser.PciDevice:
    """A device whose state is its mappable BAR0, which muser migrates."""
    return muser.PciDevice(
        vendor_id=0x1234,
        device_id=0x11E8,
        bars={0: muser.Bar(size, kind=muser.BarKind.MEMORY_64, shared=SharedMemory())},
        migration=muser.Migration(),
    )


class MuserMigration(Series):
    """`muser.migrate` from one served device to another."""

    def __init__(
        self,
        clients: tuple[muser.Client, muser.Client],
        source_state: memoryview,
        destination_state: memoryview,
        *,
        pre_copy: bool,
    ) -> None:
        super().__init__(len(source_state))
        self._source, self._destination = clients
        self._destination_state = destination_state
        self._expected = digest(source_state)
        self._pre_copy = pre_copy
        """Whether the state goes in pre-copy as well as in stop-copy."""
        self._report: muser.MigrationReport | None = None

    def clear(self) -> None:
        self._destination_state[:] = bytes(self.state_bytes)

    async def move(self) -> int:
        self._report = report = await muser.migrate(self._source, self._destination)
        return report.pre_copy_bytes + report.stop_copy_bytes

    async def check(self) -> None:
        report = self._report
        assert report is not None
        if report.stop_copy_bytes < self.state_bytes or self._pre_copy != (
            report.pre_copy_bytes >= self.state_bytes
        ):
            raise RuntimeError(f"the migration stream is not the expected size: {report}")
        if digest(self._destination_state) != self._expected:
            raise RuntimeError("the destination's state differs from the source's")
        await self._source.set_migration_state(muser.MigrationState.RUNNING)


async def serve_pair(
    stack: contextlib.AsyncExitStack, prefix: str, devices: tuple[muser.PciDevice, ...]
) -> tuple[muser.Client, muser.Client]:
    """Source and destination each served at its own path, with a client connected;
    all closed by `stack`."""
    clients = []
    for device, role in zip(devices, ("source", "destination"), strict=True):
        path = f"{prefix}-{role}.sock"
        stack.callback(device.close)
        await stack.enter_async_context(muser.Server(device, path))
        clients.append(await stack.enter_async_context(await muser.Client.connect(path)))
    return clients[0], clients[1]


async def bench_loop(
    directory: str, state_bytes: int, repetitions: int, warm_up: int
) -> dict[str, Any]:
    """The three benchmarks on the running loop, their repetitions interleaved."""
    loop = asyncio.get_running_loop()
    prefix = os.path.join(directory, type(loop).__name__)
    content = os.urandom(state_bytes)
    baseline = RelayBaseline(loop, content)
    try:
        async with contextlib.AsyncExitStack() as stack:
            owned = (OwnedState(state_bytes), OwnedState(state_bytes))
            owned[0].state[:] = content
            carried = (carried_device(state_bytes), carried_device(state_bytes))
            carried[0].shared_memory(0)[:] = content
            series: dict[str, Series] = {
                "baseline": baseline,
                "device_owned": MuserMigration(
                    await serve_pair(stack, f"{prefix}-owned", owned),
                    memoryview(owned[0].state),
                    memoryview(owned[1].state),
                    pre_copy=False,
                ),
                "muser_carried": MuserMigration(
                    await serve_pair(stack, f"{prefix}-carried", carried),
                    carried[0].shared_memory(0),
                    carried[1].shared_memory(0),
                    pre_copy=True,
                ),
            }
            for one in series.values():
                for _ in range(warm_up):
                    await one.once()
            for _ in range(repetitions):
                for one in series.values():
                    await one.run()
    finally:
        baseline.close()
    results = {name: asdict(one.result()) for name, one in series.items()}
    floor = results["baseline"]["state_mb_per_s"]
    return {
        "loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
        **results,
        "ratio": {
            name: {
                "state": results[name]["state_mb_per_s"] / floor,
                "wire": results[name]["wire_mb_per_s"] / floor,
            }
            for name in ("device_owned", "muser_carried")
        },
    }


def print_table(report: dict[str, Any]) -> None:
    machine, settings = report["machine"], report["settings"]
    print_machine(machine, {name: loop["loop"] for name, loop in report["loops"].items()})
    print(
        f"settings: {settings['state_bytes'] // MiB} MiB of state in {CHUNK // MiB} MiB "
        f"chunks; warm-up {settings['warm_up']}, then {settings['repetitions']} "
        "migrations of each kind, interleaved"
    )
    print(
        "baseline: 1 MiB ping-pongs over two socketpairs, source end -> client -> destination end"
    )
    print(
        "MB/s = 10^6 bytes/s of the state / of what crossed the wire; "
        "spread = (max - min) / median over the repetitions"
    )
    print()
    header = (
        f"{'loop':<8} {'benchmark':<19} {'state MB/s':>10} {'wire MB/s':>9} {'spread':>7} "
        f"{'seconds':>7} {'wire MiB':>8} {'state/baseline':>14} {'wire/baseline':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, loop in report["loops"].items():
        for key, label in BENCHMARKS.items():
            result = loop[key]
            line = (
                f"{name:<8} {label:<19} {result['state_mb_per_s']:>10.1f} "
                f"{result['wire_mb_per_s']:>9.1f} {result['spread']:>7.1%} "
                f"{result['seconds']:>7.3f} {result['wire_bytes'] / MiB:>8.1f}"
            )
            if key in loop["ratio"]:
                ratio = loop["ratio"][key]
                line += f" {ratio['state']:>14.3f} {ratio['wire']:>13.3f}"
            print(line)
    print()
    print(f"total time: {report['elapsed_s']:.1f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size-mib",
        type=int,
        default=64,
        help="MiB of device state, a power of two (it is also a BAR's size)",
    )
    parser.add_argument("--repetitions", type=int, default=5)
    add_common_arguments(parser, quick_help="a small state, for a smoke test (overrides counts)")
    args = parser.parse_args()
    check_common_arguments(parser, args)
    if args.size_mib < 1 or args.size_mib & (args.size_mib - 1):
        parser.error("--size-mib must be a power of two")
    if args.repetitions < 1:
        parser.error("--repetitions must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    settings = (
        QUICK
        if args.quick
        else {
            "state_bytes": args.size_mib * MiB,
            "repetitions": args.repetitions,
            "warm_up": WARM_UP,
        }
    )
    run_per_loop(args, settings, bench_loop, print_table)


if __name__ == "__main__":
    main()
