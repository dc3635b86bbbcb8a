"""The device model: PCI devices, their BARs and regions."""

from muser.device.device import (
    ClientInfo,
    ConfigWatcher,
    DisconnectReason,
    PciDevice,
    ResetReason,
)
from muser.device.regions import Bar, BarKind, ConfigRegisters, ReadHandler, WriteHandler

__all__ = [
    "Bar",
    "BarKind",
    "ClientInfo",
    "ConfigRegisters",
    "ConfigWatcher",
    "DisconnectReason",
    "PciDevice",
    "ReadHandler",
    "ResetReason",
    "WriteHandler",
]
