"""The device model: PCI devices, their BARs and regions."""

from muser.device.device import ConfigWatcher, PciDevice, ResetReason
from muser.device.regions import Bar, BarKind, ConfigRegisters, ReadHandler, WriteHandler

__all__ = [
    "Bar",
    "BarKind",
    "ConfigRegisters",
    "ConfigWatcher",
    "PciDevice",
    "ReadHandler",
    "ResetReason",
    "WriteHandler",
]
