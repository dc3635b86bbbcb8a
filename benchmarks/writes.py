"""Posted writes, REGION_WRITE_MULTI and doorbells through muser, against a REGION_READ.

On each loop, one process, a raw client (common.RawSocket) and a `muser.Server`
whose device has a 4 KiB memory BAR0 behind plain handlers that count writes:

- posted REGION_WRITE: 4-byte writes sent back to back in batches of 100 (one
  send), each batch fenced by a REGION_READ, which the server answers only after
  applying every write before it;
- REGION_WRITE_MULTI: 200 posted 4-byte writes per message (QEMU's most), each
  message fenced the same way;
- both against the reference rate, REGION_READ round trips on the same
  connection: writes/s over reads/s is how many posted writes a read costs;
- doorbell: `os.eventfd_write` on the eventfd DEVICE_GET_REGION_IO_FDS handed out
  for a doorbell of a second device (a `muser.Client`'s), then waiting until its
  handler runs, against an eventfd watched with `add_reader` whose callback calls
  the same handler (common.EventfdReader).

Every write is proved applied (the handler's count, after each repetition), every
wake-up to answer one ring. Repetitions of all five are interleaved.

    python benchmarks/writes.py [--quick] [--json] [--pin CPU] [--loops uvloop]
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from common import (
    EventfdReader,
    RawSocket,
    RoundTrip,
    Row,
    Series,
    argument_parser,
    compare,
    message,
    parse_arguments,
    raw_session,
    round_trip_burst,
    run_interleaved,
    run_per_loop,
)

import muser
from muser.wire.constants import FLAGS_POSTED_COMMAND, Command
from muser.wire.messages import RegionAccess, WriteMulti, WriteOne

BAR_SIZE = 4096
SIZE = 4
BATCH = 100
"""Posted REGION_WRITEs per send, each send fenced by a read."""
MULTI = 200
"""Writes per REGION_WRITE_MULTI: QEMU's VFIO_USER_MULTI_MAX."""
REPLY_SIZE = 36
"""The fence's reply: header, offset/region/count, 4 bytes."""
READS = "muser REGION_READ round trips"
EVENTFD = "eventfd watched by add_reader"
POST = FLAGS_POSTED_COMMAND
FULL = {"writes": 60000, "reads": 5000, "wake_ups": 5000, "repetitions": 10, "warm_up": 500}
QUICK = {"writes": 2000, "reads": 200, "wake_ups": 200, "repetitions": 2, "warm_up": 20}


def fenced(writes: bytes) -> bytes:
    """Posted writes, then a REGION_READ the server answers only once they are applied."""
    return writes + message(Command.REGION_READ, RegionAccess(0, 0, SIZE).build())


POSTED = fenced(
    b"".join(
        message(Command.REGION_WRITE, RegionAccess(i * SIZE, 0, SIZE).build() + bytes(SIZE), POST)
        for i in range(BATCH)
    )
)
MULTI_WRITE = fenced(
    message(
        Command.REGION_WRITE_MULTI,
        WriteMulti(
            MULTI, tuple(WriteOne(i * SIZE, 0, SIZE, bytes(8)) for i in range(MULTI))
        ).build(),
        POST,
    )
)


class Wakeups:
    """Rings an eventfd and waits until `wake`, a doorbell handler, is called for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[int] = loop.create_future()

    def wake(self, _value: int | None, count: int) -> None:
        self._waiter.set_result(count)

    def ring(self, eventfd: int) -> RoundTrip:
        async def ring() -> None:
            self._waiter = self._loop.create_future()
            os.eventfd_write(eventfd, 1)
            if await self._waiter != 1:
                raise RuntimeError("one ring was reported as several")

        return ring


async def doorbell_eventfd(client: muser.Client, bar: int) -> int:
    """The doorbell's eventfd, asked for as QEMU would: first for the size needed."""
    short, _none = await client.get_region_io_fds(bar)
    reply, fds = await client.get_region_io_fds(bar, argsz=short.argsz)
    if reply.count != 1 or len(fds) != 1:
        raise RuntimeError(f"{reply.count} doorbells and {len(fds)} fds for one doorbell")
    return fds[0]


async def bench_loop(
    directory: str, writes: int, reads: int, wake_ups: int, repetitions: int, warm_up: int
) -> list[Row]:
    loop = asyncio.get_running_loop()
    memory = bytearray(BAR_SIZE)
    applied = [0]

    def write_register(offset: int, data: bytes) -> None:
        memory[offset : offset + len(data)] = data
        applied[0] += 1

    def read_register(offset: int, count: int) -> bytes:
        return bytes(memory[offset : offset + count])

    async def check_applied(count: int) -> None:
        if applied[0] != count:
            raise RuntimeError(f"{count} writes sent, the device applied {applied[0]}")
        applied[0] = 0

    wakeups = Wakeups(loop)
    registers = muser.PciDevice(
        vendor_id=0x1234,
        device_id=0x11E8,
        bars={0: muser.Bar(BAR_SIZE, read=read_register, write=write_register)},
    )
    doorbell = muser.PciDevice(
        vendor_id=0x1234,
        device_id=0x11E9,
        bars={2: muser.Bar(BAR_SIZE, doorbells=(muser.Doorbell(0, SIZE, wakeups.wake),))},
    )
    async with contextlib.AsyncExitStack() as stack:
        paths = [os.path.join(directory, name) for name in ("registers.sock", "doorbell.sock")]
        await stack.enter_async_context(muser.Server(registers, paths[0]))
        await stack.enter_async_context(muser.Server(doorbell, paths[1]))
        client = RawSocket(loop, await raw_session(paths[0], b'{"write_multiple": true}'))
        stack.callback(client.close)
        door_client = await stack.enter_async_context(await muser.Client.connect(paths[1]))
        door = await doorbell_eventfd(door_client, 2)
        stack.callback(os.close, door)
        reader = EventfdReader(loop, wakeups.wake)
        stack.callback(reader.close)

        def batches(request: bytes, per_send: int) -> Series:
            return Series(
                round_trip_burst(client.round_trip(request, REPLY_SIZE), timed=False),
                writes // per_send,
                per_op=per_send,
                settle=lambda sends: check_applied(sends * per_send),
            )

        read = Series(round_trip_burst(client.round_trip(fenced(b""), REPLY_SIZE)), reads)
        posted, multi = batches(POSTED, BATCH), batches(MULTI_WRITE, MULTI)
        eventfd, ring = (
            Series(round_trip_burst(wakeups.ring(fd)), wake_ups) for fd in (reader.fd, door)
        )
        await run_interleaved((read, posted, multi, eventfd, ring), warm_up, repetitions)
    return [
        compare(
            f"posted REGION_WRITE, 4 bytes, {BATCH} per fence", READS, "writes/s", posted, read
        ),
        compare(
            f"REGION_WRITE_MULTI, {MULTI} x 4 bytes per fence", READS, "writes/s", multi, read
        ),
        compare("doorbell: eventfd write to handler", EVENTFD, "wake-ups/s", ring, eventfd),
    ]


if __name__ == "__main__":
    args = parse_arguments(argument_parser(__doc__))
    run_per_loop(args, QUICK if args.quick else FULL, bench_loop)
