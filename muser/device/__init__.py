"""The device model: PCI devices, their BARs and regions."""

from muser.device.bar import Bar, ReadHandler, WriteHandler
from muser.device.device import PciDevice, ResetReason

__all__ = ["Bar", "PciDevice", "ReadHandler", "ResetReason", "WriteHandler"]
