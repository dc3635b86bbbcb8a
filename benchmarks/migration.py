"""Live migration through muser, against a raw socket relay of the same bytes.

On each loop, one process: `muser.migrate(source, destination)` moves 64 MiB of
device state between two `muser.Server`s, each with its own `muser.Client`:

- device-owned: a `PciDevice` (no pre-copy) keeps the state in a bytearray of its
  own, yields it in 1 MiB chunks from `save_state` and puts it back in
  `load_state`; 64 MiB cross the wire;
- muser-carried: the state is a mappable 64-bit BAR0 (`SharedMemory`) that muser
  migrates itself, in pre-copy and again in stop-copy: 128 MiB cross the wire.

Baseline: the client's part of that traffic without any framework, per 1 MiB: a
24-byte request answered by 24 bytes + 1 MiB on one socketpair (MIG_DATA_READ),
then 24 bytes + 1 MiB answered by 16 on another (MIG_DATA_WRITE), every byte
received into a buffer (common.SocketBaseline). Each timed migration runs from
the first state change to the destination RUNNING; untimed after it, the
destination's state is checked against the source's and zeroed, and the source
set RUNNING again. Figures in MB/s (10^6 bytes/s) of state moved.

    python benchmarks/migration.py [--quick] [--json] [--pin CPU] [--loops uvloop]
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
from collections.abc import AsyncIterator

from common import (
    Burst,
    Row,
    Series,
    SocketBaseline,
    argument_parser,
    compare,
    parse_arguments,
    run_interleaved,
    run_per_loop,
)

import muser

MiB = 1024 * 1024
CHUNK = 1 * MiB
"""What the device-owned state is saved in, and what each MIG_DATA_READ asks for."""
HEADER = 24
"""A MIG_DATA_READ request, or what precedes the data of its reply or of a
MIG_DATA_WRITE: 16-byte header, argsz and size."""
RELAY = "raw socket relay, 1 MiB at a time"
FULL = {"state_bytes": 64 * MiB, "repetitions": 5, "warm_up": 1}
QUICK = {"state_bytes": 2 * MiB, "repetitions": 2, "warm_up": 1}


class OwnedState(muser.PciDevice):
    """Keeps its state in a bytearray of its own: saved in chunks at STOP_COPY (the
    only phase, without pre-copy), put back in place when loaded. A destination
    holds at most `max_device_data` of a device's own stream: room for all of it."""

    def __init__(self, size: int) -> None:
        self.state = bytearray(size)
        migration = muser.Migration(pre_copy=False, max_device_data=2 * size)
        super().__init__(vendor_id=0x1234, device_id=0x11E8, migration=migration)

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
    """A device whose state is its mappable BAR0, which muser migrates; it crosses
    twice (pre-copy, stop-copy)."""
    return muser.PciDevice(
        vendor_id=0x1234,
        device_id=0x11E8,
        bars={0: muser.Bar(size, kind=muser.BarKind.MEMORY_64, shared=muser.SharedMemory())},
        migration=muser.Migration(),
    )


async def migrations(
    stack: contextlib.AsyncExitStack, path: str, devices: tuple[muser.PciDevice, ...]
) -> Series:
    """Serves source and destination and connects a client to each: `muser.migrate`
    between them, checked and readied for the next one after each."""
    clients = []
    for device, role in zip(devices, ("source", "destination"), strict=True):
        stack.callback(device.close)
        await stack.enter_async_context(muser.Server(device, f"{path}-{role}.sock"))
        clients.append(
            await stack.enter_async_context(await muser.Client.connect(f"{path}-{role}.sock"))
        )
    states = [state(device) for device in devices]
    expected = hashlib.blake2b(states[0]).digest()

    async def migrate(count: int) -> None:
        for _ in range(count):
            await muser.migrate(clients[0], clients[1])

    async def settle(_count: int) -> None:
        if hashlib.blake2b(states[1]).digest() != expected:
            raise RuntimeError("the destination's state differs from the source's")
        states[1][:] = bytes(len(states[1]))
        await clients[0].set_migration_state(muser.MigrationState.RUNNING)

    return Series(migrate, 1, per_op=len(states[0]) / 1e6, settle=settle)


def state(device: muser.PciDevice) -> memoryview:
    return memoryview(device.state) if isinstance(device, OwnedState) else device.shared_memory(0)


def relay(loop: asyncio.AbstractEventLoop, stack: contextlib.AsyncExitStack, size: int) -> Burst:
    """The baseline: per chunk, a MIG_DATA_READ-shaped and a MIG_DATA_WRITE-shaped round trip."""
    read, write = (
        SocketBaseline(loop, HEADER, HEADER + CHUNK),
        SocketBaseline(loop, HEADER + CHUNK, 16),
    )
    stack.callback(read.close)
    stack.callback(write.close)

    async def burst(count: int) -> None:
        for _ in range(count * size // CHUNK):
            await read.round_trip()
            await write.round_trip()

    return burst


async def bench_loop(
    directory: str, state_bytes: int, repetitions: int, warm_up: int
) -> list[Row]:
    loop = asyncio.get_running_loop()
    content = os.urandom(state_bytes)
    owned = (OwnedState(state_bytes), OwnedState(state_bytes))
    carried = (carried_device(state_bytes), carried_device(state_bytes))
    state(owned[0])[:] = content
    state(carried[0])[:] = content
    async with contextlib.AsyncExitStack() as stack:
        baseline = Series(relay(loop, stack, state_bytes), 1, per_op=state_bytes / 1e6)
        owned_series = await migrations(stack, os.path.join(directory, "owned"), owned)
        carried_series = await migrations(stack, os.path.join(directory, "carried"), carried)
        await run_interleaved((baseline, owned_series, carried_series), warm_up, repetitions)
    size = f"{state_bytes // MiB} MiB"
    return [
        compare(f"migration, {size} of device-owned state", RELAY, "MB/s", owned_series, baseline),
        compare(f"migration, {size} muser-carried BAR", RELAY, "MB/s", carried_series, baseline),
    ]


if __name__ == "__main__":
    args = parse_arguments(argument_parser(__doc__))
    run_per_loop(args, QUICK if args.quick else FULL, bench_loop)
