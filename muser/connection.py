"""One client's session with one device: negotiation, in-order dispatch, errno replies.

Commands run strictly in arrival order (posted writes rely on it). A handler that
finishes without awaiting is answered at once, inside the socket callback; one
that awaits holds the queue until it is done, while replies to our own requests
are still matched as they arrive.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from muser.device import PciDevice, ResetReason
from muser.device.dma import DmaLayout
from muser.device.migration import MigrationController
from muser.endpoint import Endpoint, Payload, WireRecorder
from muser.errors import ConnectionClosedError, ProtocolError, VfioUserError
from muser.log_limit import LogLimiter
from muser.transport import WRITE_HIGH_WATER
from muser.wire import (
    Capabilities,
    Frame,
    Layout,
    build_capabilities,
    parse_capabilities,
)
from muser.wire.constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_DMA_MAPS,
    DEFAULT_PGSIZES,
    FLAGS_COMMAND,
    FLAGS_ERROR_REPLY,
    FLAGS_POSTED_COMMAND,
    FLAGS_REPLY,
    HEADER_SIZE,
    NO_REPLY_BIT,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    Command,
    DeviceFlag,
    DmaUnmapFlag,
    Feature,
    FeatureFlag,
    IoEventFdFlag,
    IoFdType,
    MigrationState,
    RegionCapId,
    RegionFlag,
    command_name,
)
from muser.wire.messages import (
    ACCESS_MESSAGE,
    DMA_ACCESS_CODEC,
    DMA_DATA_QEMU_PREFIX,
    DMA_WRITE_REPLY_CODECS,
    HEADER_CODEC,
    MIG_DATA_PREFIX,
    DeviceFeature,
    DeviceInfo,
    DmaData,
    DmaLoggingReport,
    DmaLoggingStart,
    DmaMap,
    DmaUnmap,
    DmaUnmapReply,
    Empty,
    IoEventFdEntry,
    IoFdsReply,
    IoFdsRequest,
    IrqInfo,
    IrqSet,
    MigData,
    MigDataRead,
    MigDeviceState,
    MigrationFeature,
    RegionAccess,
    RegionData,
    RegionInfo,
    SparseMmapArea,
    SparseMmapCap,
    Version,
    WriteMultiReply,
    WriteOne,
    dma_data_parts,
    parse_write_multi,
    region_caps_bytes,
)

MAX_MSG_FDS = 8
"""How many fds we accept per message: libvfio-user's server takes as many, and QEMU
assumes as many of a server that names none. Clients size things by it (QEMU its
SET_IRQS batches, libvfio-user's sample client its DMA windows, which it expects a
migration destination to agree on), so a muser device and its libvfio-user twin
should say the same."""
MESSAGE_OVERHEAD = 32
"""Room for header and fixed fields around `max_data_xfer_size` bytes of data."""
MAX_QUEUED_BYTES = 8 * 1024 * 1024
"""Above this much queued payload we stop reading from the client until it drains."""
MAX_QUEUED_FRAMES = 1024
MAX_QUEUED_FDS = 4 * MAX_MSG_FDS
"""Nor while the commands waiting hold more fds than this: they count against the
process's limit."""
SHUTDOWN_GRACE = 5.0
"""Seconds a graceful close waits for the command in progress and its replies to
go out; then the connection is cut, so a stalled client cannot hold shutdown."""

_SPEC_DEFAULTS = {
    "max_data_xfer_size": DEFAULT_MAX_DATA_XFER_SIZE,
    "pgsizes": DEFAULT_PGSIZES,
    "max_dma_maps": DEFAULT_MAX_DMA_MAPS,
}
_GET, _SET, _PROBE = int(FeatureFlag.GET), int(FeatureFlag.SET), int(FeatureFlag.PROBE)
_UNMAP_ALL = int(DmaUnmapFlag.UNMAP_ALL)
_GET_DIRTY_BITMAP = int(DmaUnmapFlag.GET_DIRTY_BITMAP)
"""Plain ints: `flags & FeatureFlag.GET` goes through IntFlag's __rand__, a
microsecond or more each."""
_FEATURE_OPS: dict[int, int] = {
    Feature.DMA_LOGGING_START: _SET,
    Feature.DMA_LOGGING_STOP: _SET,
    Feature.DMA_LOGGING_REPORT: _GET,
}
"""The DEVICE_FEATURE operations muser serves for every device, by feature."""
_MIGRATION_FEATURE_OPS: dict[int, int] = {
    Feature.MIGRATION: _GET,
    Feature.MIG_DEVICE_STATE: _GET | _SET,
}
"""And for a device that declared migration."""
_FEATURE_DATA_SIZES: dict[int, int] = {
    Feature.MIGRATION: MigrationFeature.SIZE,
    Feature.MIG_DEVICE_STATE: MigDeviceState.SIZE,
    Feature.DMA_LOGGING_START: DmaLoggingStart.SIZE,
    Feature.DMA_LOGGING_STOP: 0,
    Feature.DMA_LOGGING_REPORT: DmaLoggingReport.SIZE,
}
"""The least data each feature's structure has: `argsz` must cover it for GET and
SET (Linux's vfio_check_feature `minsz`)."""
_KNOWN_FEATURE_BITS = int(FeatureFlag.INDEX_MASK) | _GET | _SET | _PROBE
_UNMAP_FLAGS = _GET_DIRTY_BITMAP | _UNMAP_ALL


_PLAIN_COMMAND_FLAGS = (FLAGS_COMMAND, FLAGS_POSTED_COMMAND)
_ACCESS_SIZE = ACCESS_MESSAGE.size
_pack_access = ACCESS_MESSAGE.pack
_unpack_access = ACCESS_MESSAGE.unpack_from
_REGION_READ = int(Command.REGION_READ)
_REGION_WRITE = int(Command.REGION_WRITE)
_LANE_COMMANDS = (_REGION_READ, _REGION_WRITE)


def _frame_at(data: bytes, position: int, size: int) -> Frame:
    """The frame of a fast-lane message, for the general path's replies."""
    msg_id, command, _size, flags, error = HEADER_CODEC.unpack_from(data, position)
    return Frame(msg_id, command, flags, error, data[position + HEADER_SIZE : position + size])


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply payload that carries file descriptors (still owned by the device)."""

    payload: Layout
    fds: Sequence[int]


Outcome = Layout | Reply | None
"""What a handler answers: a reply payload, one with fds, or None for header-only."""
Handler = Callable[[Frame], Outcome | Awaitable[Outcome]]


class ServerConnection(Endpoint):
    """The server's side of one client connection to one device."""

    def __init__(
        self,
        sock: socket.socket,
        device: PciDevice,
        *,
        max_data_xfer_size: int,
        dma_layout: DmaLayout,
        logger: Any,
        handler_timeout: float | None = None,
        negotiation_timeout: float | None = None,
        message_timeout: float | None = None,
        fd_budget: int | None = None,
        recorder: WireRecorder | None = None,
    ) -> None:
        super().__init__(
            sock,
            max_message_size=max_data_xfer_size + MESSAGE_OVERHEAD,
            max_receive_fds=MAX_MSG_FDS,
            logger=logger,
            recorder=recorder,
            read_while_backlogged=False,
        )
        self.device = device
        device.dma.fd_budget = fd_budget
        self.max_data_xfer_size = max_data_xfer_size
        self.dma_layout = dma_layout
        self.handler_timeout = handler_timeout
        """Seconds an awaiting handler may take before the client gets ETIMEDOUT."""
        self.message_timeout = message_timeout
        """Seconds a message may take to arrive whole once it has begun to."""
        self._limiter = LogLimiter()
        loop = asyncio.get_running_loop()
        self._negotiation_deadline = (
            None
            if negotiation_timeout is None
            else loop.call_later(negotiation_timeout, self._not_negotiated, negotiation_timeout)
        )
        self._message_deadline: asyncio.TimerHandle | None = None
        self._completed_at_deadline = 0
        """How many messages had arrived whole when the deadline was set."""
        self.peer: Capabilities | None = None
        """The client's capabilities, once VERSION is negotiated."""
        self._queue: deque[Frame] = deque()
        self._queued_bytes = 0
        self._queued_fds = 0
        self._busy = False
        self._closing = False
        self._shutting_down = False
        self._cut_off: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._messenger: DmaMessenger | None = None
        self._handler_task: asyncio.Task[None] | None = None
        """The task running a command handler that awaits, while it does."""
        self._fast_lane = False
        """Whether REGION_READ/REGION_WRITE may skip the framer and the queue: once
        negotiated, unless every message is being logged or traced, until closing."""
        self._lane: tuple[
            int,
            int,
            tuple[int, ...],
            tuple[Callable[[int, int], bytes | Awaitable[bytes]], ...],
            Callable[[int, int, bytes], Awaitable[None] | None],
        ] = (0, 0, (), (), device.write_region)
        """What the fast lane needs, fetched once: the transfer limit (which keeps a
        message within the framer's limit too), the number of regions, their sizes,
        their readers, the region writer."""
        self.finished = asyncio.Event()
        """Set once the client is gone and the device has been told. An event, not a
        future: a waiter that is cancelled must not cancel it for the others."""
        self._handlers: dict[int, Handler] = {
            Command.VERSION: self._version,
            Command.DEVICE_GET_INFO: self._device_info,
            Command.DEVICE_GET_REGION_INFO: self._region_info,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.DEVICE_RESET: self._device_reset,
            Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_FEATURE: self._device_feature,
            Command.DEVICE_GET_REGION_IO_FDS: self._region_io_fds,
            Command.REGION_WRITE_MULTI: self._region_write_multi,
            Command.MIG_DATA_READ: self._mig_data_read,
            Command.MIG_DATA_WRITE: self._mig_data_write,
        }

    @property
    def negotiated(self) -> bool:
        return self.peer is not None

    # The fast lane

    def data_received(  # noqa: PLR0915 - inlined on purpose: it is every MMIO access's path
        self, data: bytes, fds: list[int], fds_lost: bool = False
    ) -> bool:
        """REGION_READ and REGION_WRITE, what a guest's MMIO becomes, are served
        straight from the received bytes while nothing else is in flight: whole,
        valid messages without fds, one after another. The first message that needs
        more (fds, a partial message, another command, anything to refuse) goes with
        all after it the general way, in order. Whether the lane sent a reply."""
        if fds or fds_lost or not self._fast_lane or self._busy or self._framer.buffered:
            self._receive_in_general(data, fds, fds_lost)
            return False
        max_count, regions, region_sizes, readers, write = self._lane
        transport = self.transport
        position, end = 0, len(data)
        answered = False
        # shut_down (from a handler) clears _fast_lane; a failed send closes the transport
        while end - position >= _ACCESS_SIZE and self._fast_lane and not transport.closed:
            msg_id, command, size, flags, _error, offset, region, count = _unpack_access(
                data, position
            )
            if (
                command not in _LANE_COMMANDS  # replies to our DMA, SET_IRQS, ...
                or flags not in _PLAIN_COMMAND_FLAGS
                or size > end - position
                or region >= regions
                or not 0 < count <= max_count
                or offset + count > region_sizes[region]
                or transport.write_buffer_size > WRITE_HIGH_WATER
            ):
                break
            start, position = position, position + size
            self._busy = True  # as in _run_queue: a shutdown the handler asks for waits
            if command == _REGION_READ and size == _ACCESS_SIZE:
                try:
                    result = readers[region](offset, count)
                except Exception as exc:
                    self._reply_error(_frame_at(data, start, size), exc)
                else:
                    if type(result) is bytes and len(result) == count:
                        if not flags & NO_REPLY_BIT:
                            answered = True
                            transport.send_message(
                                _pack_access(
                                    msg_id,
                                    command,
                                    size + count,
                                    FLAGS_REPLY,
                                    0,
                                    offset,
                                    region,
                                    count,
                                )
                                + result
                            )
                        self._busy = False
                        continue
                    request = RegionAccess(offset, region, count)
                    self._read_result(_frame_at(data, start, size), request, result)
            elif command == _REGION_WRITE and size == _ACCESS_SIZE + count:
                try:
                    done = write(region, offset, data[start + _ACCESS_SIZE : position])
                except Exception as exc:
                    self._reply_error(_frame_at(data, start, size), exc)
                else:
                    if done is None:
                        if not flags & NO_REPLY_BIT:
                            answered = True
                            transport.send_message(
                                _pack_access(
                                    msg_id,
                                    command,
                                    _ACCESS_SIZE,
                                    FLAGS_REPLY,
                                    0,
                                    offset,
                                    region,
                                    count,
                                )
                            )
                        self._busy = False
                        continue
                    reply = RegionAccess(offset, region, count)
                    frame = _frame_at(data, start, size)
                    self._await_handler(frame, self._after(done, reply))
            else:
                self._busy = False
                position = start
                break
            # Answered the general way (a refusal, a result to convert or await): the
            # messages after it go the general way too.
            if self._handler_task is None:
                self._busy = False
            break
        if self._shutting_down and not self._busy:
            transport.close_when_sent()
        if position < end:
            self._receive_in_general(data[position:] if position else data, fds, False)
        return answered

    def _receive_in_general(self, data: bytes, fds: list[int], fds_lost: bool) -> None:
        """The framer and the queue; a message left partial starts its deadline."""
        super().data_received(data, fds, fds_lost)
        if self._framer.buffered and self._message_deadline is None:
            self._start_message_deadline()

    def _read_result(
        self, frame: Frame, request: RegionAccess, result: bytes | Awaitable[bytes]
    ) -> None:
        """A read handler's result that is not plain bytes of the right size: awaited,
        or checked and converted, as the general path does."""
        if inspect.isawaitable(result):
            self._await_handler(frame, self._read_reply_later(request, result))
            return
        try:
            self._reply(frame, self._read_reply(request, result))
        except Exception as exc:
            self._reply_error(frame, exc)

    # Deadlines: a client holds its device, so it may not hold it without talking

    def _not_negotiated(self, timeout: float) -> None:
        self._negotiation_deadline = None
        if not self.negotiated and not self.transport.closed:
            self.log.warning("client did not negotiate in time; closing", timeout=timeout)
            self.transport.close()

    def _start_message_deadline(self) -> None:
        """A message has begun to arrive: it has `message_timeout` seconds to finish."""
        if self.message_timeout is not None:
            self._completed_at_deadline = self._framer.completed
            self._message_deadline = asyncio.get_running_loop().call_later(
                self.message_timeout, self._message_overdue
            )

    def _message_overdue(self) -> None:
        """Cut a client whose message has not arrived whole in time. If messages
        completed meanwhile, the one now in progress began later and gets a period of
        its own (so a message has between one and two); so does one whose rest is
        unread because the server is not reading."""
        self._message_deadline = None
        framer = self._framer
        if not framer.buffered or self.transport.closed:
            return
        if framer.completed != self._completed_at_deadline or not self.transport.reading:
            self._start_message_deadline()
            return
        self.log.warning(
            "a message did not arrive whole in time; closing",
            timeout=self.message_timeout,
            bytes_held=framer.buffered,
        )
        self.transport.close()

    # Repeated log lines: one per kind per interval, with the count held back

    def log_limited(self, level: str, event: str, kind: Hashable, **fields: Any) -> None:
        """Log at `level`, unless this client repeats itself (see LogLimiter)."""
        held = self._limiter.allow(event, kind)
        if held is None:
            return
        if held:
            fields["repeats_held_back"] = held
        getattr(self.log, level)(event, **fields)

    # Queueing, in arrival order

    def _command_received(self, frame: Frame) -> None:
        if self._shutting_down:
            frame.close_fds()
            return
        self._queue.append(frame)
        self._queued_bytes += len(frame.payload)
        self._queued_fds += len(frame.fds)
        if (
            self._queued_bytes > MAX_QUEUED_BYTES
            or len(self._queue) > MAX_QUEUED_FRAMES
            or self._queued_fds > MAX_QUEUED_FDS
        ):
            self.transport.pause_reading()
        if not self._busy:
            self._run_queue()

    def _unexpected_reply(self, frame: Frame) -> None:
        """A reply to nothing we asked: its bytes are already skipped; say EINVAL, as
        libvfio-user does, and keep serving."""
        frame.close_fds()
        command = command_name(frame.command)
        self.log_limited("warning", "unexpected reply", command, command=command)
        self._send_reply(frame, FLAGS_ERROR_REPLY, error=errno.EINVAL)

    def _stream_broken(self) -> None:
        """Answer what came before the bad bytes, then close."""
        self._closing = True
        self._fast_lane = False
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
            self._queued_fds -= len(frame.fds)
            pending = self._dispatch(frame)
            if pending is not None:
                self._await_handler(frame, pending)
                return
            if self._closing and not self.negotiated:
                # A failed negotiation ends the session at once; a stream broken after
                # negotiation first answers the commands that came before the damage.
                break
        self._busy = False
        self._drop_queue()
        if self._closing or self._shutting_down:
            self.transport.close_when_sent()
        else:
            self.transport.resume_reading()

    def _await_handler(self, frame: Frame, pending: Awaitable[Outcome]) -> None:
        """Hold the queue while a handler awaits; answer it and go on when it is done."""
        self._busy = True
        self._handler_task = self._continue_after(self._finish(frame, pending))

    def _continue_after(self, awaitable: Awaitable[None]) -> asyncio.Task[None]:
        async def run() -> None:
            await awaitable
            self._handler_task = None
            self._run_queue()

        self._task = asyncio.get_running_loop().create_task(run())
        return self._task

    def in_handler(self) -> bool:
        """Whether the running code is a command handler the client waits on."""
        task = self._handler_task
        return task is not None and task is asyncio.current_task()

    def _drop_queue(self) -> None:
        """Forget commands that will never run (their client is gone or broke the stream)."""
        while self._queue:
            self._queue.popleft().close_fds()
        self._queued_bytes = self._queued_fds = 0

    # Dispatch

    def _dispatch(self, frame: Frame) -> Awaitable[Outcome] | None:
        """Run the frame's handler; answer it now if it finished, else return what to await."""
        try:
            result = self._handle(frame)
            # most handlers answer at once, and isawaitable's ABC check costs
            if (
                result is not None
                and not isinstance(result, Layout | Reply)
                and inspect.isawaitable(result)
            ):
                return result
            self._reply(frame, result)
        except Exception as exc:
            self._reply_error(frame, exc)
        frame.close_fds()
        return None

    async def _finish(self, frame: Frame, pending: Awaitable[Outcome]) -> None:
        """Await a handler, within the per-request timeout. A hang is answered
        ETIMEDOUT; device code cancelling what the handler awaits is EIO; only the
        connection's own cancellation stops it."""
        try:
            # asyncio.timeout, not wait_for: the handler must keep running in this
            # task, which is how message DMA recognises it is inside a handler.
            async with asyncio.timeout(self.handler_timeout):
                outcome = await pending
            self._reply(frame, outcome)
        except TimeoutError:
            self._log_timeout(frame)
            if not frame.no_reply:
                self._send_reply(frame, FLAGS_ERROR_REPLY, error=errno.ETIMEDOUT)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            self._reply_error(frame, RuntimeError("device code cancelled the handler"))
        except Exception as exc:
            self._reply_error(frame, exc)
        finally:
            frame.close_fds()

    def _log_timeout(self, frame: Frame) -> None:
        """A hung handler, logged without a traceback (it would only show the timeout)."""
        command = command_name(frame.command)
        self.log_limited(
            "error",
            "handler timed out",
            command,
            msg_id=frame.msg_id,
            command=command,
            timeout=self.handler_timeout,
        )

    def _handle(self, frame: Frame) -> Outcome | Awaitable[Outcome]:
        if not self.negotiated and frame.command != Command.VERSION:
            self._closing = True
            raise ProtocolError("the first message must be VERSION")
        if frame.fds_lost:
            command = command_name(frame.command)
            self.log_limited(
                "warning",
                "a message's file descriptors were lost: the process has none left",
                command,
                command=command,
            )
            raise VfioUserError(errno.EMFILE, "the server had no descriptors left for its fds")
        handler = self._handlers.get(frame.command)
        if handler is None:
            raise ProtocolError(f"unknown command {frame.command}")
        return handler(frame)

    def _reply(self, frame: Frame, outcome: Outcome) -> None:
        if frame.no_reply:
            return
        if isinstance(outcome, Reply):
            self._send_reply(frame, FLAGS_REPLY, outcome.payload.build_parts(), outcome.fds)
        else:
            self._send_reply(frame, FLAGS_REPLY, b"" if outcome is None else outcome.build_parts())

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
            command = command_name(frame.command)
            self.log_limited(
                "error",
                "handler failed",
                (command, type(exc)),
                msg_id=frame.msg_id,
                command=command,
                exc_info=exc,
            )
        if not frame.no_reply:
            self._send_reply(frame, FLAGS_ERROR_REPLY, error=code)

    def _send_reply(
        self,
        frame: Frame,
        flags: int,
        payload: Payload = b"",
        fds: Sequence[int] = (),
        error: int = 0,
    ) -> None:
        try:
            self.send(frame.msg_id, frame.command, flags, payload, fds, error=error)
        except ConnectionClosedError:
            return

    # Teardown

    def shut_down(self) -> None:
        """Close gracefully: the command in progress still gets its reply (and the
        replies to DMA it requests still arrive), commands not yet started are
        dropped, and the connection closes once its replies are sent."""
        self._shutting_down = True
        self._fast_lane = False
        self._drop_queue()
        if not self._busy:
            self.transport.close_when_sent()
        self._cut_off = asyncio.get_running_loop().call_later(SHUTDOWN_GRACE, self._cut)

    def _cut(self) -> None:
        """The grace period is over: stop whatever is still running and close."""
        if self._task is not None:
            self._task.cancel()
        self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        for deadline in (self._cut_off, self._negotiation_deadline, self._message_deadline):
            if deadline is not None:
                deadline.cancel()
        for event, held in self._limiter.held_back().items():
            self.log.warning("log lines held back", line=event, count=held)
        self._drop_queue()
        asyncio.get_running_loop().create_task(self._tell_device())

    async def _tell_device(self) -> None:
        """Let in-flight work finish, then tell the device its client is gone."""
        if self.device.dma.messenger is self._messenger:
            self.device.dma.messenger = None
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            result = self.device.handle_reset(ResetReason.LOST_CONNECTION)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            self.log.exception("device reset after lost connection failed", exc_info=exc)
        finally:
            self.finished.set()

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
        if self._negotiation_deadline is not None:
            self._negotiation_deadline.cancel()
            self._negotiation_deadline = None
        self._fast_lane = not self._debug and self._recorder is None
        device = self.device
        readers = device.region_readers
        if type(device).read_region is not PciDevice.read_region:
            # A subclass that overrides read_region is asked through it, as in general.
            readers = tuple(
                functools.partial(device.read_region, index) for index in range(len(readers))
            )
        self._lane = (
            self.max_data_xfer_size,
            len(device.region_sizes),
            device.region_sizes,
            readers,
            device.write_region,
        )
        self.log.info(
            "negotiated",
            client_version=f"{request.major}.{request.minor}",
            client_max_msg_fds=self.peer.max_msg_fds,
            client_max_data_xfer_size=self.peer.max_data_xfer_size,
        )
        self._messenger = DmaMessenger(self)
        self.device.dma.messenger = self._messenger
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
            "max_dma_maps": self.device.dma.max_windows,
        }
        chosen: dict[str, object] = {
            name: value for name, value in ours.items() if name in self.peer.offered
        }
        if self.peer.write_multiple:
            chosen["write_multiple"] = True
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

    def _region_info(self, frame: Frame) -> Outcome:
        request = RegionInfo.parse(frame.payload)
        if request.argsz < RegionInfo.SIZE:
            raise ProtocolError(f"GET_REGION_INFO argsz {request.argsz} is too small")
        if request.index >= self.device.num_regions:
            raise ProtocolError(f"region {request.index} does not exist")
        flags, size = self.device.region_flags_and_size(request.index)
        shared = self.device.shared.get(request.index)
        if shared is None:
            return RegionInfo(RegionInfo.SIZE, flags, request.index, 0, size, 0, b"")
        areas = tuple(SparseMmapArea(offset, length) for offset, length in shared.areas)
        sparse = SparseMmapCap(RegionCapId.SPARSE_MMAP, 1, 0, len(areas), 0, areas)
        caps = region_caps_bytes([sparse])
        needed = RegionInfo.SIZE + len(caps)
        flags |= RegionFlag.MMAP
        if request.argsz < needed:
            # Too small for the capability chain: say how much is needed, send no fd,
            # and the client asks again (protocol.md §3.5).
            return RegionInfo(needed, flags, request.index, 0, size, shared.offset, b"")
        info = RegionInfo(
            needed,
            flags | RegionFlag.CAPS,
            request.index,
            RegionInfo.SIZE,
            size,
            shared.offset,
            caps,
        )
        return Reply(info, (shared.fd,))

    def _region_io_fds(self, frame: Frame) -> Outcome:
        request = IoFdsRequest.parse(frame.payload)
        if request.flags or request.count:
            raise ProtocolError("GET_REGION_IO_FDS takes no flags and no count")
        if request.argsz < IoFdsRequest.SIZE:
            raise ProtocolError(f"GET_REGION_IO_FDS argsz {request.argsz} is too small")
        if request.index >= self.device.num_regions or not self.device.region_size(request.index):
            raise ProtocolError(f"region {request.index} does not exist")
        doorbells = self.device.doorbells.by_region.get(request.index, [])
        bar = self.device.bars[request.index] if doorbells else None
        pio = IoEventFdFlag.PIO if bar is not None and bar.kind.is_io else 0
        entries = b"".join(
            IoEventFdEntry(
                doorbell.offset,
                doorbell.size,
                fd_index,
                IoFdType.IOEVENTFD,
                pio | (IoEventFdFlag.DATAMATCH if doorbell.datamatch is not None else 0),
                0,
                0,
                doorbell.datamatch or 0,
            ).build()
            for fd_index, (doorbell, _fd) in enumerate(doorbells)
        )
        needed = IoFdsRequest.SIZE + len(entries)
        if request.argsz < needed:
            return IoFdsReply(needed, 0, request.index, len(doorbells), b"")
        reply = IoFdsReply(needed, 0, request.index, len(doorbells), entries)
        return Reply(reply, [fd for _doorbell, fd in doorbells])

    def _region_write_multi(self, frame: Frame) -> Outcome | Awaitable[Outcome]:
        """Each write in order, as if it were a REGION_WRITE; QEMU always posts these."""
        writes = parse_write_multi(frame.payload)
        for write in writes:
            if not 1 <= write.count <= len(write.data):
                raise ProtocolError(f"REGION_WRITE_MULTI entry of {write.count} bytes")
            self._check_access(write.region, write.offset, write.count)
        reply = WriteMultiReply(len(writes))
        for position, write in enumerate(writes):
            done = self.device.write_region(write.region, write.offset, write.data[: write.count])
            if done is not None:
                return self._finish_writes(done, writes[position + 1 :], reply)
        return reply

    async def _finish_writes(
        self, done: Awaitable[None], rest: Sequence[WriteOne], reply: WriteMultiReply
    ) -> WriteMultiReply:
        await done
        for write in rest:
            pending = self.device.write_region(
                write.region, write.offset, write.data[: write.count]
            )
            if pending is not None:
                await pending
        return reply

    def _irq_info(self, frame: Frame) -> IrqInfo:
        request = IrqInfo.parse(frame.payload)
        if request.argsz < IrqInfo.SIZE:
            raise ProtocolError(f"GET_IRQ_INFO argsz {request.argsz} is too small")
        if request.index >= self.device.num_irqs:
            raise ProtocolError(f"IRQ index {request.index} does not exist")
        irq = self.device.irqs[request.index]
        return IrqInfo(IrqInfo.SIZE, irq.info_flags, request.index, irq.count)

    def _set_irqs(self, frame: Frame) -> None:
        request = IrqSet.parse(frame.payload)
        self.device.irqs.set_irqs(request, frame.take_fds())

    def _dma_map(self, frame: Frame) -> None:
        request = DmaMap.parse(frame.payload)
        if request.argsz < DmaMap.SIZE:
            raise ProtocolError(f"DMA_MAP argsz {request.argsz} is too small")
        if len(frame.fds) > 1:
            raise ProtocolError("DMA_MAP carries at most one file descriptor")
        fds = frame.take_fds()
        self.device.dma.map(
            request.address, request.size, request.flags, request.offset, fds[0] if fds else None
        )

    def _dma_unmap(self, frame: Frame) -> Awaitable[Outcome]:
        request = DmaUnmap.parse(frame.payload)
        if request.argsz < DmaUnmap.SIZE:
            raise ProtocolError(f"DMA_UNMAP argsz {request.argsz} is too small")
        flags = request.flags
        if flags & ~_UNMAP_FLAGS:
            raise VfioUserError(errno.ENOTSUP, f"DMA_UNMAP flags {flags:#x} are not supported")
        if flags & _UNMAP_ALL:
            if flags & _GET_DIRTY_BITMAP or request.address or request.size:
                raise ProtocolError("UNMAP_ALL takes no range and no dirty bitmap")
            done = self.device.dma.unmap_all()
        elif flags & _GET_DIRTY_BITMAP:
            raise VfioUserError(
                errno.ENOTSUP,
                "DMA_UNMAP's legacy dirty bitmap is not supported; use DEVICE_FEATURE DMA logging",
            )
        else:
            done = self.device.dma.unmap(request.address, request.size)
        reply = DmaUnmapReply(request.argsz, flags, request.address, request.size, None, b"")
        return self._after(done, reply)

    def _device_feature(self, frame: Frame) -> Outcome | Awaitable[Outcome]:
        """DMA logging, and migration for a device that declared it (one without it
        refuses the migration features with EINVAL, as libvfio-user does)."""
        request = DeviceFeature.parse(frame.payload)
        flags, feature = request.flags, request.feature
        probe = bool(flags & _PROBE)
        operations = flags & (_GET | _SET)
        if flags & ~_KNOWN_FEATURE_BITS:
            raise ProtocolError(f"unknown DEVICE_FEATURE flag bits in {flags:#x}")
        if not operations and not probe:
            raise ProtocolError("DEVICE_FEATURE without GET, SET or PROBE")
        if operations == _GET | _SET and not probe:
            raise ProtocolError("DEVICE_FEATURE GET and SET together without PROBE")
        supported = _FEATURE_OPS.get(feature)
        if supported is None and self.device.migration is not None:
            supported = _MIGRATION_FEATURE_OPS.get(feature)
        if supported is None:
            raise ProtocolError(f"feature {feature} is not supported by this device")
        if operations & ~supported:
            raise ProtocolError(f"feature {feature} does not support operations {operations:#x}")
        if request.argsz < len(frame.payload) and not operations & _GET:
            raise ProtocolError("DEVICE_FEATURE argsz is smaller than the request")
        if probe:
            return request
        if request.argsz < DeviceFeature.SIZE + _FEATURE_DATA_SIZES[feature]:
            # Refused before anything is acted on, as Linux's vfio_check_feature does.
            raise ProtocolError(f"DEVICE_FEATURE argsz {request.argsz} is too small for it")
        if feature in _MIGRATION_FEATURE_OPS:
            return self._migration_feature(request)
        if feature == Feature.DMA_LOGGING_STOP:
            self.device.dma.logging_stop()
            return request
        if feature == Feature.DMA_LOGGING_START:
            start = DmaLoggingStart.parse(request.data)
            self.device.dma.logging_start(
                start.page_size, [(item.iova, item.length) for item in start.ranges]
            )
            return request
        return self._logging_report(request)

    def _migration_feature(self, request: DeviceFeature) -> Outcome | Awaitable[Outcome]:
        migration = self._migration()
        if request.flags & _GET:
            if request.feature == Feature.MIGRATION:
                data = MigrationFeature(migration.flags).build()
            else:
                data = MigDeviceState(migration.state, 0).build()
            if request.argsz < DeviceFeature.SIZE + len(data):
                raise ProtocolError("DEVICE_FEATURE GET needs room for the feature's data")
            return DeviceFeature(DeviceFeature.SIZE + len(data), request.flags, data)
        target = MigDeviceState.parse(request.data).device_state
        try:
            state = MigrationState(target)
        except ValueError:
            raise ProtocolError(f"migration state {target} does not exist") from None
        self.log.info("migration state", current=migration.state.name, target=state.name)
        return self._after(migration.set_state(state), request)

    async def _mig_data_read(self, frame: Frame) -> MigData:
        request = MigDataRead.parse(frame.payload)
        limit = self.peer.max_data_xfer_size if self.peer is not None else 0
        if request.size > min(limit, self.max_data_xfer_size):
            raise ProtocolError(f"MIG_DATA_READ of {request.size} bytes is over the limit")
        if request.argsz < MigData.SIZE + request.size:
            raise ProtocolError("MIG_DATA_READ argsz is too small for the data asked")
        data = await self._migration().read(request.size)
        # argsz and size say how much is data; the message is padded with zeros to the
        # size asked for, as libvfio-user sends it and its client reads it.
        padded = data if len(data) == request.size else data + bytes(request.size - len(data))
        return MigData(MigData.SIZE + len(data), len(data), padded)

    def _mig_data_write(self, frame: Frame) -> None:
        payload = frame.payload
        if len(payload) < MIG_DATA_PREFIX.size:
            raise ProtocolError(f"MIG_DATA_WRITE payload of {len(payload)} bytes")
        argsz, size = MIG_DATA_PREFIX.unpack_from(payload)
        data = memoryview(payload)[MIG_DATA_PREFIX.size :]  # a megabyte, passed on uncopied
        if size != len(data) or argsz < MIG_DATA_PREFIX.size + size:
            raise ProtocolError("MIG_DATA_WRITE size and data disagree")
        self._migration().write(data)

    def _migration(self) -> MigrationController:
        if self.device.migration is None:
            raise ProtocolError("the device does not support migration")
        return self.device.migration

    def _logging_report(self, request: DeviceFeature) -> DeviceFeature:
        report = DmaLoggingReport.parse(request.data)
        if report.bitmap:
            raise ProtocolError("a DMA_LOGGING_REPORT request carries no bitmap")
        dma = self.device.dma
        bitmap_size = dma.report_size(report.iova, report.length, report.page_size)
        needed = DeviceFeature.SIZE + DmaLoggingReport.SIZE + bitmap_size
        if bitmap_size > self.max_data_xfer_size:
            raise ProtocolError(
                "a DMA_LOGGING_REPORT bitmap must fit in one message; "
                "ask for a shorter range or larger pages"
            )
        if request.argsz < needed:
            raise ProtocolError(f"DMA_LOGGING_REPORT needs argsz {needed}")
        bitmap = dma.logging_report(report.iova, report.length, report.page_size)
        data = DmaLoggingReport(report.iova, report.length, report.page_size, bitmap).build()
        return DeviceFeature(DeviceFeature.SIZE + len(data), request.flags, data)

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


def _write_answered(payload: bytes, address: int, count: int, *, qemu: bool) -> bool:
    """Whether a DMA_WRITE reply answers its request: QEMU's is header-only; the
    spec's echoes address and count, the count a u32 in its text, a u64 in
    libvfio-user's."""
    if qemu:
        return not payload
    codec = DMA_WRITE_REPLY_CODECS.get(len(payload))
    return codec is not None and codec.unpack(payload) == (address, count)


class DmaMessenger:
    """DMA_READ/DMA_WRITE to the client, for windows it mapped without an fd, in the
    layout this connection speaks (found out from the client first, for AUTO)."""

    def __init__(self, connection: ServerConnection) -> None:
        self.connection = connection
        peer = connection.peer
        assert peer is not None
        self.max_transfer = min(peer.max_data_xfer_size, connection.max_data_xfer_size)
        self.layout = connection.dma_layout
        """The layout spoken; AUTO until the client has been asked."""
        self._asking = asyncio.Lock()

    def in_handler(self) -> bool:
        return self.connection.in_handler()

    async def _qemu_layout(self, address: int) -> bool:
        """Whether this client speaks QEMU's layout. For AUTO, ask once: a DMA_WRITE
        of no bytes at `address` (the transfer's own, so a client that checks it finds
        it mapped) is the one message both layouts read alike. QEMU answers it with a
        bare header; a client of the spec echoes address and count, or, if it refuses
        empty or read-only writes, an error, which QEMU never sends for it."""
        if self.layout is DmaLayout.AUTO:
            async with self._asking:
                if self.layout is DmaLayout.AUTO:
                    probe = DmaData(address, 0, b"").build()
                    reply = await self.connection.exchange(Command.DMA_WRITE, probe)
                    reply.close_fds()
                    qemu = not reply.is_error and not reply.payload
                    self.layout = DmaLayout.QEMU if qemu else DmaLayout.SPEC
                    self.connection.log.info("client's DMA layout", layout=self.layout.value)
        return self.layout is DmaLayout.QEMU

    async def read(self, address: int, count: int) -> bytes:
        qemu = self.layout is DmaLayout.QEMU
        if self.layout is DmaLayout.AUTO:
            qemu = await self._qemu_layout(address)
        request = DMA_ACCESS_CODEC.pack(address, count)
        reply = await self.connection.request(Command.DMA_READ, request)
        reply.close_fds()
        payload = reply.payload
        # the fixed fields unpacked, the data sliced out once: it may be megabytes
        prefix = DMA_DATA_QEMU_PREFIX if qemu else DMA_ACCESS_CODEC
        after_data = len(payload) - prefix.size - count  # QEMU pads; the spec does not
        if after_data < 0 or (after_data and not qemu):
            raise self._misread("DMA_READ", address, count, len(payload))
        if prefix.unpack_from(payload) != (address, count):
            raise self._misread("DMA_READ", address, count, len(payload))
        return payload[prefix.size : prefix.size + count]

    async def write(self, address: int, data: bytes) -> None:
        qemu = self.layout is DmaLayout.QEMU
        if self.layout is DmaLayout.AUTO:
            qemu = await self._qemu_layout(address)
        request = dma_data_parts(address, data, qemu=qemu)
        reply = await self.connection.request(Command.DMA_WRITE, request)
        reply.close_fds()
        if not _write_answered(reply.payload, address, len(data), qemu=qemu):
            raise self._misread("DMA_WRITE", address, len(data), len(reply.payload))

    def _misread(self, command: str, address: int, count: int, got: int) -> VfioUserError:
        """A reply that does not answer the request, as when the client speaks the other
        layout than the one set: logged, since device code may swallow the error."""
        self.connection.log_limited(
            "error",
            "DMA reply does not match its request",
            command,
            command=command,
            address=hex(address),
            count=count,
            reply_bytes=got,
            layout=self.layout.value,
        )
        return VfioUserError(
            errno.EIO,
            f"{command} of {count} bytes at {address:#x} answered with {got} bytes "
            f"that do not match it (the client's DMA layout is not {self.layout.value}?)",
        )
