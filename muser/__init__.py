"""muser: be a PCI device from Python, over the vfio-user protocol.

A device is a `PciDevice` (identity, BARs, config space); a `Server` serves it on
a UNIX socket to a vfio-user client such as QEMU's `vfio-user-pci`; `Client`
speaks the protocol from the other side, for tests and tools.
"""

from muser.client import Client, MigrationReport, migrate
from muser.device import (
    Bar,
    BarKind,
    ClientInfo,
    ConfigRegisters,
    DisconnectReason,
    PciDevice,
    ResetReason,
)
from muser.device.dma import DmaDeadlockError, DmaLayout
from muser.device.irq import Delivery
from muser.device.migration import Migration, MigrationStream
from muser.device.regions import Doorbell, SharedMemory
from muser.errors import ConnectionClosedError, ProtocolError, VfioUserError
from muser.pci import (
    DeviceSerialNumber,
    Msi,
    MsiX,
    PcieType,
    PciExpress,
    PowerManagement,
    VendorSpecific,
    VendorSpecificExtended,
)
from muser.server import Server
from muser.wire.constants import (
    DmaMapFlag,
    DmaUnmapFlag,
    IrqIndex,
    IrqSetFlag,
    MigrationFlag,
    MigrationState,
    PciRegion,
)

__all__ = [
    "Bar",
    "BarKind",
    "Client",
    "ClientInfo",
    "ConfigRegisters",
    "ConnectionClosedError",
    "Delivery",
    "DeviceSerialNumber",
    "DisconnectReason",
    "DmaDeadlockError",
    "DmaLayout",
    "DmaMapFlag",
    "DmaUnmapFlag",
    "Doorbell",
    "IrqIndex",
    "IrqSetFlag",
    "Migration",
    "MigrationFlag",
    "MigrationReport",
    "MigrationState",
    "MigrationStream",
    "Msi",
    "MsiX",
    "PciDevice",
    "PciExpress",
    "PciRegion",
    "PcieType",
    "PowerManagement",
    "ProtocolError",
    "ResetReason",
    "Server",
    "SharedMemory",
    "VendorSpecific",
    "VendorSpecificExtended",
    "VfioUserError",
    "migrate",
]
