"""One client's session with one device: negotiation, in-order dispatch, errno replies.

Commands run strictly in arrival order (posted writes rely on it). A handler that
finishes without awaiting is answered at once, inside the socket callback; one
that awaits holds the queue until it is done, while replies to our own requests
are still matched as they arrive.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from muser.device import PciDevice, ResetReason
from muser.endpoint import Endpoint, command_name
from muser.errors import ConnectionClosedError, ProtocolError, VfioUserError
from muser.transport import WRITE_HIGH_WATER
from muser.wire import (
    Capabilities,
    Frame,
    Layout,
    build_capabilities,
    close_fds,
    parse_capabilities,
)
from muser.wire.constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_PGSIZES,
    FLAGS_ERROR_REPLY,
    FLAGS_REPLY,
    HEADER_SIZE,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    Command,
    DeviceFlag,
)
from muser.wire.messages import (
    DeviceInfo,
    Empty,
    IrqInfo,
    IrqSet,
    RegionAccess,
    RegionData,
    RegionInfo,
    Version,
)

MAX_MSG_FDS = 16
"""How many fds we accept per message; QEMU accepts at most 16 in our reply."""
MESSAGE_OVERHEAD = 32
"""Room for header and fixed fields around `max_data_xfer_size` bytes of data."""
MAX_QUEUED_BYTES = 8 * 1024 * 1024
"""Above this much queued payload we stop reading from the client until it drains."""
MAX_QUEUED_FRAMES = 1024

_SPEC_DEFAULTS = {"max_data_xfer_size": DEFAULT_MAX_DATA_XFER_SIZE, "pgsizes": DEFAULT_PGSIZES}

NOT_YET_SUPPORTED = (
    Command.DMA_MAP,
    Command.DMA_UNMAP,
    Command.DEVICE_GET_REGION_IO_FDS,
    Command.REGION_WRITE_MULTI,
    Command.DEVICE_FEATURE,
    Command.MIG_DATA_READ,
    Command.MIG_DATA_WRITE,
)
"""Commands muser knows but does not serve yet: answered ENOTSUP, fds closed."""


Outcome = Layout | None
"""What a handler answers: a reply payload, or None for a header-only reply."""
Handler = Callable[[Frame], Outcome | Awaitable[Outcome]]


class ServerConnection(Endpoint):
    """The server's side of one client connection to one device."""

    def __init__(
        self, sock: socket.socket, device: PciDevice, *, max_data_xfer_size: int, logger: Any
    ) -> None:
        super().__init__(
            sock,
            max_message_size=max_data_xfer_size + MESSAGE_OVERHEAD,
            max_receive_fds=MAX_MSG_FDS,
            logger=logger,
        )
        self.device = device
        self.max_data_xfer_size = max_data_xfer_size
        self.peer: Capabilities | None = None
        """The client's capabilities, once VERSION is negotiated."""
        self._queue: deque[Frame] = deque()
        self._queued_bytes = 0
        self._busy = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done once the client is gone and the device has been told."""
        self._handlers: dict[int, Handler] = {
            Command.VERSION: self._version,
            Command.DEVICE_GET_INFO: self._device_info,
            Command.DEVICE_GET_REGION_INFO: self._region_info,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.DEVICE_RESET: self._device_reset,
            Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
        }
        for command in NOT_YET_SUPPORTED:
            self._handlers[command] = self._not_supported

    @property
    def negotiated(self) -> bool:
        return self.peer is not None

    # Queueing, in arrival order

    def _command_received(self, frame: Frame) -> None:
        self._queue.append(frame)
        self._queued_bytes += len(frame.payload)
        if self._queued_bytes > MAX_QUEUED_BYTES or len(self._queue) > MAX_QUEUED_FRAMES:
            self.transport.pause_reading()
        if not self._busy:
            self._run_queue()

    def _unexpected_reply(self, frame: Frame) -> None:
        """A reply to nothing we asked: its bytes are already skipped; say EINVAL, as
        libvfio-user does, and keep serving."""
        super()._unexpected_reply(frame)
        self._send_reply(frame, FLAGS_ERROR_REPLY, error=errno.EINVAL)

    def _stream_broken(self) -> None:
        """Answer what came before the bad bytes, then close."""
        self._closing = True
        self.transport.pause_reading()
        if not self._busy:
            self._run_queue()

    def _run_queue(self) -> None:
        self._busy = True
        while self._queue and not self.transport.closed:
            if self.transport.write_buffer_size > WRITE_HIGH_WATER:
                self._continue_after(self.transport.drain())
                return
            frame = self._queue.popleft()
            self._queued_bytes -= len(frame.payload)
            pending = self._dispatch(frame)
            if pending is not None:
                self._continue_after(self._finish(frame, pending))
                return
            if self._closing and not self.negotiated:
                # A failed negotiation ends the session at once; a stream broken after
                # negotiation first answers the commands that came before the damage.
                break
        self._busy = False
        self._drop_queue()
        if self._closing:
            self.transport.close_when_sent()
        else:
            self.transport.resume_reading()

    def _continue_after(self, awaitable: Awaitable[None]) -> None:
        async def run() -> None:
            await awaitable
            self._run_queue()

        self._task = asyncio.get_running_loop().create_task(run())

    def _drop_queue(self) -> None:
        """Forget commands that will never run (their client is gone or broke the stream)."""
        while self._queue:
            self._queue.popleft().close_fds()
        self._queued_bytes = 0

    # Dispatch

    def _dispatch(self, frame: Frame) -> Awaitable[Outcome] | None:
        """Run the frame's handler; answer it now if it finished, else return what to await."""
        try:
            result = self._handle(frame)
            if inspect.isawaitable(result):
                return result
            self._reply(frame, result)
        except Exception as exc:
            self._reply_error(frame, exc)
        frame.close_fds()
        return None

    async def _finish(self, frame: Frame, pending: Awaitable[Outcome]) -> None:
        try:
            self._reply(frame, await pending)
        except Exception as exc:
            self._reply_error(frame, exc)
        finally:
            frame.close_fds()

    def _handle(self, frame: Frame) -> Outcome | Awaitable[Outcome]:
        if not self.negotiated and frame.command != Command.VERSION:
            self._closing = True
            raise ProtocolError("the first message must be VERSION")
        handler = self._handlers.get(frame.command)
        if handler is None:
            raise ProtocolError(f"unknown command {frame.command}")
        return handler(frame)

    def _reply(self, frame: Frame, outcome: Outcome) -> None:
        if frame.no_reply:
            return
        payload = b"" if outcome is None else outcome.build()
        self._send_reply(frame, FLAGS_REPLY, payload)

    def _reply_error(self, frame: Frame, exc: Exception) -> None:
        if isinstance(exc, VfioUserError):
            code = exc.errno
            self.log.debug(
                "command refused",
                msg_id=frame.msg_id,
                command=command_name(frame.command),
                errno=errno.errorcode.get(code),
                reason=str(exc),
            )
        else:
            code = errno.EIO
            self.log.error(
                "handler failed",
                msg_id=frame.msg_id,
                command=command_name(frame.command),
                exc_info=exc,
            )
        if not frame.no_reply:
            self._send_reply(frame, FLAGS_ERROR_REPLY, error=code)

    def _send_reply(self, frame: Frame, flags: int, payload: bytes = b"", error: int = 0) -> None:
        try:
            self.send(frame.msg_id, frame.command, flags, payload, error=error)
        except ConnectionClosedError:
            return

    # Teardown

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._drop_queue()
        asyncio.get_running_loop().create_task(self._tell_device())

    async def _tell_device(self) -> None:
        """Let in-flight work finish, then tell the device its client is gone."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            result = self.device.handle_reset(ResetReason.LOST_CONNECTION)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            self.log.exception("device reset after lost connection failed", exc_info=exc)
        finally:
            self.finished.set_result(None)

    # Command handlers

    def _version(self, frame: Frame) -> Version:
        if self.negotiated:
            raise ProtocolError("VERSION was already negotiated")
        self._closing = True
        if frame.fds:
            raise ProtocolError("VERSION carries no file descriptors")
        request = Version.parse(frame.payload)
        if request.major != PROTOCOL_MAJOR:
            raise ProtocolError(f"protocol major version {request.major} is not supported")
        self.peer = parse_capabilities(request.capabilities)
        self._closing = False
        self.log.info(
            "negotiated",
            client_version=f"{request.major}.{request.minor}",
            client_max_msg_fds=self.peer.max_msg_fds,
            client_max_data_xfer_size=self.peer.max_data_xfer_size,
        )
        capabilities = self._reply_capabilities(request, HEADER_SIZE + len(frame.payload))
        return Version(PROTOCOL_MAJOR, min(request.minor, PROTOCOL_MINOR), capabilities)

    def _reply_capabilities(self, request: Version, request_size: int) -> bytes:
        """Our limits, for the capabilities the client named, in a reply no larger than
        its request (QEMU sizes its receive buffer by its request)."""
        if not request.capabilities:
            return b""
        assert self.peer is not None
        ours = {
            "max_msg_fds": MAX_MSG_FDS,
            "max_data_xfer_size": self.max_data_xfer_size,
            "pgsizes": DEFAULT_PGSIZES,
        }
        chosen = {name: value for name, value in ours.items() if name in self.peer.offered}
        encoded = build_capabilities(chosen)
        for name, default in _SPEC_DEFAULTS.items():
            if HEADER_SIZE + 4 + len(encoded) <= request_size:
                break
            if chosen.get(name) == default:
                del chosen[name]
                encoded = build_capabilities(chosen)
        return encoded

    def _device_info(self, frame: Frame) -> DeviceInfo:
        request = DeviceInfo.parse(frame.payload)
        if request.argsz < DeviceInfo.SIZE:
            raise ProtocolError(f"DEVICE_GET_INFO argsz {request.argsz} < {DeviceInfo.SIZE}")
        return DeviceInfo(
            DeviceInfo.SIZE,
            DeviceFlag.PCI | DeviceFlag.RESET,
            self.device.num_regions,
            self.device.num_irqs,
        )

    def _region_info(self, frame: Frame) -> RegionInfo:
        request = RegionInfo.parse(frame.payload)
        if request.argsz < RegionInfo.SIZE:
            raise ProtocolError(f"GET_REGION_INFO argsz {request.argsz} is too small")
        if request.index >= self.device.num_regions:
            raise ProtocolError(f"region {request.index} does not exist")
        flags, size = self.device.region_flags_and_size(request.index)
        return RegionInfo(RegionInfo.SIZE, flags, request.index, 0, size, 0, b"")

    def _irq_info(self, frame: Frame) -> IrqInfo:
        request = IrqInfo.parse(frame.payload)
        if request.argsz < IrqInfo.SIZE:
            raise ProtocolError(f"GET_IRQ_INFO argsz {request.argsz} is too small")
        if request.index >= self.device.num_irqs:
            raise ProtocolError(f"IRQ index {request.index} does not exist")
        irq = self.device.irqs[request.index]
        return IrqInfo(IrqInfo.SIZE, irq.info_flags, request.index, irq.count)

    def _set_irqs(self, frame: Frame) -> None:
        fds = frame.take_fds()
        try:
            request = IrqSet.parse(frame.payload)
        except ProtocolError:
            close_fds(fds)
            raise
        self.device.irqs.set_irqs(request, fds)

    def _check_access(self, region: int, offset: int, count: int) -> None:
        if region >= self.device.num_regions:
            raise ProtocolError(f"region {region} does not exist")
        if count > self.max_data_xfer_size:
            raise ProtocolError(f"access of {count} bytes exceeds max_data_xfer_size")
        if offset + count > self.device.region_size(region):
            raise ProtocolError(f"access {offset:#x}+{count} is outside region {region}")

    def _region_read(self, frame: Frame) -> Outcome | Awaitable[Outcome]:
        request = RegionAccess.parse(frame.payload)
        self._check_access(request.region, request.offset, request.count)
        if request.count == 0:
            return RegionData(request.offset, request.region, 0, b"")
        data = self.device.read_region(request.region, request.offset, request.count)
        if inspect.isawaitable(data):
            return self._read_reply_later(request, data)
        return self._read_reply(request, data)

    async def _read_reply_later(self, request: RegionAccess, data: Awaitable[bytes]) -> RegionData:
        return self._read_reply(request, await data)

    def _read_reply(self, request: RegionAccess, data: bytes) -> RegionData:
        if len(data) != request.count:
            raise RuntimeError(
                f"region {request.region} read handler returned {len(data)} "
                f"bytes for a {request.count}-byte read"
            )
        return RegionData(request.offset, request.region, request.count, bytes(data))

    def _region_write(self, frame: Frame) -> Outcome | Awaitable[Outcome]:
        request = RegionData.parse(frame.payload)
        if len(request.data) != request.count:
            raise ProtocolError(
                f"REGION_WRITE count {request.count} but {len(request.data)} data bytes"
            )
        self._check_access(request.region, request.offset, request.count)
        reply = RegionAccess(request.offset, request.region, request.count)
        if request.count == 0:
            return reply
        done = self.device.write_region(request.region, request.offset, request.data)
        if done is not None:
            return self._after(done, reply)
        return reply

    def _device_reset(self, frame: Frame) -> Outcome | Awaitable[Outcome]:
        Empty.parse(frame.payload)
        self.log.info("device reset")
        done = self.device.handle_reset(ResetReason.DEVICE_RESET)
        if done is not None:
            return self._after(done, None)
        return None

    @staticmethod
    async def _after(done: Awaitable[None], outcome: Outcome) -> Outcome:
        await done
        return outcome

    def _not_supported(self, frame: Frame) -> Outcome:
        raise VfioUserError(
            errno.ENOTSUP, f"{command_name(frame.command)} is not supported by muser yet"
        )
