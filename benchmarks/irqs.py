"""Interrupts: MSI-X and INTx triggers through muser, against a bare eventfd write.

On each loop, one process: a device with INTx and 4 MSI-X vectors is served to a
`muser.Client` that enabled MSI-X in config space, as a guest would, and gave
MSI-X vector 0 and INTx each an eventfd with DEVICE_SET_IRQS. Timed, back to back
as plain calls on the loop's thread: `device.irqs.msix.trigger(0)`, and
`device.irqs.intx.trigger()` then `unmask(0)` (INTx masks itself on every
delivery). The baseline is `os.eventfd_write(fd, 1)` back to back, the system
call every trigger ends in (common.eventfd_writes). After every repetition each
eventfd's counter must equal the triggers fired: every interrupt is proved
delivered. Repetitions of the three are interleaved.

    python benchmarks/irqs.py [--quick] [--json] [--pin CPU] [--loops uvloop]
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from common import (
    Burst,
    Row,
    Series,
    Settle,
    argument_parser,
    compare,
    eventfd_writes,
    parse_arguments,
    run_interleaved,
    run_per_loop,
)

import muser

BAR_SIZE = 0x4000
TRIGGER_EVENTFD = muser.IrqSetFlag.DATA_EVENTFD | muser.IrqSetFlag.ACTION_TRIGGER
EVENTFD = "bare os.eventfd_write"
FULL = {"triggers": 50000, "repetitions": 20, "warm_up": 2000}
QUICK = {"triggers": 2000, "repetitions": 2, "warm_up": 200}


def counted(eventfd: int) -> Settle:
    """Checks that `count` interrupts reached `eventfd`, and resets its counter."""

    async def settle(count: int) -> None:
        signalled = os.eventfd_read(eventfd)
        if signalled != count:
            raise RuntimeError(f"{count} interrupts fired, the eventfd counted {signalled}")

    return settle


def msix_burst(trigger: Callable[[int], object]) -> Burst:
    async def burst(count: int) -> None:
        for _ in range(count):
            trigger(0)

    return burst


def intx_burst(trigger: Callable[[], object], unmask: Callable[[int], object]) -> Burst:
    async def burst(count: int) -> None:
        for _ in range(count):
            trigger()
            unmask(0)

    return burst


async def bench_loop(directory: str, triggers: int, repetitions: int, warm_up: int) -> list[Row]:
    msix = muser.MsiX(table_size=4, table_bar=0, table_offset=0x2000, pba_bar=0, pba_offset=0x3000)
    device = muser.PciDevice(
        vendor_id=0x1234,
        device_id=0x11E8,
        intx=True,
        bars={0: muser.Bar(BAR_SIZE)},
        capabilities=[msix],
    )
    path = os.path.join(directory, "irqs.sock")
    with contextlib.ExitStack() as fds:
        floor_fd, msix_fd, intx_fd = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3))
        for eventfd in (floor_fd, msix_fd, intx_fd):
            fds.callback(os.close, eventfd)
        async with muser.Server(device, path), await muser.Client.connect(path) as client:
            control = device.config.offset_of(msix) + msix.CONTROL
            enable = msix.ENABLE.to_bytes(2, "little")
            await client.region_write(muser.PciRegion.CONFIG, control, enable)
            await client.set_irqs(muser.IrqIndex.MSIX, TRIGGER_EVENTFD, 0, 1, fds=[msix_fd])
            await client.set_irqs(muser.IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[intx_fd])
            irqs = device.irqs
            baseline = Series(eventfd_writes(floor_fd), triggers, settle=counted(floor_fd))
            msix_series = Series(msix_burst(irqs.msix.trigger), triggers, settle=counted(msix_fd))
            intx = intx_burst(irqs.intx.trigger, irqs.intx.unmask)
            intx_series = Series(intx, triggers, settle=counted(intx_fd))
            await run_interleaved((baseline, msix_series, intx_series), warm_up, repetitions)
    return [
        compare("MSI-X trigger", EVENTFD, "triggers/s", msix_series, baseline),
        compare("INTx trigger + unmask", EVENTFD, "triggers/s", intx_series, baseline),
    ]


if __name__ == "__main__":
    args = parse_arguments(argument_parser(__doc__))
    run_per_loop(args, QUICK if args.quick else FULL, bench_loop)
