"""Interrupt delivery through muser, against a bare eventfd write on the same loop.

On each event loop (asyncio, uvloop) this measures, in one process:

- muser msix: `device.irqs.msix.trigger(0)` called back to back, as plain calls on
  the loop's thread, on a `muser.PciDevice` served by a `muser.Server` to a
  `muser.Client` that enabled MSI-X in config space, as a guest would, and gave
  vector 0 an eventfd with DEVICE_SET_IRQS;
- muser intx: `device.irqs.intx.trigger()` then `device.irqs.intx.unmask(0)` (INTx
  masks itself on every delivery), with an eventfd assigned the same way;
- baseline: `os.eventfd_write(fd, 1)` back to back, the system call every trigger
  ends in. It is the floor: what a perfect framework could reach.

Repetitions of the three are interleaved so that noise on a shared machine hits
them alike. After every repetition the client's end of each eventfd is read: its
counter must equal the triggers fired, so every interrupt is proved delivered.
Reported: the median triggers/s across repetitions, its ns per trigger, and
muser/baseline, the median of the repetitions' own ratios (common.paired_ratio).

    python benchmarks/irq_trigger.py            # 20 x 50000 triggers per loop
    python benchmarks/irq_trigger.py --quick    # smoke test, a second or two
    python benchmarks/irq_trigger.py --json --pin 1 --loops uvloop
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from common import (
    paired_ratio,
    parse_count_arguments,
    print_machine,
    run_per_loop,
)

import muser
from muser.device.irq import Delivery, Irq
from muser.wire.constants import IrqIndex, IrqSetFlag, PciRegion

BAR_SIZE = 0x4000
TRIGGER_EVENTFD = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
WARM_UP = 2000
QUICK = {"triggers": 2000, "repetitions": 2, "warm_up": 200}

BENCHMARKS = {
    "baseline": "baseline",
    "muser_msix": "muser msix trigger",
    "muser_intx": "muser intx trigger+unmask",
}
"""Result keys and the names the table shows them by."""

Burst = Callable[[int], None]
"""Fires `count` interrupts back to back."""


@dataclass
class Result:
    """One benchmark on one loop."""

    triggers_per_s: float
    """The median across repetitions."""
    ns_per_trigger: float
    """At that median."""
    per_repetition: list[float]
    spread: float
    """(max - min) / median of the repetitions' triggers/s."""


class Series:
    """One way of firing interrupts, timed repetition by repetition."""

    def __init__(self, burst: Burst, eventfd: int) -> None:
        self.burst = burst
        self.eventfd = eventfd
        """Where the interrupts land, read back to count them."""
        self.rates: list[float] = []

    def fire(self, count: int) -> int:
        """Fire `count` interrupts and check each reached the eventfd; return the ns taken."""
        clock = time.perf_counter_ns
        start = clock()
        self.burst(count)
        elapsed = clock() - start
        signalled = drain(self.eventfd)
        if signalled != count:
            raise RuntimeError(f"{count} interrupts fired, the eventfd counted {signalled}")
        return elapsed

    def run(self, count: int) -> None:
        self.rates.append(count * 1e9 / self.fire(count))

    def result(self) -> Result:
        median = statistics.median(self.rates)
        return Result(
            triggers_per_s=median,
            ns_per_trigger=1e9 / median,
            per_repetition=self.rates,
            spread=(max(self.rates) - min(self.rates)) / median,
        )


def drain(eventfd: int) -> int:
    """Read and reset an eventfd's counter; 0 if nothing signalled it."""
    try:
        return os.eventfd_read(eventfd)
    except BlockingIOError:
        return 0


def eventfd_burst(eventfd: int) -> Burst:
    def burst(count: int) -> None:
        write = os.eventfd_write
        for _ in range(count):
            write(eventfd, 1)

    return burst


def msix_burst(msix: Irq) -> Burst:
    def burst(count: int) -> None:
        trigger = msix.trigger
        if trigger(0) is not Delivery.DELIVERED:
            raise RuntimeError("MSI-X vector 0 was not delivered")
        for _ in range(count - 1):
            trigger(0)

    return burst


def intx_burst(intx: Irq) -> Burst:
    def burst(count: int) -> None:
        trigger, unmask = intx.trigger, intx.unmask
        first = trigger()
        unmask(0)
        if first is not Delivery.DELIVERED:
            raise RuntimeError("INTx was not delivered")
        for _ in range(count - 1):
            trigger()
            unmask(0)

    return burst


def interrupting_device() -> tuple[muser.PciDevice, muser.MsiX]:
    """A device with INTx and 4 MSI-X vectors, their table and PBA in its 16 KiB BAR0."""
    memory = bytearray(BAR_SIZE)

    def read(offset: int, count: int) -> bytes:
        return bytes(memory[offset : offset + count])

    def write(offset: int, data: bytes) -> None:
        memory[offset : offset + len(data)] = data

    msix = muser.MsiX(table_size=4, table_bar=0, table_offset=0x2000, pba_bar=0, pba_offset=0x3000)
    device = muser.PciDevice(
        vendor_id=0x1234,
        device_id=0x11E8,
        intx=True,
        bars={0: muser.Bar(BAR_SIZE, read=read, write=write)},
        capabilities=[msix],
    )
    return device, msix


async def bench_loop(
    directory: str, triggers: int, repetitions: int, warm_up: int
) -> dict[str, Any]:
    """The three benchmarks on the running loop, their repetitions interleaved."""
    loop = asyncio.get_running_loop()
    device, msix = interrupting_device()
    path = os.path.join(directory, f"{type(loop).__name__}.sock")
    eventfds = {name: os.eventfd(0, os.EFD_NONBLOCK) for name in BENCHMARKS}
    try:
        async with muser.Server(device, path), await muser.Client.connect(path) as client:
            control = device.config.offset_of(msix) + msix.CONTROL
            await client.region_write(PciRegion.CONFIG, control, msix.ENABLE.to_bytes(2, "little"))
            await client.set_irqs(
                IrqIndex.MSIX, TRIGGER_EVENTFD, 0, 1, fds=[eventfds["muser_msix"]]
            )
            await client.set_irqs(
                IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[eventfds["muser_intx"]]
            )
            bursts = {
                "baseline": eventfd_burst(eventfds["baseline"]),
                "muser_msix": msix_burst(device.irqs.msix),
                "muser_intx": intx_burst(device.irqs.intx),
            }
            series = {name: Series(burst, eventfds[name]) for name, burst in bursts.items()}
            for one in series.values():
                one.fire(warm_up)
            for _ in range(repetitions):
                for one in series.values():
                    one.run(triggers)
    finally:
        for eventfd in eventfds.values():
            os.close(eventfd)
    results = {name: asdict(one.result()) for name, one in series.items()}
    baseline = results["baseline"]["per_repetition"]
    return {
        "loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
        **results,
        "ratio": {
            name: paired_ratio(results[name]["per_repetition"], baseline)
            for name in ("muser_msix", "muser_intx")
        },
    }


def print_table(report: dict[str, Any]) -> None:
    machine, settings = report["machine"], report["settings"]
    print_machine(machine, {name: loop["loop"] for name, loop in report["loops"].items()})
    print(
        f"settings: warm-up {settings['warm_up']}, then {settings['repetitions']} x "
        f"{settings['triggers']} triggers per benchmark, interleaved; every one counted "
        f"on its eventfd"
    )
    print()
    header = (
        f"{'loop':<8} {'benchmark':<26} {'triggers/s':>12} {'ns/trigger':>10} {'spread':>7} "
        f"{'muser/baseline':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, loop in report["loops"].items():
        for key, label in BENCHMARKS.items():
            result = loop[key]
            row = (
                f"{name:<8} {label:<26} {result['triggers_per_s']:>12,.0f} "
                f"{result['ns_per_trigger']:>10.0f} {result['spread']:>7.1%}"
            )
            ratio = loop["ratio"].get(key)
            print(row if ratio is None else f"{row} {ratio:>14.3f}")
    print()
    print(f"total time: {report['elapsed_s']:.1f} s")


def main() -> None:
    args = parse_count_arguments(__doc__, {"triggers": (50000, "per repetition")}, repetitions=20)
    settings = (
        QUICK
        if args.quick
        else {"triggers": args.triggers, "repetitions": args.repetitions, "warm_up": WARM_UP}
    )
    run_per_loop(args, settings, bench_loop, print_table)


if __name__ == "__main__":
    main()
