"""PCI configuration space and capabilities."""

from muser.pci.capabilities import (
    Capability,
    DeviceSerialNumber,
    ExtendedCapability,
    Msi,
    MsiX,
    PcieType,
    PciExpress,
    PowerManagement,
    PowerState,
    VendorSpecific,
    VendorSpecificExtended,
)
from muser.pci.config import CommandRegister, ConfigSpace, Reg, Status

__all__ = [
    "Capability",
    "CommandRegister",
    "ConfigSpace",
    "DeviceSerialNumber",
    "ExtendedCapability",
    "Msi",
    "MsiX",
    "PciExpress",
    "PcieType",
    "PowerManagement",
    "PowerState",
    "Reg",
    "Status",
    "VendorSpecific",
    "VendorSpecificExtended",
]
