"""Connect, use and drop a device over and over; the server must end each cycle with
the fds it began with and not grow without bound.

Each cycle maps guest memory (memfd), wires an interrupt (eventfd), reads a BAR
(finding what the previous client left there) and writes it, then leaves in one
of three ways: an orderly close, an abrupt close in the middle of a frame, or
(every `killed_every` cycles) a client process SIGKILLed while attached.

    python -m tests.soak --cycles 10000      # the long run
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

import structlog

from muser import Bar, Client, PciDevice, Server
from muser.wire.constants import Command
from muser.wire.messages import DmaMap, IrqSet
from tests.helpers import open_fds

# A client in its own process: negotiate, map memory, wire an interrupt, say so, hang.
KILLED_CLIENT = """
import asyncio, os, sys
from muser import Client
from muser.wire.constants import Command
from muser.wire.messages import DmaMap, IrqSet

async def main():
    client = await Client.connect(sys.argv[1])
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, 4096)
    await client.exchange(Command.DMA_MAP, DmaMap(32, 3, 0, 0, 4096).build(), [memfd])
    await client.exchange(
        Command.DEVICE_SET_IRQS, IrqSet(20, 0x24, 0, 0, 1, b"").build(), [os.eventfd(0)]
    )
    print("attached", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class SoakDevice(PciDevice):
    """A BAR of plain memory with an INTx line; keeps no history, so memory growth
    across cycles would be muser's."""

    def __init__(self) -> None:
        self.memory = bytearray(4096)
        super().__init__(
            vendor_id=0x1AF4,
            device_id=0x10F2,
            intx=True,
            bars={0: Bar(4096, read=self.read, write=self.write)},
        )

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.memory[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        self.memory[offset : offset + len(data)] = data


@dataclass(frozen=True)
class SoakReport:
    cycles: int
    killed: int
    seconds: float
    fds_before: int
    fds_after: int
    rss_kib: list[int]
    """Resident memory after each tenth of the cycles: flat means nothing accumulates."""

    @property
    def rss_growth_kib(self) -> int:
        """Growth over the last nine tenths (the first warms caches and the allocator)."""
        return self.rss_kib[-1] - self.rss_kib[0]


def resident_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


async def _cycle(path: str, number: int, previous: int) -> None:
    """Check the device kept what the last client wrote, then leave `number` for the next."""
    client = await Client.connect(path)
    memfd, eventfd = (
        os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING),
        os.eventfd(0),
    )
    try:
        os.ftruncate(memfd, 4096)
        await client.exchange(Command.DMA_MAP, DmaMap(32, 3, 0, 0, 4096).build(), [memfd])
        await client.exchange(
            Command.DEVICE_SET_IRQS, IrqSet(20, 0x24, 0, 0, 1, b"").build(), [eventfd]
        )
        assert await client.region_read(0, 0, 4) == previous.to_bytes(4, "little")
        await client.region_write(0, 0, number.to_bytes(4, "little"))
        assert await client.region_read(0, 0, 4) == number.to_bytes(4, "little")
        if number % 2:
            client.send_raw(b"\x01\x00\x00\x00\x10\x00")  # half a header, then gone
    finally:
        os.close(memfd)
        os.close(eventfd)
        client.close()
        await client.wait_closed()


async def _killed_cycle(path: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_CLIENT, path, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    assert await process.stdout.readline() == b"attached\n"
    process.send_signal(signal.SIGKILL)
    await process.wait()


async def _until_detached(server: Server) -> None:
    while server.connection is not None:
        await asyncio.sleep(0.0005)


async def soak(cycles: int, killed_every: int = 100) -> SoakReport:
    with tempfile.TemporaryDirectory(prefix="mu-soak-", dir="/tmp") as directory:
        path = os.path.join(directory, "soak.sock")
        device = SoakDevice()
        async with Server(device, path) as server:
            await _cycle(path, 0, 0)
            await _until_detached(server)
            gc.collect()
            fds_before = len(open_fds())
            started = time.monotonic()
            killed = previous = 0
            rss: list[int] = []
            for number in range(1, cycles + 1):
                if killed_every and number % killed_every == 0:
                    await _killed_cycle(path)
                    killed += 1
                else:
                    await _cycle(path, number, previous)
                    previous = number
                if number % max(1, cycles // 10) == 0:
                    rss.append(resident_kib())
                await _until_detached(server)
            seconds = time.monotonic() - started
            fds_after = len(open_fds())
        device.close()
    return SoakReport(cycles, killed, seconds, fds_before, fds_after, rss)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--killed-every", type=int, default=100)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    report = asyncio.run(soak(args.cycles, args.killed_every))
    print(
        f"{report.cycles} cycles ({report.killed} clients SIGKILLed) in "
        f"{report.seconds:.1f} s ({report.cycles / report.seconds:,.0f} cycles/s); "
        f"fds {report.fds_before} -> {report.fds_after}; "
        f"RSS by tenths {report.rss_kib} KiB"
    )
    if report.fds_after != report.fds_before:
        raise SystemExit("fds leaked")


if __name__ == "__main__":
    main()
