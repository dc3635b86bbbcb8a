"""Every number vfio-user gives a name to, declared once as an enum.

The values come from the vfio-user specification and the Linux VFIO uAPI that it
reuses (protocol.md, Appendix A).
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

HEADER_SIZE = 16
"""Every message starts with a 16-byte header; its size field counts the header too."""

PROTOCOL_MAJOR = 0
PROTOCOL_MINOR = 2
"""The version muser speaks; replies use min(client minor, ours)."""

DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096
MESSAGE_OVERHEAD = 32
"""Room for the header and fixed fields around `max_data_xfer_size` bytes of data:
a side that offers that transfer size takes messages of up to this much more."""
DEFAULT_MAX_MSG_FDS = 1
"""Spec defaults for capabilities the peer does not mention."""


class Command(IntEnum):
    """The command number in a message header."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    """Legacy (migration v1), removed from the protocol; recognised only to be refused."""
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class MessageType(IntEnum):
    """The low four bits of the header flags."""

    COMMAND = 0
    REPLY = 1


MESSAGE_TYPE_MASK = 0xF
"""The low four bits of the header flags give the MessageType."""


class HeaderFlag(IntFlag):
    """Header flag bits above the message type."""

    NO_REPLY = 0x10
    ERROR = 0x20


# Header flag words as plain ints, for the per-message paths: IntFlag arithmetic costs
# microseconds a time on Python 3.11, int arithmetic tens of nanoseconds.
FLAGS_COMMAND = int(MessageType.COMMAND)
FLAGS_POSTED_COMMAND = int(MessageType.COMMAND | HeaderFlag.NO_REPLY)
FLAGS_REPLY = int(MessageType.REPLY)
FLAGS_ERROR_REPLY = int(MessageType.REPLY | HeaderFlag.ERROR)
NO_REPLY_BIT = int(HeaderFlag.NO_REPLY)
ERROR_BIT = int(HeaderFlag.ERROR)


class DmaMapFlag(IntFlag):
    """Access a DMA_MAP grants the device to a window."""

    READ = 0x1
    WRITE = 0x2
    MMAP = 0x4
    """libvfio-user extension: the window must be accessed by mmap."""
    FILE_IO = 0x8
    """libvfio-user extension: the window must be accessed by pread/pwrite."""


class DmaUnmapFlag(IntFlag):
    """DMA_UNMAP options (the dirty bitmap is migration v1's)."""

    GET_DIRTY_BITMAP = 0x1
    """Legacy (migration v1): return the window's dirty bitmap before unmapping."""
    UNMAP_ALL = 0x2


class DeviceFlag(IntFlag):
    RESET = 0x1
    PCI = 0x2


class RegionFlag(IntFlag):
    READ = 0x1
    WRITE = 0x2
    MMAP = 0x4
    CAPS = 0x8


class RegionCapId(IntEnum):
    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3


class RegionType(IntEnum):
    """The `type` of a TYPE region capability."""

    PCI_VENDOR = 0x80000000
    GFX = 1
    CCW = 2
    MIGRATION_DEPRECATED = 3


class PciRegion(IntEnum):
    """Fixed region indexes of a PCI device."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


PCI_NUM_REGIONS = 9
NUM_BARS = 6
"""BAR0 to BAR5: the regions a PCI BAR can be."""
PAGE_SIZE = 4096
"""The page size of DMA windows, mmap areas and `pgsizes`."""


class IrqIndex(IntEnum):
    """IRQ indexes of a PCI device, as DEVICE_GET_IRQ_INFO and SET_IRQS number them."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS = 5


class IrqInfoFlag(IntFlag):
    EVENTFD = 0x1
    MASKABLE = 0x2
    AUTOMASKED = 0x4
    NORESIZE = 0x8


class IrqSetFlag(IntFlag):
    """DEVICE_SET_IRQS: one DATA_* kind and one ACTION_* per request."""

    DATA_NONE = 0x01
    DATA_BOOL = 0x02
    DATA_EVENTFD = 0x04
    ACTION_MASK = 0x08
    ACTION_UNMASK = 0x10
    ACTION_TRIGGER = 0x20


IRQ_SET_DATA_MASK = IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.DATA_EVENTFD
IRQ_SET_ACTION_MASK = IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER


class IoFdType(IntEnum):
    """The `type` of a DEVICE_GET_REGION_IO_FDS entry."""

    IOEVENTFD = 0
    IOREGIONFD = 1
    IOEVENTFD_SHADOW = 2


class IoEventFdFlag(IntFlag):
    """KVM ioeventfd flags, as carried by DEVICE_GET_REGION_IO_FDS entries."""

    DATAMATCH = 0x1
    PIO = 0x2
    DEASSIGN = 0x4
    VIRTIO_CCW_NOTIFY = 0x8


class FeatureFlag(IntFlag):
    """DEVICE_FEATURE `flags`: a feature index in the low 16 bits plus operation bits."""

    INDEX_MASK = 0xFFFF
    GET = 0x10000
    SET = 0x20000
    PROBE = 0x40000


class Feature(IntEnum):
    """DEVICE_FEATURE indexes that vfio-user uses."""

    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


class MigrationFlag(IntFlag):
    """What DEVICE_FEATURE MIGRATION reports a device supports."""

    STOP_COPY = 0x1
    P2P = 0x2
    PRE_COPY = 0x4


class MigrationState(IntEnum):
    """Device states of vfio migration v2 (Linux's `enum vfio_device_mig_state`)."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


def command_name(command: int) -> str:
    """A command's name for logs and traces; its number if it has none."""
    try:
        return Command(command).name
    except ValueError:
        return str(command)
