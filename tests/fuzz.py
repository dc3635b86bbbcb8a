"""Fuzz a live muser server over a real socket with frames mutated from the golden
vectors, from clients of three kinds: one that reads every reply and says goodbye,
one that reads for a while and then closes abruptly, and one that never reads a
reply and closes with the start of one more message in flight (the close of a peer
with our replies unread reaches us as EPOLLERR, on which uvloop calls a reader
once). The server must never die, never stop answering (each batch ends with a
probe that must be answered within a bound), and must end with the fds and memory
it started with.

    python -m tests.fuzz --frames 1000000 [--loop asyncio]   # the long run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import random
import resource
import socket
import struct
import tempfile
import time
from dataclasses import dataclass

import structlog

from muser import Client, Server
from muser.loading import loop_factory
from muser.wire.constants import HEADER_SIZE
from tests.helpers import open_fds, version_request
from tests.integration.test_hostile import Target
from tests.vectors import all_records

PROBE_TIMEOUT = 5.0
BATCH = 200


@dataclass(frozen=True)
class FuzzReport:
    frames: int
    connections: int
    seconds: float
    fds_before: int
    fds_after: int
    rss_growth_kib: int


def corpus() -> list[bytes]:
    return [record.data for record in all_records() if record.direction == "c2s"]


def mutate(frame: bytes, rng: random.Random) -> bytes:
    """One mutated frame; most keep their size field true so the stream stays in step."""
    data = bytearray(frame)
    choice = rng.random()
    if choice < 0.35 and len(data) > HEADER_SIZE:
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(HEADER_SIZE, len(data))
            data[position] ^= 1 << rng.randrange(8)
    elif choice < 0.5:
        struct.pack_into("<H", data, 2, rng.choice([rng.randrange(20), rng.randrange(1 << 16)]))
    elif choice < 0.6:
        struct.pack_into("<I", data, 8, rng.choice([0x10, 0x20, 0x30, rng.randrange(1 << 32)]))
    elif choice < 0.75:
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(HEADER_SIZE, max(HEADER_SIZE + 1, len(data)))
            if position < len(data):
                data[position : position + 8] = rng.randbytes(min(8, len(data) - position))
    elif choice < 0.85:
        extra = rng.randbytes(rng.randrange(0, 64))
        data = data[: rng.randrange(HEADER_SIZE, len(data) + 1)] + extra
    elif choice < 0.95:
        data = data[:HEADER_SIZE] + rng.randbytes(rng.randrange(0, 128))
    else:
        return rng.randbytes(rng.randrange(1, 64))
    if choice < 0.95:
        struct.pack_into("<I", data, 4, len(data))
    return bytes(data)


def rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def _drain(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    while await loop.sock_recv(sock, 1 << 16):
        pass


READS, NEVER_READS, CLOSES_ABRUPTLY = "reads", "never reads", "closes abruptly"
CLIENT_KINDS = (READS, NEVER_READS, CLOSES_ABRUPTLY)


async def _batch(path: str, frames: list[bytes], rng: random.Random, kind: str) -> int:
    """One connection of a client of `kind`: VERSION, then the frames, some with fds.
    Returns how many frames went out before the server closed the connection (or the
    client stopped: one that never reads may find the server no longer reading)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    await loop.sock_connect(sock, path)
    drain = None if kind == NEVER_READS else loop.create_task(_drain(sock))
    if kind != READS:
        # few frames, so that the connection is likely to outlive them and the
        # close, not a bad frame, ends it
        frames = frames[: rng.randint(1, 8)]
    sent = 0
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await loop.sock_sendall(sock, version_request())
            for frame in frames:
                if rng.random() < 0.05:
                    fd = os.eventfd(0) if rng.random() < 0.5 else os.memfd_create("fuzz")
                    try:
                        await _send_with_fd(sock, frame, fd)
                    finally:
                        os.close(fd)
                else:
                    await loop.sock_sendall(sock, frame)
                sent += 1
            if kind != READS:
                await asyncio.sleep(0.002)  # the server answers; nobody reads it
                last = rng.choice(frames)
                await loop.sock_sendall(sock, last[: rng.randrange(1, len(last) + 1)])
    except (ConnectionError, BrokenPipeError, TimeoutError):
        pass
    finally:
        if kind == READS and drain is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(drain), PROBE_TIMEOUT)
        if drain is not None:
            # The read must be over before the socket closes: asyncio's selector would
            # keep the closed fd registered, and the next socket given that number (the
            # server's or the probe's, in this process) would never be polled.
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await drain
        sock.close()
    return sent


async def _send_with_fd(sock: socket.socket, frame: bytes, fd: int) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
    while True:
        try:
            sent = sock.sendmsg([frame], ancillary)
            break
        except BlockingIOError:
            await asyncio.sleep(0.001)
    if sent < len(frame):
        await asyncio.get_running_loop().sock_sendall(sock, frame[sent:])


async def fuzz(frames: int, seed: int = 0) -> FuzzReport:
    rng = random.Random(seed)
    seeds = corpus()
    with tempfile.TemporaryDirectory(prefix="mu-fuzz-", dir="/tmp") as directory:
        path = os.path.join(directory, "fuzz.sock")
        device = Target()
        async with Server(device, path, handler_timeout=2.0) as server:
            async with await Client.connect(path) as warm:
                await warm.get_device_info()
            gc.collect()
            fds_before, rss_before = len(open_fds()), rss_kib()
            started = time.monotonic()
            sent = connections = 0
            while sent < frames:
                count = min(BATCH, frames - sent)
                batch = [mutate(rng.choice(seeds), rng) for _ in range(count)]
                sent += await _batch(path, batch, rng, rng.choice(CLIENT_KINDS))
                connections += 1
                async with asyncio.timeout(PROBE_TIMEOUT):  # the device is free again
                    while server.connection is not None:
                        await asyncio.sleep(0.001)
                async with asyncio.timeout(PROBE_TIMEOUT), await Client.connect(path) as probe:
                    assert (await probe.get_device_info()).num_regions == 9
            seconds = time.monotonic() - started
            while server.connection is not None:
                await asyncio.sleep(0.001)
            fds_after = len(open_fds())
        device.close()
    return FuzzReport(sent, connections, seconds, fds_before, fds_after, rss_kib() - rss_before)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        report = runner.run(fuzz(args.frames, args.seed))
    print(
        f"{report.frames} frames over {report.connections} connections in "
        f"{report.seconds:.1f} s ({report.frames / report.seconds:,.0f} frames/s); "
        f"fds {report.fds_before} -> {report.fds_after}; "
        f"peak RSS grew {report.rss_growth_kib} KiB"
    )
    if report.fds_after != report.fds_before:
        raise SystemExit("fds leaked")


if __name__ == "__main__":
    main()
