"""NVM Express 1.4 facts the controller is built from: register offsets and fields,
opcodes, status codes, and the layouts of a submission and a completion entry.

Numbers are the specification's (NVM Express Base Specification 1.4c; the NVM
command set as it stood then); names follow it, shortened where it is plain."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

PAGE_SIZE = 4096
"""The memory page size (CC.MPS 0): the only one this controller supports."""
LBA_SIZE = 512
LBA_SHIFT = 9
SQE_SIZE, CQE_SIZE = 64, 16
SQES, CQES = 6, 4
"""log2 of the entry sizes, as CC.IOSQES/IOCQES and Identify's SQES/CQES say them."""
MAX_QUEUE_ENTRIES = 1024
MAX_IO_QUEUES = 64
MDTS = 5
"""Largest transfer: 2^MDTS pages (128 KiB)."""
MAX_TRANSFER = PAGE_SIZE << MDTS
MSIX_VECTORS = MAX_IO_QUEUES + 1
AERL = 3
"""Outstanding Asynchronous Event Requests allowed, less one."""
VERSION = 0x00010400


class Reg(IntEnum):
    """Controller registers: offsets in BAR0."""

    CAP = 0x00
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28
    ACQ = 0x30


DOORBELLS = 0x1000
DOORBELL_STRIDE = 4
"""CAP.DSTRD 0: doorbells 4 bytes apart, SQ y tail at 0x1000 + 8y, CQ y head 4 after."""
REGISTERS_SIZE = 0x1000
MSIX_TABLE, MSIX_PBA = 0x2000, 0x3000
BAR0_SIZE = 0x4000

CAP = (
    (MAX_QUEUE_ENTRIES - 1)  # MQES
    | 1 << 16  # CQR: queues must be physically contiguous
    | 20 << 24  # TO: 10 s to become ready, in 500 ms units
    | 1 << 37  # CSS: the NVM command set
)

CC_EN = 0x1
CC_SHN_SHIFT, CC_SHN_MASK = 14, 0x3
CSTS_RDY, CSTS_CFS = 0x1, 0x2
CSTS_SHST_SHIFT = 2
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2


def cc_field(cc: int, shift: int, width: int) -> int:
    return cc >> shift & ((1 << width) - 1)


class AdminOpcode(IntEnum):
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    DOORBELL_BUFFER_CONFIG = 0x7C


class IoOpcode(IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09


class Cns(IntEnum):
    """Identify's Controller or Namespace Structure."""

    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACES = 0x02
    NAMESPACE_DESCRIPTORS = 0x03
    CS_NAMESPACE = 0x05
    CS_CONTROLLER = 0x06
    CS_INDEPENDENT_NAMESPACE = 0x08
    COMMAND_SET_COMBINATIONS = 0x1C


class Feature(IntEnum):
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIGURATION = 0x09
    WRITE_ATOMICITY = 0x0A
    ASYNC_EVENT_CONFIGURATION = 0x0B
    TIMESTAMP = 0x0E


class LogPage(IntEnum):
    ERROR_INFORMATION = 0x01
    SMART_HEALTH = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NAMESPACES = 0x04


class Status(IntEnum):
    """Status Code Type << 8 | Status Code."""

    SUCCESS = 0x000
    INVALID_OPCODE = 0x001
    INVALID_FIELD = 0x002
    DATA_TRANSFER_ERROR = 0x004
    INTERNAL_ERROR = 0x006
    ABORTED_BY_REQUEST = 0x007
    ABORTED_SQ_DELETION = 0x008
    INVALID_NAMESPACE = 0x00B
    COMMAND_SEQUENCE_ERROR = 0x00C
    INVALID_PRP_OFFSET = 0x013
    LBA_OUT_OF_RANGE = 0x080
    CAPACITY_EXCEEDED = 0x081
    INVALID_COMPLETION_QUEUE = 0x100
    INVALID_QUEUE_ID = 0x101
    INVALID_QUEUE_SIZE = 0x102
    AER_LIMIT_EXCEEDED = 0x105
    INVALID_INTERRUPT_VECTOR = 0x108
    INVALID_LOG_PAGE = 0x109
    INVALID_QUEUE_DELETION = 0x10C
    FEATURE_NOT_SAVEABLE = 0x10D


DO_NOT_RETRY = 0x4000
"""DNR in a completion's 15-bit status field (SC 7:0, SCT 10:8, CRD, M, DNR 14)."""
NSID_ALL = 0xFFFFFFFF


class NvmeError(Exception):
    """A command fails with `status` (and Do Not Retry unless `retry`)."""

    def __init__(self, status: Status, reason: str, *, retry: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.retry = retry


_SQE = struct.Struct("<BBHI8xQQQIIIIII")
_CQE = struct.Struct("<IIHHHH")


@dataclass(frozen=True, slots=True)
class Command:
    """A submission queue entry, as the controller reads it."""

    opcode: int
    flags: int
    """CDW0 bits 15:8: fused operation (1:0) and PSDT (7:6: 0 is PRPs)."""
    cid: int
    nsid: int
    mptr: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @classmethod
    def unpack_from(cls, data: bytes | memoryview, offset: int = 0) -> Command:
        return cls(*_SQE.unpack_from(data, offset))

    def pack(self) -> bytes:
        return _SQE.pack(
            self.opcode, self.flags, self.cid, self.nsid, self.mptr, self.prp1, self.prp2,
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        )  # fmt: skip


def completion(
    result: int, sq_head: int, sq_id: int, cid: int, *, status: int, phase: int
) -> bytes:
    """A completion queue entry; `status` is the 15-bit field above the phase tag."""
    return _CQE.pack(result, 0, sq_head, sq_id, cid, status << 1 | phase)


def unpack_completion(data: bytes) -> tuple[int, int, int, int, int, int]:
    """(result, sq_head, sq_id, cid, status, phase) of a completion entry."""
    result, _reserved, sq_head, sq_id, cid, word = _CQE.unpack(data)
    return result, sq_head, sq_id, cid, word >> 1, word & 1
