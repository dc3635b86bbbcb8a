"""The data structures Identify and Get Log Page return: 4096-byte (or log-sized)
images with the fields this controller fills in, the rest zero as the specification
asks of fields a controller does not support."""

from __future__ import annotations

import struct
import time
import uuid
from dataclasses import dataclass, field

from .spec import (
    AERL,
    CQES,
    LBA_SHIFT,
    MDTS,
    SQES,
    VERSION,
)

IDENTIFY_SIZE = 4096
PCI_VENDOR_ID = 0x1234
"""The placeholder vendor QEMU's own samples use (Linux binds NVMe by class, and has
quirks for real vendors' IDs, QEMU's NVMe among them)."""
PCI_DEVICE_ID = 0x11F0
ONCS = 0x4 | 0x8 | 0x40
"""Optional NVM commands: Dataset Management, Write Zeroes, Timestamp."""
OACS_DOORBELL_BUFFER = 0x100
TEMPERATURE = 273 + 35
"""Kelvin, steady: there is no sensor to report."""
WARNING_TEMPERATURE, CRITICAL_TEMPERATURE = 273 + 70, 273 + 85


def _text(value: str, size: int) -> bytes:
    """An ASCII field, space padded, as Identify's strings are."""
    return value.encode("ascii")[:size].ljust(size, b" ")


@dataclass
class Counters:
    """What the SMART / Health log reports."""

    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0
    writes: int = 0
    power_cycles: int = 1
    started: float = field(default_factory=time.monotonic)


def controller(serial: str, namespaces: int) -> bytes:
    data = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH", data, 0, PCI_VENDOR_ID, PCI_VENDOR_ID)
    data[4:24] = _text(serial, 20)
    data[24:64] = _text("muser NVMe controller", 40)
    data[64:72] = _text("1.0", 8)
    data[72] = 6  # RAB: 64 commands per arbitration burst
    data[77] = MDTS
    struct.pack_into("<HI", data, 78, 1, VERSION)  # CNTLID, VER
    struct.pack_into("<H", data, 256, OACS_DOORBELL_BUFFER)
    data[258] = 3  # ACL: 4 Aborts at a time
    data[259] = AERL
    data[260] = 0x3  # FRMW: one slot, slot 1 read-only
    data[261] = 0x4  # LPA: extended data for Get Log Page
    struct.pack_into("<HH", data, 266, WARNING_TEMPERATURE, CRITICAL_TEMPERATURE)
    data[512] = SQES << 4 | SQES
    data[513] = CQES << 4 | CQES
    struct.pack_into("<I", data, 516, namespaces)  # NN
    struct.pack_into("<H", data, 520, ONCS)
    data[525] = 0x1  # VWC: a volatile write cache, flushed by Flush
    struct.pack_into("<I", data, 540, namespaces)  # MNAN
    nqn = f"nqn.2026-12.dev.muser:nvme:{serial}".encode()
    data[768 : 768 + len(nqn)] = nqn
    struct.pack_into("<H", data, 2048, 2500)  # power state 0: 25 W, in centiwatts
    return bytes(data)


def namespace(blocks: int) -> bytes:
    """Identify Namespace of an active namespace: one LBA format, 512-byte blocks;
    deallocated blocks read as zeros and Write Zeroes may deallocate."""
    data = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<QQQ", data, 0, blocks, blocks, blocks)  # NSZE, NCAP, NUSE
    data[24] = 0x1  # NSFEAT: thin provisioning (deallocation)
    data[25] = 0  # NLBAF: one format
    data[33] = 0x9  # DLFEAT: deallocated blocks read zeros; Write Zeroes deallocates
    struct.pack_into("<HBB", data, 128, 0, LBA_SHIFT, 0)  # LBAF0: no metadata, 2^9 bytes
    return bytes(data)


def independent_namespace() -> bytes:
    """The I/O command set independent Identify Namespace (CNS 08h)."""
    data = bytearray(IDENTIFY_SIZE)
    data[0] = 0x0  # NSFEAT
    data[4] = 0x1  # NSTAT: ready
    return bytes(data)


def namespace_uuid(serial: str, nsid: int) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"muser-nvme:{serial}:{nsid}")


def namespace_descriptors(serial: str, nsid: int) -> bytes:
    """A UUID (NIDT 3) and the NVM command set (NIDT 4), so that the namespace has an
    identity Linux can tell apart from others."""
    data = bytearray(IDENTIFY_SIZE)
    data[0:4] = bytes([3, 16, 0, 0])
    data[4:20] = namespace_uuid(serial, nsid).bytes
    data[20:24] = bytes([4, 1, 0, 0])
    data[24] = 0  # CSI: NVM
    return bytes(data)


def active_namespaces(after: int, count: int) -> bytes:
    """Active NSIDs above `after`, ascending, at most 1024."""
    ids = [nsid for nsid in range(after + 1, count + 1)][:1024]
    return struct.pack(f"<{len(ids)}I", *ids).ljust(IDENTIFY_SIZE, b"\0")


def command_set_combinations() -> bytes:
    """CNS 1Ch: one combination, the NVM command set alone."""
    return struct.pack("<Q", 0x1).ljust(IDENTIFY_SIZE, b"\0")


def smart_log(counters: Counters) -> bytes:
    """SMART / Health Information (02h): counters of the host's I/O, no warnings."""
    data = bytearray(512)
    struct.pack_into("<BHBBB", data, 0, 0, TEMPERATURE, 100, 10, 0)
    units = 512_000  # data units: thousands of 512-byte units
    hours = int((time.monotonic() - counters.started) // 3600)
    for offset, value in (
        (32, -(-counters.bytes_read // units)),
        (48, -(-counters.bytes_written // units)),
        (64, counters.reads),
        (80, counters.writes),
        (112, counters.power_cycles),
        (128, hours),
    ):
        data[offset : offset + 16] = value.to_bytes(16, "little")
    return bytes(data)


def firmware_log() -> bytes:
    """Firmware Slot Information (03h): slot 1 active, holding revision 1.0."""
    data = bytearray(512)
    data[0] = 0x1
    data[8:16] = _text("1.0", 8)
    return bytes(data)
