"""gpio: an ACCES PCI-IDIO-16 (16 FET outputs, 16 isolated inputs), so that Linux's
in-kernel `gpio-pci-idio-16` driver binds to it in a QEMU guest.

    python -m muser.run gpio --socket /tmp/gpio.sock

Like libvfio-user's gpio sample, every set bit written to an output register counts
up that pin's counter, and an input reads 1 while its pin's counter is a multiple
of 3, so writing outputs makes inputs change. Beyond that sample it behaves as the
board does where the driver looks: output registers read back what was written,
reading IRQ Control enables the change-of-state interrupt and writing it disables
it, an input change then raises INTx and sets the status register, and writing
the first input register clears it.

BAR2 (256 bytes of I/O space) holds the registers:

    0x0  outputs 0-7      0x1  inputs 0-7 (write: clear interrupt)
    0x2  IRQ control      0x3  input filter control
    0x4  outputs 8-15     0x5  inputs 8-15
    0x6  IRQ status
"""

from __future__ import annotations

import muser

VENDOR_ID = 0x494F
DEVICE_ID = 0x0DC8
CLASS_DATA_ACQUISITION = 0x118000
"""Data acquisition and signal processing controller, other."""
PINS = 16
ALL_INPUTS = (1 << PINS) - 1
"""Every counter at 0, a multiple of 3: every input reads 1."""

OUT_0_7, IN_0_7, IRQ_CONTROL, FILTER_CONTROL, OUT_8_15, IN_8_15, IRQ_STATUS = range(7)
IRQ_PENDING = 0x07
"""What IRQ status reads while a change-of-state interrupt is pending: the driver
checks bits 0-1 and bit 2."""


class Gpio(muser.PciDevice):
    def __init__(self) -> None:
        self.outputs = 0
        self.counters = [0] * PINS
        self.inputs = ALL_INPUTS
        """Bit n set while pin n's counter is a multiple of 3, kept as counters change:
        a guest polls inputs, and reading them is one attribute, not 16 divisions."""
        self.irq_enabled = False
        self.irq_pending = False
        self.filters_active = False
        super().__init__(
            vendor_id=VENDOR_ID,
            device_id=DEVICE_ID,
            subsystem_vendor_id=VENDOR_ID,
            subsystem_id=DEVICE_ID,
            class_code=CLASS_DATA_ACQUISITION,
            intx=True,
            bars={2: muser.Bar(0x100, kind=muser.BarKind.IO, read=self.read, write=self.write)},
            name="gpio",
        )

    def read(self, offset: int, count: int) -> bytes:
        if count == 1:  # what the driver's inb does
            return bytes((self.read_register(offset),))
        return bytes(self.read_register(register) for register in range(offset, offset + count))

    def read_register(self, register: int) -> int:
        if register == OUT_0_7:
            return self.outputs & 0xFF
        if register == OUT_8_15:
            return self.outputs >> 8
        if register == IN_0_7:
            return self.inputs & 0xFF
        if register == IN_8_15:
            return self.inputs >> 8
        if register == IRQ_CONTROL:
            self.irq_enabled = True
        elif register == FILTER_CONTROL:
            self.filters_active = True
        elif register == IRQ_STATUS:
            return IRQ_PENDING if self.irq_pending else 0
        return 0

    def write(self, offset: int, data: bytes) -> None:
        for register, value in enumerate(data, offset):
            self.write_register(register, value)

    def write_register(self, register: int, value: int) -> None:
        if register in (OUT_0_7, OUT_8_15):
            shift = 0 if register == OUT_0_7 else 8
            before = self.inputs
            self.outputs = (self.outputs & ~(0xFF << shift)) | value << shift
            self._count(value << shift)
            if self.inputs != before and self.irq_enabled:
                self.irq_pending = True
                self.irqs.intx.set_level(True)
        elif register == IN_0_7:
            self.irq_pending = False
            self.irqs.intx.set_level(False)
        elif register == IRQ_CONTROL:
            self.irq_enabled = False
        elif register == FILTER_CONTROL:
            self.filters_active = False

    def _count(self, pins: int) -> None:
        """Count up each pin set in `pins`, and follow its input."""
        counters, inputs = self.counters, self.inputs
        while pins:
            lowest = pins & -pins
            pin = lowest.bit_length() - 1
            counters[pin] += 1
            inputs = inputs | lowest if counters[pin] % 3 == 0 else inputs & ~lowest
            pins ^= lowest
        self.inputs = inputs

    def reset(self, reason: muser.ResetReason) -> None:
        if reason is not muser.ResetReason.LOST_CONNECTION:
            self.outputs = 0
            self.counters = [0] * PINS
            self.inputs = ALL_INPUTS
            self.irq_enabled = self.irq_pending = self.filters_active = False


def create() -> Gpio:
    return Gpio()
