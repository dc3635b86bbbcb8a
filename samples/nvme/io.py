"""The NVM command set: Read, Write, Flush, Write Zeroes and Dataset Management.
Each returns Dword 0 of its completion, or raises NvmeError with its status."""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .queues import SubmissionQueue
from .spec import (
    LBA_SHIFT,
    MAX_TRANSFER,
    NSID_ALL,
    Command,
    IoOpcode,
    NvmeError,
    Status,
)
from .transfer import from_guest, prp_segments, to_guest

if TYPE_CHECKING:
    from .controller import NvmeController

_RANGE = struct.Struct("<IIQ")
"""A Dataset Management range: context attributes, length in blocks, first block."""


class IoCommands:
    """The I/O commands of one controller."""

    def __init__(self, controller: NvmeController) -> None:
        self.controller = controller
        self._commands: dict[int, Callable[[Command], Awaitable[int]]] = {
            IoOpcode.READ: self._read,
            IoOpcode.WRITE: self._write,
            IoOpcode.FLUSH: self._flush,
            IoOpcode.WRITE_ZEROES: self._write_zeroes,
            IoOpcode.DATASET_MANAGEMENT: self._dataset_management,
        }

    async def run(self, queue: SubmissionQueue, command: Command) -> int:
        handler = self._commands.get(command.opcode)
        if handler is None:
            raise NvmeError(Status.INVALID_OPCODE, f"I/O opcode {command.opcode:#x}")
        if command.flags:
            raise NvmeError(Status.INVALID_FIELD, "no fused commands and no SGLs")
        flush_all = command.opcode == IoOpcode.FLUSH and command.nsid == NSID_ALL
        if not flush_all and not 1 <= command.nsid <= self.controller.storage.namespaces:
            raise NvmeError(Status.INVALID_NAMESPACE, f"namespace {command.nsid}")
        return await handler(command)

    def _blocks(self, command: Command) -> tuple[int, int]:
        """The first block and the count a command names, within its namespace."""
        first, count = command.cdw11 << 32 | command.cdw10, (command.cdw12 & 0xFFFF) + 1
        if first + count > self.controller.storage.blocks:
            raise NvmeError(Status.LBA_OUT_OF_RANGE, f"blocks {first}+{count}")
        return first, count

    async def _data(self, command: Command) -> tuple[int, list[tuple[int, int]]]:
        first, count = self._blocks(command)
        if count << LBA_SHIFT > MAX_TRANSFER:
            raise NvmeError(Status.INVALID_FIELD, f"{count} blocks exceed MDTS")
        segments = await prp_segments(
            self.controller, command.prp1, command.prp2, count << LBA_SHIFT
        )
        return first, segments

    async def _read(self, command: Command) -> int:
        first, segments = await self._data(command)
        storage = self.controller.storage

        async def fill(buffers: list[memoryview]) -> None:
            await storage.read(command.nsid, first, buffers)

        await to_guest(self.controller, segments, fill)
        counters = self.controller.counters
        counters.reads += 1
        counters.bytes_read += sum(length for _address, length in segments)
        return 0

    async def _write(self, command: Command) -> int:
        first, segments = await self._data(command)
        storage = self.controller.storage

        async def drain(buffers: list[memoryview]) -> None:
            await storage.write(command.nsid, first, buffers)

        await from_guest(self.controller, segments, drain)
        counters = self.controller.counters
        counters.writes += 1
        counters.bytes_written += sum(length for _address, length in segments)
        return 0

    async def _flush(self, command: Command) -> int:
        await self.controller.storage.flush()
        return 0

    async def _write_zeroes(self, command: Command) -> int:
        """Zeroed blocks are deallocated (a hole), whether or not DEAC asks: they read
        as zeros either way (Identify Namespace's DLFEAT)."""
        first, count = self._blocks(command)
        await self.controller.storage.deallocate(command.nsid, first, count)
        return 0

    async def _dataset_management(self, command: Command) -> int:
        ranges = (command.cdw10 & 0xFF) + 1
        segments = await prp_segments(
            self.controller, command.prp1, command.prp2, ranges * _RANGE.size
        )
        raw = bytearray()

        async def drain(buffers: list[memoryview]) -> None:
            for buffer in buffers:
                raw.extend(buffer)

        await from_guest(self.controller, segments, drain)
        blocks = self.controller.storage.blocks
        extents = [_RANGE.unpack_from(raw, index * _RANGE.size)[1:] for index in range(ranges)]
        for count, first in extents:
            if first + count > blocks:
                raise NvmeError(Status.LBA_OUT_OF_RANGE, f"range {first}+{count}")
        if command.cdw11 >> 2 & 1:  # AD: deallocate
            for count, first in extents:
                if count:
                    await self.controller.storage.deallocate(command.nsid, first, count)
        return 0
