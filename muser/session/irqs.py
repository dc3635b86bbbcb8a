"""Interrupt commands: DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS (the device's
`Interrupts` does the work and its validation, as Linux's vfio-pci would)."""

from __future__ import annotations

from muser.errors import ProtocolError
from muser.session.context import Context
from muser.session.outcome import Outcome
from muser.wire import Frame
from muser.wire.messages import IrqInfo, IrqSet


def irq_info(context: Context, request: IrqInfo, frame: Frame) -> Outcome:
    device = context.device
    if request.argsz < IrqInfo.SIZE:
        raise ProtocolError(f"GET_IRQ_INFO argsz {request.argsz} is too small")
    if request.index >= device.num_irqs:
        raise ProtocolError(f"IRQ index {request.index} does not exist")
    irq = device.irqs[request.index]
    return IrqInfo(IrqInfo.SIZE, irq.info_flags, request.index, irq.count)


def set_irqs(context: Context, request: IrqSet, frame: Frame) -> Outcome:
    context.device.irqs.set_irqs(request, frame.take_fds())
    return None
