"""REGION_READ round trips through muser, against a raw socket echo on the same loop.

On each event loop (asyncio, uvloop) this measures, in one process, sequential
`REGION_READ`s of 4 bytes, one outstanding at a time, against a `muser.Server` on a
UNIX socket whose device has a 4 KiB memory BAR0 with a plain (non-async) read
handler, and the floor they are held against:

- baseline: no framework at all, a socketpair whose ends are driven by
  `loop.add_reader` + `recvmsg`/`sendmsg`: a raw client sends 32 bytes, a raw
  echo answers 36, the sizes of a REGION_READ and its reply;
- muser: the same raw client, now sending a real REGION_READ message (built once)
  over a negotiated connection to muser's server. It differs from the baseline
  only in what answers, so muser/baseline is the cost of the server;
- muser_client: `muser.Client.region_read` against a second such server (a server
  takes one client at a time), what a Python test or tool driving a device pays
  end to end (client/baseline).

All run on the same loop, their repetitions interleaved so that noise on a
shared machine hits them alike. Reported: the median round trips/s across
repetitions, p50/p99 latency over every round trip timed, and the ratios, each
the median of the repetitions' own ratios (common.paired_ratio).

    python benchmarks/region_read.py            # 20 x 5000 round trips per loop
    python benchmarks/region_read.py --quick    # smoke test, a second or two
    python benchmarks/region_read.py --json --pin 1 --loops uvloop
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from typing import Any

from common import (
    EchoBaseline,
    RawRequester,
    Series,
    paired_ratio,
    parse_count_arguments,
    print_machine,
    raw_session,
    region_read_request,
    run_interleaved,
    run_per_loop,
)

import muser

BAR_SIZE = 4096
READ_SIZE = 4
REPLY_SIZE = 36
"""A REGION_READ reply: 16-byte header, offset/region/count, then the data."""
WARM_UP = 2000
QUICK = {"round_trips": 500, "repetitions": 2, "warm_up": 200}


def memory_device() -> tuple[muser.PciDevice, bytearray]:
    """A device whose BAR0 is 4 KiB of memory, read by a plain function."""
    memory = bytearray(range(256)) * (BAR_SIZE // 256)

    def read(offset: int, count: int) -> bytes:
        return bytes(memory[offset : offset + count])

    device = muser.PciDevice(
        vendor_id=0x494F, device_id=0x0DC8, bars={0: muser.Bar(BAR_SIZE, read=read)}
    )
    return device, memory


async def bench_loop(
    directory: str, round_trips: int, repetitions: int, warm_up: int
) -> dict[str, Any]:
    """The three benchmarks on the running loop, their repetitions interleaved."""
    loop = asyncio.get_running_loop()
    device, memory = memory_device()
    twin, _memory = memory_device()
    path = os.path.join(directory, f"{type(loop).__name__}.sock")
    twin_path = os.path.join(directory, f"{type(loop).__name__}-client.sock")
    async with contextlib.AsyncExitStack() as stack:
        baseline = EchoBaseline(loop, REPLY_SIZE)
        stack.callback(baseline.close)
        await stack.enter_async_context(muser.Server(device, path))
        await stack.enter_async_context(muser.Server(twin, twin_path))
        client = await stack.enter_async_context(await muser.Client.connect(twin_path))
        raw = RawRequester(loop, await raw_session(path))
        stack.callback(raw.close)
        raw_read = raw.round_trip(region_read_request(0, 0, READ_SIZE), REPLY_SIZE)
        read = functools.partial(client.region_read, 0, 0, READ_SIZE)
        expected = memory[:READ_SIZE]
        if await read() != expected or (await raw_read())[-READ_SIZE:] != expected:
            raise RuntimeError("muser returned the wrong bytes")
        series = {
            "baseline": Series(baseline.round_trip),
            "muser": Series(raw_read),
            "muser_client": Series(read),
        }
        results = await run_interleaved(series, warm_up, repetitions, round_trips)
    rates = {name: result["per_repetition"] for name, result in results.items()}
    return {
        "loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
        **results,
        "ratio": paired_ratio(rates["muser"], rates["baseline"]),
        "client_ratio": paired_ratio(rates["muser_client"], rates["baseline"]),
    }


def print_table(report: dict[str, Any]) -> None:
    machine, settings = report["machine"], report["settings"]
    print_machine(machine, {name: loop["loop"] for name, loop in report["loops"].items()})
    print(
        f"settings: warm-up {settings['warm_up']}, then {settings['repetitions']} x "
        f"{settings['round_trips']} round trips per benchmark, interleaved; "
        f"REGION_READ of {READ_SIZE} bytes"
    )
    print()
    header = (
        f"{'loop':<8} {'benchmark':<14} {'round trips/s':>13} {'spread':>7} "
        f"{'p50 µs':>8} {'p99 µs':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, loop in report["loops"].items():
        for bench in ("baseline", "muser", "muser_client"):
            result = loop[bench]
            print(
                f"{name:<8} {bench:<14} {result['round_trips_per_s']:>13,.0f} "
                f"{result['spread']:>7.1%} {result['p50_us']:>8.1f} {result['p99_us']:>8.1f}"
            )
        print(f"{name:<8} {'muser/baseline':<14} {loop['ratio']:>13.3f}")
        print(f"{name:<8} {'client/baseline':<14} {loop['client_ratio']:>13.3f}")
    print()
    print(f"total time: {report['elapsed_s']:.1f} s")


def main() -> None:
    args = parse_count_arguments(
        __doc__, {"round-trips": (5000, "per repetition")}, repetitions=20
    )
    settings = (
        QUICK
        if args.quick
        else {
            "round_trips": args.round_trips,
            "repetitions": args.repetitions,
            "warm_up": WARM_UP,
        }
    )
    run_per_loop(args, settings, bench_loop, print_table)


if __name__ == "__main__":
    main()
