"""One client's session with one device, on the running loop: the asyncio adapter of
`muser.session.ServerSession`. The session decides everything the protocol says;
this runs what needs the loop: handler tasks and their timeout, waiting for the
client to drain, the timer, and telling the device when its client is gone."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Hashable
from typing import Any

from muser.device import ClientInfo, DisconnectReason, PciDevice, ResetReason
from muser.device.dma_messages import DmaLayout, DmaMessenger
from muser.endpoint import Endpoint, Recorder
from muser.session import HandlerCall, ServerSession, SessionSettings
from muser.transport import FdTransport


class ServerConnection(Endpoint):
    """The server's side of one client connection to one device."""

    session: ServerSession

    def __init__(
        self,
        transport: FdTransport,
        device: PciDevice,
        *,
        settings: SessionSettings,
        dma_layout: DmaLayout,
        handler_timeout: float | None,
        fd_budget: int | None,
        logger: Any,
        recorder: Recorder | None = None,
    ) -> None:
        super().__init__(transport, logger=logger)
        self.device = device
        self.handler_timeout = handler_timeout
        """Seconds an awaiting handler may take before the client gets ETIMEDOUT."""
        self.finished = asyncio.Event()
        """Set once the client is gone and the device has been told. An event, not a
        future: a waiter that is cancelled must not cancel it for the others."""
        self._handler: asyncio.Task[None] | None = None
        """The task awaiting a command handler, while one is."""
        self._draining: asyncio.Task[None] | None = None
        self._connected: asyncio.Task[None] | None = None
        """The device's `connected` hook, once the client has negotiated."""
        self.session = ServerSession(
            device,
            transport,
            self,
            settings=settings,
            clock=self._loop.time,
            observer=self.observer(recorder),
        )
        self._messenger = DmaMessenger(self, dma_layout)
        device.dma.files.budget = fd_budget
        device.dma.messenger = self._messenger
        self._start()

    # What the session asks of us

    def run(self, call: HandlerCall) -> None:
        self._handler = self._loop.create_task(self._await(call))

    async def _await(self, call: HandlerCall) -> None:
        """Await a handler, within the per-request timeout. A hang is answered
        ETIMEDOUT; device code cancelling what the handler awaits is EIO; only the
        connection's own cancellation stops it."""
        session = self.session
        try:
            # asyncio.timeout, not wait_for: the handler must keep running in this
            # task, which is how message DMA recognises it is inside a handler.
            async with asyncio.timeout(self.handler_timeout):
                outcome = await call.awaitable
        except TimeoutError:
            self._handler = None
            session.time_out(call, self.handler_timeout)
        except asyncio.CancelledError:
            self._handler = None
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            session.fail(call, RuntimeError("device code cancelled the handler"))
        except Exception as exc:
            self._handler = None
            session.fail(call, exc)
        else:
            self._handler = None
            session.finish(call, outcome)

    def negotiated(self) -> None:
        context = self.session.context
        peer = context.peer
        assert peer is not None
        client = ClientInfo(
            pid=self.transport.peer_pid(),
            version=context.peer_version,
            max_data_xfer_size=peer.max_data_xfer_size,
            max_msg_fds=peer.max_msg_fds,
        )
        self._connected = self._loop.create_task(self._hook("connected", client))

    async def _hook(self, name: str, argument: object) -> None:
        """Run one of the device's lifecycle hooks; what it raises is logged, and the
        session goes on."""
        try:
            result = getattr(self.device, name)(argument)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            self.logger.exception(f"device's {name} hook failed", exc_info=exc)

    def wait_for_drain(self) -> None:
        if self._draining is None:
            self._draining = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        await self.transport.drain()
        self._draining = None
        self.session.drained()

    def close(self, *, flush: bool = False) -> None:
        """End the connection; one cut off (not flushed) stops the handler it runs."""
        if not flush and self._handler is not None:
            self._handler.cancel()
        super().close(flush=flush)

    # For device code (through the DMA messenger)

    def in_handler(self) -> bool:
        """Whether the running code is a command handler the client waits on."""
        task = self._handler
        return task is not None and task is asyncio.current_task()

    def max_transfer(self) -> int:
        peer = self.session.context.peer
        ours = self.session.settings.max_data_xfer_size
        return ours if peer is None else min(peer.max_data_xfer_size, ours)

    def log_limited(self, level: str, event: str, kind: Hashable, **fields: object) -> None:
        self.session.log_limited(level, event, kind, **fields)

    # The server's

    def shut_down(self) -> None:
        """Close gracefully (see ServerSession.shut_down)."""
        self.session.shut_down()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._draining is not None:
            self._draining.cancel()
        self._loop.create_task(self._tell_device())

    async def _tell_device(self) -> None:
        """Let a handler still running finish, then tell the device its client is gone:
        its `disconnected` hook (if `connected` ran), then the lost-connection reset."""
        device = self.device
        if device.dma.messenger is self._messenger:
            device.dma.messenger = None
        if self._handler is not None:
            await asyncio.gather(self._handler, return_exceptions=True)
        if self._connected is not None:
            self._connected.cancel()  # a hook still running when its client has gone
            await asyncio.gather(self._connected, return_exceptions=True)
            reason = self.session.close_reason or DisconnectReason.CLIENT_LEFT
            await self._hook("disconnected", reason)
        try:
            result = device.handle_reset(ResetReason.LOST_CONNECTION)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            self.logger.exception("device reset after lost connection failed", exc_info=exc)
        finally:
            self.finished.set()
