"""Region access: REGION_READ round trips through muser's server, against a raw socket echo.

On each loop, one process: a raw client (common.RawSocket: prebuilt messages,
`add_reader` + `recvmsg_into`) reads 4 bytes, one read outstanding at a time,
from a `muser.Server` whose device has a 4 KiB memory BAR0 behind a plain read
handler, and from its config space (the vendor and device IDs, as a guest's
config cycle arrives from QEMU). The baseline is the same raw client against an
echo on a socketpair answering 36 bytes to 32, the sizes of a REGION_READ and its
reply: the floor a perfect framework could reach, so muser/baseline is the cost
of muser's server. Repetitions of the three are interleaved.

    python benchmarks/regions.py [--quick] [--json] [--pin CPU] [--loops uvloop]
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from common import (
    RawSocket,
    Row,
    Series,
    SocketBaseline,
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
from muser.wire.constants import Command
from muser.wire.messages import RegionAccess

READ_SIZE = 4
REQUEST_SIZE = 32
REPLY_SIZE = 36
"""A REGION_READ request and its reply: header, offset/region/count (and data)."""
VENDOR_ID, DEVICE_ID = 0x1234, 0x11E8
ECHO = "raw socket echo, 32 -> 36 bytes"
FULL = {"round_trips": 5000, "repetitions": 20, "warm_up": 2000}
QUICK = {"round_trips": 300, "repetitions": 2, "warm_up": 100}


async def bench_loop(
    directory: str, round_trips: int, repetitions: int, warm_up: int
) -> list[Row]:
    loop = asyncio.get_running_loop()
    memory = bytearray(range(256)) * 16

    def read(offset: int, count: int) -> bytes:
        return bytes(memory[offset : offset + count])

    device = muser.PciDevice(
        vendor_id=VENDOR_ID, device_id=DEVICE_ID, bars={0: muser.Bar(len(memory), read=read)}
    )
    identity = VENDOR_ID.to_bytes(2, "little") + DEVICE_ID.to_bytes(2, "little")
    expected = {muser.PciRegion.BAR0: memory[:READ_SIZE], muser.PciRegion.CONFIG: identity}
    path = os.path.join(directory, "regions.sock")
    async with contextlib.AsyncExitStack() as stack:
        echo = SocketBaseline(loop, REQUEST_SIZE, REPLY_SIZE)
        stack.callback(echo.close)
        await stack.enter_async_context(muser.Server(device, path))
        client = RawSocket(loop, await raw_session(path))
        stack.callback(client.close)
        reads = {}
        for region, data in expected.items():
            request = message(Command.REGION_READ, RegionAccess(0, region, READ_SIZE).build())
            reads[region] = client.round_trip(request, REPLY_SIZE)
            await reads[region]()
            if client.reply()[-READ_SIZE:] != data:
                raise RuntimeError(f"muser read the wrong bytes from {region.name}")
        baseline = Series(round_trip_burst(echo.round_trip), round_trips)
        bar0 = Series(round_trip_burst(reads[muser.PciRegion.BAR0]), round_trips)
        config = Series(round_trip_burst(reads[muser.PciRegion.CONFIG]), round_trips)
        await run_interleaved((baseline, bar0, config), warm_up, repetitions)
    return [
        compare("REGION_READ, 4 bytes of BAR0", ECHO, "round trips/s", bar0, baseline),
        compare("REGION_READ, 4 bytes of config space", ECHO, "round trips/s", config, baseline),
    ]


if __name__ == "__main__":
    args = parse_arguments(argument_parser(__doc__))
    run_per_loop(args, QUICK if args.quick else FULL, bench_loop)
