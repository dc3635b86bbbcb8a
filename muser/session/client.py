"""The client's side of a session, without any I/O: the commands its driver sends
(`send_request`), matched with their replies, and the server's DMA_READ and
DMA_WRITE, served from the guest memory the driver gave for windows it mapped."""

from __future__ import annotations

import errno
from collections.abc import Callable

from muser.device.dma import DmaLayout
from muser.errors import VfioUserError
from muser.session.base import Payload, Session
from muser.session.outcome import Observer, SessionEvents, Sink
from muser.wire import Frame
from muser.wire.constants import (
    FLAGS_ERROR_REPLY,
    FLAGS_REPLY,
    MESSAGE_OVERHEAD,
    Command,
    command_name,
)
from muser.wire.messages import DmaAccess, DmaData, DmaDataQemu, dma_data_parts


class ClientSession(Session):
    """One client connection's session."""

    def __init__(
        self,
        sink: Sink,
        events: SessionEvents,
        *,
        max_data_xfer_size: int,
        dma_layout: DmaLayout,
        clock: Callable[[], float],
        observer: Observer | None = None,
    ) -> None:
        if dma_layout is DmaLayout.AUTO:
            raise ValueError("a client speaks one DMA layout: SPEC or QEMU")
        super().__init__(
            sink,
            events,
            max_message_size=max_data_xfer_size + MESSAGE_OVERHEAD,
            clock=clock,
            observer=observer,
        )
        self.max_data_xfer_size = max_data_xfer_size
        self.dma_layout = dma_layout
        self.guest: dict[int, memoryview] = {}
        """Windows mapped with backing memory, by address: what the server's DMA
        messages reach."""

    def _command_received(self, frame: Frame) -> None:
        """The server's DMA_READ/DMA_WRITE, served from the guest memory; anything else
        is refused with ENOSYS, as QEMU refuses it."""
        frame.close_fds()
        try:
            payload = self._serve(frame)
        except VfioUserError as exc:
            command = command_name(frame.command)
            self.events.log("warning", "refusing server command", command=command, reason=str(exc))
            if not frame.no_reply:
                self.send(frame.msg_id, frame.command, FLAGS_ERROR_REPLY, error=exc.errno)
            return
        if not frame.no_reply:
            self.send(frame.msg_id, frame.command, FLAGS_REPLY, payload)

    def _serve(self, frame: Frame) -> Payload:
        if frame.command == Command.DMA_READ:
            return self._serve_dma_read(frame.payload)
        if frame.command == Command.DMA_WRITE:
            return self._serve_dma_write(frame.payload)
        raise VfioUserError(errno.ENOSYS, f"unknown server command {frame.command}")

    def _guest_memory(self, address: int, count: int) -> memoryview:
        if count > self.max_data_xfer_size:
            raise VfioUserError(errno.E2BIG, f"DMA of {count} bytes exceeds max_data_xfer_size")
        for start, memory in self.guest.items():
            if start <= address and address + count <= start + len(memory):
                return memory[address - start : address - start + count]
        raise VfioUserError(errno.EFAULT, f"{address:#x}+{count:#x} is in no backed window")

    def _serve_dma_read(self, payload: bytes) -> Payload:
        request = DmaAccess.parse(payload)
        data = bytes(self._guest_memory(request.address, request.count))
        return dma_data_parts(request.address, data, qemu=self.dma_layout is DmaLayout.QEMU)

    def _serve_dma_write(self, payload: bytes) -> bytes:
        if self.dma_layout is DmaLayout.QEMU:
            qemu = DmaDataQemu.parse(payload)
            address, count, data = qemu.address, qemu.count, qemu.data[: qemu.count]
        else:
            spec = DmaData.parse(payload)
            address, count, data = spec.address, spec.count, spec.data
        if len(data) != count:
            raise VfioUserError(errno.EINVAL, f"DMA_WRITE count {count} with {len(data)} bytes")
        self._guest_memory(address, count)[:] = data
        if self.dma_layout is DmaLayout.QEMU:
            return b""
        return DmaAccess(address, count).build()
