"""Admin commands: Identify, Get Log Page, Get and Set Features, creating and
deleting I/O queues, Abort, Asynchronous Event Request and Doorbell Buffer Config.
Each returns Dword 0 of its completion, or raises NvmeError with its status."""

from __future__ import annotations

import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from . import identify
from .queues import CompletionQueue, SubmissionQueue
from .spec import (
    AERL,
    CQES,
    MAX_IO_QUEUES,
    MAX_QUEUE_ENTRIES,
    MSIX_VECTORS,
    NSID_ALL,
    PAGE_SIZE,
    SQES,
    AdminOpcode,
    Cns,
    Command,
    Feature,
    LogPage,
    NvmeError,
    Status,
    cc_field,
)
from .transfer import prp_segments, to_guest

if TYPE_CHECKING:
    from .controller import NvmeController

NO_COMPLETION: Final = None
"""What a command returns that completes later (an Asynchronous Event Request)."""
_QUEUES_ALLOWED = (MAX_IO_QUEUES - 1) << 16 | (MAX_IO_QUEUES - 1)
_FEATURES = frozenset(Feature)
_OVER, _UNDER = 0, 1
_CHANGEABLE = 0x4
"""Get Features' supported capabilities (SEL 3): changeable, not saveable, not per
namespace."""


class Admin:
    """The admin command set of one controller, and the features it keeps."""

    def __init__(self, controller: NvmeController) -> None:
        self.controller = controller
        self._commands: dict[int, Callable[[SubmissionQueue, Command], Awaitable[int | None]]] = {
            AdminOpcode.IDENTIFY: self._identify,
            AdminOpcode.GET_LOG_PAGE: self._get_log_page,
            AdminOpcode.GET_FEATURES: self._get_features,
            AdminOpcode.SET_FEATURES: self._set_features,
            AdminOpcode.CREATE_IO_CQ: self._create_completion_queue,
            AdminOpcode.CREATE_IO_SQ: self._create_submission_queue,
            AdminOpcode.DELETE_IO_SQ: self._delete_submission_queue,
            AdminOpcode.DELETE_IO_CQ: self._delete_completion_queue,
            AdminOpcode.ABORT: self._abort,
            AdminOpcode.ASYNC_EVENT_REQUEST: self._async_event_request,
            AdminOpcode.DOORBELL_BUFFER_CONFIG: self._doorbell_buffer_config,
        }

    def power_on(self) -> None:
        self.features = {
            Feature.ARBITRATION: 0,
            Feature.POWER_MANAGEMENT: 0,
            Feature.ERROR_RECOVERY: 0,
            Feature.VOLATILE_WRITE_CACHE: 1,
            Feature.NUMBER_OF_QUEUES: _QUEUES_ALLOWED,
            Feature.INTERRUPT_COALESCING: 0,
            Feature.WRITE_ATOMICITY: 0,
            Feature.ASYNC_EVENT_CONFIGURATION: 0,
        }
        self.thresholds = {_OVER: identify.WARNING_TEMPERATURE, _UNDER: 0}
        self.vectors_coalescing_off: set[int] = set()
        self.timestamp_offset: int | None = None
        """Milliseconds the host's Set Features Timestamp put ahead of our clock."""
        self.event_requests: list[tuple[SubmissionQueue, int]] = []

    async def run(self, queue: SubmissionQueue, command: Command) -> int | None:
        handler = self._commands.get(command.opcode)
        if handler is None:
            raise NvmeError(Status.INVALID_OPCODE, f"admin opcode {command.opcode:#x}")
        return await handler(queue, command)

    async def _to_host(self, command: Command, data: bytes) -> None:
        device = self.controller
        segments = await prp_segments(device, command.prp1, command.prp2, len(data))

        async def fill(buffers: list[memoryview]) -> None:
            position = 0
            for buffer in buffers:
                buffer[:] = data[position : position + len(buffer)]
                position += len(buffer)

        await to_guest(device, segments, fill)

    def _namespace(self, nsid: int) -> None:
        if not 1 <= nsid <= self.controller.storage.namespaces:
            raise NvmeError(Status.INVALID_NAMESPACE, f"namespace {nsid} is not active")

    # Identify and logs

    async def _identify(self, queue: SubmissionQueue, command: Command) -> int:
        cns, csi = command.cdw10 & 0xFF, command.cdw11 >> 24
        nsid, storage, serial = command.nsid, self.controller.storage, self.controller.serial
        if cns == Cns.NAMESPACE:
            if nsid != NSID_ALL:
                self._namespace(nsid)
            data = identify.namespace(storage.blocks)
        elif cns == Cns.CONTROLLER:
            data = identify.controller(serial, storage.namespaces)
        elif cns == Cns.ACTIVE_NAMESPACES:
            if nsid >= NSID_ALL - 1:
                raise NvmeError(Status.INVALID_NAMESPACE, f"no namespaces follow {nsid:#x}")
            data = identify.active_namespaces(nsid, storage.namespaces)
        elif cns == Cns.NAMESPACE_DESCRIPTORS:
            self._namespace(nsid)
            data = identify.namespace_descriptors(serial, nsid)
        elif cns in (Cns.CS_NAMESPACE, Cns.CS_CONTROLLER) and csi == 0:
            if cns == Cns.CS_NAMESPACE:
                self._namespace(nsid)
            data = bytes(identify.IDENTIFY_SIZE)  # the NVM set's: no limits beyond MDTS
        elif cns == Cns.CS_INDEPENDENT_NAMESPACE:
            self._namespace(nsid)
            data = identify.independent_namespace()
        elif cns == Cns.COMMAND_SET_COMBINATIONS:
            data = identify.command_set_combinations()
        else:
            raise NvmeError(Status.INVALID_FIELD, f"Identify CNS {cns:#x}, CSI {csi}")
        await self._to_host(command, data)
        return 0

    async def _get_log_page(self, queue: SubmissionQueue, command: Command) -> int:
        page = command.cdw10 & 0xFF
        length = (((command.cdw11 & 0xFFFF) << 16 | command.cdw10 >> 16) + 1) * 4
        offset = command.cdw13 << 32 | command.cdw12
        if page == LogPage.ERROR_INFORMATION:
            log = bytes(64)
        elif page == LogPage.SMART_HEALTH:
            if command.nsid not in (0, NSID_ALL):
                raise NvmeError(Status.INVALID_FIELD, "no SMART log per namespace")
            log = identify.smart_log(self.controller.counters)
        elif page == LogPage.FIRMWARE_SLOT:
            log = identify.firmware_log()
        elif page == LogPage.CHANGED_NAMESPACES:
            log = bytes(4096)
        else:
            raise NvmeError(Status.INVALID_LOG_PAGE, f"log page {page:#x}")
        if offset % 4 or offset >= len(log):
            raise NvmeError(Status.INVALID_FIELD, f"log page offset {offset}")
        await self._to_host(command, log[offset : offset + length].ljust(length, b"\0"))
        return 0

    # Features

    async def _get_features(self, queue: SubmissionQueue, command: Command) -> int:
        feature, select = command.cdw10 & 0xFF, command.cdw10 >> 8 & 0x7
        if feature not in _FEATURES:
            raise NvmeError(Status.INVALID_FIELD, f"feature {feature:#x}")
        if select == 3:
            return _CHANGEABLE
        default = select == 1
        if feature == Feature.TEMPERATURE_THRESHOLD:
            kind = self._threshold_kind(command.cdw11)
            if default:
                return identify.WARNING_TEMPERATURE if kind == _OVER else 0
            return self.thresholds[kind]
        if feature == Feature.INTERRUPT_VECTOR_CONFIGURATION:
            vector = self._vector(command.cdw11)
            return vector | (1 << 16 if vector in self.vectors_coalescing_off else 0)
        if feature == Feature.TIMESTAMP:
            now = int(time.time() * 1000) + (self.timestamp_offset or 0)
            origin = 0 if self.timestamp_offset is None else 1 << 1  # set by the host
            await self._to_host(command, struct.pack("<Q", now & (1 << 48) - 1 | origin << 48))
            return 0
        if default:
            return (
                1
                if feature == Feature.VOLATILE_WRITE_CACHE
                else (_QUEUES_ALLOWED if feature == Feature.NUMBER_OF_QUEUES else 0)
            )
        return self.features[Feature(feature)]

    async def _set_features(self, queue: SubmissionQueue, command: Command) -> int:
        feature, value = command.cdw10 & 0xFF, command.cdw11
        if feature not in _FEATURES:
            raise NvmeError(Status.INVALID_FIELD, f"feature {feature:#x}")
        if command.cdw10 >> 31:
            raise NvmeError(Status.FEATURE_NOT_SAVEABLE, "no feature is saveable")
        if feature == Feature.NUMBER_OF_QUEUES:
            return self._set_number_of_queues(value)
        if feature == Feature.TEMPERATURE_THRESHOLD:
            self.thresholds[self._threshold_kind(value)] = value & 0xFFFF
        elif feature == Feature.INTERRUPT_VECTOR_CONFIGURATION:
            vector = self._vector(value)
            if value >> 16 & 1:
                self.vectors_coalescing_off.add(vector)
            else:
                self.vectors_coalescing_off.discard(vector)
        elif feature == Feature.TIMESTAMP:
            segments = await prp_segments(self.controller, command.prp1, command.prp2, 8)
            raw = b"".join([await self.controller.dma.read(a, n) for a, n in segments])
            host = int.from_bytes(raw[:6], "little")
            self.timestamp_offset = host - int(time.time() * 1000)
        elif feature == Feature.POWER_MANAGEMENT and value & 0x1F:
            raise NvmeError(Status.INVALID_FIELD, "only power state 0")
        elif feature == Feature.VOLATILE_WRITE_CACHE:
            self.features[Feature.VOLATILE_WRITE_CACHE] = value & 1
        else:
            self.features[Feature(feature)] = value
        return 0

    def _set_number_of_queues(self, value: int) -> int:
        submission, completion = value & 0xFFFF, value >> 16
        if 0xFFFF in (submission, completion):
            raise NvmeError(Status.INVALID_FIELD, "65536 queues")
        if len(self.controller.completion_queues) > 1:
            raise NvmeError(Status.COMMAND_SEQUENCE_ERROR, "I/O queues exist already")
        allowed = min(completion, MAX_IO_QUEUES - 1) << 16 | min(submission, MAX_IO_QUEUES - 1)
        self.features[Feature.NUMBER_OF_QUEUES] = allowed
        return allowed

    @staticmethod
    def _threshold_kind(value: int) -> int:
        sensor, kind = value >> 16 & 0xF, value >> 20 & 0x3
        if sensor or kind > _UNDER:
            raise NvmeError(Status.INVALID_FIELD, "only the composite temperature")
        return kind

    @staticmethod
    def _vector(value: int) -> int:
        vector = value & 0xFFFF
        if vector >= MSIX_VECTORS:
            raise NvmeError(Status.INVALID_FIELD, f"interrupt vector {vector}")
        return vector

    # Queues

    def _queue_geometry(self, command: Command, entry_size: int, cc_shift: int) -> tuple[int, int]:
        """The queue id and entry count a Create command asks for, checked."""
        qid, entries = command.cdw10 & 0xFFFF, (command.cdw10 >> 16) + 1
        allowed = self.features[Feature.NUMBER_OF_QUEUES]
        limit = (allowed >> 16 if cc_shift == 20 else allowed & 0xFFFF) + 1
        existing = (
            self.controller.completion_queues
            if cc_shift == 20
            else (self.controller.submission_queues)
        )
        if not 1 <= qid <= limit or qid in existing:
            raise NvmeError(Status.INVALID_QUEUE_ID, f"queue {qid}")
        if not 2 <= entries <= MAX_QUEUE_ENTRIES:
            raise NvmeError(Status.INVALID_QUEUE_SIZE, f"{entries} entries")
        if not command.cdw11 & 1:
            raise NvmeError(Status.INVALID_FIELD, "queues must be physically contiguous")
        if command.prp1 % PAGE_SIZE:
            raise NvmeError(Status.INVALID_PRP_OFFSET, "a queue starts on a page")
        if cc_field(self.controller.cc, cc_shift, 4) != entry_size:
            raise NvmeError(Status.INVALID_FIELD, "CC.IOSQES/IOCQES do not match")
        return qid, entries

    async def _create_completion_queue(self, queue: SubmissionQueue, command: Command) -> int:
        qid, entries = self._queue_geometry(command, CQES, 20)
        vector, interrupts = command.cdw11 >> 16, bool(command.cdw11 >> 1 & 1)
        if vector >= MSIX_VECTORS:
            raise NvmeError(Status.INVALID_INTERRUPT_VECTOR, f"vector {vector}")
        completions = CompletionQueue(qid, command.prp1, entries, vector, interrupts)
        self.controller.add_queues(completions, None)
        return 0

    async def _create_submission_queue(self, queue: SubmissionQueue, command: Command) -> int:
        completions = self.controller.completion_queues.get(command.cdw11 >> 16)
        if completions is None or not completions.qid:
            raise NvmeError(Status.INVALID_COMPLETION_QUEUE, f"queue {command.cdw11 >> 16}")
        qid, entries = self._queue_geometry(command, SQES, 16)
        self.controller.add_queues(
            completions, SubmissionQueue(qid, command.prp1, entries, completions)
        )
        return 0

    async def _delete_submission_queue(self, queue: SubmissionQueue, command: Command) -> int:
        qid = command.cdw10 & 0xFFFF
        target = self.controller.submission_queues.get(qid)
        if target is None or not qid:
            raise NvmeError(Status.INVALID_QUEUE_ID, f"queue {qid}")
        await self.controller.delete_submission_queue(target)
        return 0

    async def _delete_completion_queue(self, queue: SubmissionQueue, command: Command) -> int:
        qid = command.cdw10 & 0xFFFF
        target = self.controller.completion_queues.get(qid)
        if target is None or not qid:
            raise NvmeError(Status.INVALID_QUEUE_ID, f"queue {qid}")
        if target.submission_queues:
            raise NvmeError(Status.INVALID_QUEUE_DELETION, "submission queues still use it")
        del self.controller.completion_queues[qid]
        return 0

    # The rest

    async def _abort(self, queue: SubmissionQueue, command: Command) -> int:
        """Commands start as soon as they are fetched: there is never one to abort.
        Dword 0 bit 0 says so, and the command completes as it would have."""
        return 1

    async def _async_event_request(self, queue: SubmissionQueue, command: Command) -> None:
        """Held until an event: this controller raises none, so until reset."""
        if len(self.event_requests) > AERL:
            raise NvmeError(Status.AER_LIMIT_EXCEEDED, "too many event requests")
        self.event_requests.append((queue, command.cid))
        return NO_COMPLETION

    async def _doorbell_buffer_config(self, queue: SubmissionQueue, command: Command) -> int:
        shadow, events = command.prp1, command.prp2
        if not shadow or not events or shadow % PAGE_SIZE or events % PAGE_SIZE:
            raise NvmeError(Status.INVALID_FIELD, "doorbell buffers are whole pages")
        self.controller.shadow_doorbells = (shadow, events)
        return 0
