"""Config-space REGION_READ round trips through muser, against BAR0 and a raw socket echo.

On each event loop (asyncio, uvloop) this measures, in one process, sequential
REGION_READs, one outstanding at a time, sent by the raw client region_read.py
uses (prebuilt messages, `add_reader` + `recvmsg`) to a `muser.Server` on a UNIX
socket whose device (vendor 0x1234, device 0x11e8, no capabilities, so 256 bytes
of config space and no device-claimed config registers) has a 4 KiB memory BAR0
with a plain (non-async) read handler:

- config: region 7, offset 0, 4 bytes: the vendor and device IDs, as a guest's config
  cycle arrives from QEMU;
- bar0: region 0, offset 0, 4 bytes on the same device, the BAR path region_read.py
  measures;
- config 256: region 7, offset 0, 256 bytes: the whole of config space, as QEMU reads it
  once when it realizes the device;
- baseline and baseline 256: the same traffic shapes without any framework, a
  socketpair whose ends are driven by `loop.add_reader` + `recvmsg`/`sendmsg`,
  moving the same byte counts (a 32-byte request; a 36-byte reply, or a 288-byte
  one for 256 bytes of data). They are the floor: what a perfect framework could
  reach on that loop.

All five run on the same loop, their repetitions interleaved so that noise on a
shared machine hits them alike. Every read's bytes are checked once before timing.
Reported: the median round trips/s across repetitions, p50/p99 latency over every
round trip timed, and the ratios config/bar0, config/baseline, bar0/baseline,
config 256/baseline 256 and config 256/config, each the median of the
repetitions' own ratios (common.paired_ratio).

    python benchmarks/config_read.py            # 20 x 2500 round trips per loop, under a minute
    python benchmarks/config_read.py --quick    # smoke test, a second or two
    python benchmarks/config_read.py --json --pin 1 --loops uvloop
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

from common import (
    EchoBaseline,
    RawRequester,
    RoundTrip,
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
from muser.wire.constants import PciRegion

BAR_SIZE = 4096
READ_SIZE = 4
CONFIG_SIZE = 256
"""Config space of a device without PCI Express: what QEMU reads at realize."""
REPLY_OVERHEAD = 32
"""Its reply before the data: 16-byte header, offset/region/count."""
VENDOR_ID = 0x1234
DEVICE_ID = 0x11E8
WARM_UP = 2000
QUICK = {"round_trips": 500, "repetitions": 2, "warm_up": 200}

BENCHMARKS = {
    "baseline": "baseline",
    "bar0": "bar0",
    "config": "config",
    "baseline_256": "baseline 256",
    "config_256": "config 256",
}
"""Result keys and the names the table shows them by."""
RATIOS = {
    "config/bar0": ("config", "bar0"),
    "config/baseline": ("config", "baseline"),
    "bar0/baseline": ("bar0", "baseline"),
    "config 256/baseline 256": ("config_256", "baseline_256"),
    "config 256/config": ("config_256", "config"),
}
"""Each ratio of round trips/s, by name: (numerator, denominator)."""


def memory_device() -> tuple[muser.PciDevice, bytearray]:
    """The device: BAR0 is 4 KiB of memory, read by a plain function."""
    memory = bytearray(range(256)) * (BAR_SIZE // 256)

    def read(offset: int, count: int) -> bytes:
        return bytes(memory[offset : offset + count])

    device = muser.PciDevice(
        vendor_id=VENDOR_ID, device_id=DEVICE_ID, bars={0: muser.Bar(BAR_SIZE, read=read)}
    )
    return device, memory


async def check_reads(
    reads: dict[str, Callable[[], Awaitable[bytes]]], device: muser.PciDevice, memory: bytearray
) -> None:
    """Each muser read returns the bytes its region holds."""
    if device.config.size != CONFIG_SIZE:
        raise RuntimeError(f"config space is {device.config.size} bytes, not {CONFIG_SIZE}")
    expected = {
        "bar0": memory[:READ_SIZE],
        "config": VENDOR_ID.to_bytes(2, "little") + DEVICE_ID.to_bytes(2, "little"),
        "config_256": device.config.read(0, CONFIG_SIZE),
    }
    for name, data in expected.items():
        if (await reads[name]())[REPLY_OVERHEAD:] != data:
            raise RuntimeError(f"muser returned the wrong bytes for {BENCHMARKS[name]}")


async def bench_loop(
    directory: str, round_trips: int, repetitions: int, warm_up: int
) -> dict[str, Any]:
    """The five benchmarks on the running loop, their repetitions interleaved."""
    loop = asyncio.get_running_loop()
    device, memory = memory_device()
    path = os.path.join(directory, f"{type(loop).__name__}.sock")
    async with contextlib.AsyncExitStack() as stack:
        baselines = {
            "baseline": EchoBaseline(loop, REPLY_OVERHEAD + READ_SIZE),
            "baseline_256": EchoBaseline(loop, REPLY_OVERHEAD + CONFIG_SIZE),
        }
        for baseline in baselines.values():
            stack.callback(baseline.close)
        await stack.enter_async_context(muser.Server(device, path))
        raw = RawRequester(loop, await raw_session(path))
        stack.callback(raw.close)
        reads = {
            name: raw.round_trip(region_read_request(region, 0, count), REPLY_OVERHEAD + count)
            for name, region, count in (
                ("bar0", PciRegion.BAR0, READ_SIZE),
                ("config", PciRegion.CONFIG, READ_SIZE),
                ("config_256", PciRegion.CONFIG, CONFIG_SIZE),
            )
        }
        await check_reads(reads, device, memory)
        every: dict[str, RoundTrip] = {
            **reads,
            **{name: baseline.round_trip for name, baseline in baselines.items()},
        }
        series = {name: Series(every[name]) for name in BENCHMARKS}
        results = await run_interleaved(series, warm_up, repetitions, round_trips)
    return {
        "loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
        **results,
        "ratio": {
            name: paired_ratio(results[top]["per_repetition"], results[bottom]["per_repetition"])
            for name, (top, bottom) in RATIOS.items()
        },
    }


def print_table(report: dict[str, Any]) -> None:
    machine, settings = report["machine"], report["settings"]
    print_machine(machine, {name: loop["loop"] for name, loop in report["loops"].items()})
    print(
        f"settings: warm-up {settings['warm_up']}, then {settings['repetitions']} x "
        f"{settings['round_trips']} round trips per benchmark, interleaved; REGION_READ of "
        f"{READ_SIZE} bytes (config: region 7 offset 0, bar0: region 0 offset 0) and of "
        f"{CONFIG_SIZE} bytes (config 256)"
    )
    print()
    header = (
        f"{'loop':<8} {'benchmark':<12} {'round trips/s':>13} {'spread':>7} "
        f"{'p50 µs':>8} {'p99 µs':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, loop in report["loops"].items():
        for key, label in BENCHMARKS.items():
            result = loop[key]
            print(
                f"{name:<8} {label:<12} {result['round_trips_per_s']:>13,.0f} "
                f"{result['spread']:>7.1%} {result['p50_us']:>8.1f} {result['p99_us']:>8.1f}"
            )
    print()
    header = f"{'loop':<8} " + " ".join(f"{ratio:>{len(ratio)}}" for ratio in RATIOS)
    print(header)
    print("-" * len(header))
    for name, loop in report["loops"].items():
        print(
            f"{name:<8} "
            + " ".join(f"{loop['ratio'][ratio]:>{len(ratio)}.3f}" for ratio in RATIOS)
        )
    print()
    print(f"total time: {report['elapsed_s']:.1f} s")


def main() -> None:
    args = parse_count_arguments(
        __doc__, {"round-trips": (2500, "per repetition")}, repetitions=20
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
