"""Two session cores back to back in memory: a server's and a client's, wired by
pipes, with no socket and no event loop.

What a session asks of its driver is done here by hand: bytes and fds move between
the pipes when the test pumps them (whole, or cut where the test says), a handler
that awaits is a coroutine resumed once what it awaits is resolved, and time is a
clock the test moves.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Generator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from muser.device import PciDevice
from muser.device.dma_messages import DmaLayout, DmaMessenger
from muser.session import ClientSession, HandlerCall, ServerSession, SessionSettings
from muser.session.outcome import Outcome
from muser.wire import Frame

Cut = Callable[[int], int]
"""Given how many bytes wait, how many to hand over in one receive."""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Pending:
    """Something a coroutine awaits until the test (or a reply) resolves it."""

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None

    def resolve(self, value: Any = None) -> None:
        self.done, self.value = True, value

    def __await__(self) -> Generator[Pending, None, Any]:
        while not self.done:
            yield self
        return self.value


class Task:
    """An awaitable driven by hand: stepped until it waits on a Pending that is not
    resolved, then again once it is."""

    def __init__(
        self, awaitable: Awaitable[Any], done: Callable[[Any, Exception | None], None]
    ) -> None:
        self._steps = awaitable.__await__()
        self._done = done
        self.waiting_on: Pending | None = None
        self.finished = False

    def step(self) -> None:
        while not self.finished:
            if self.waiting_on is not None and not self.waiting_on.done:
                return
            try:
                yielded = self._steps.send(None)
            except StopIteration as stop:
                self.finished = True
                self._done(stop.value, None)
                return
            except Exception as exc:
                self.finished = True
                self._done(None, exc)
                return
            if yielded is not None and not isinstance(yielded, Pending):
                raise TypeError(f"an in-memory task cannot await {yielded!r}")
            self.waiting_on = yielded


@dataclass
class Pipe:
    """One direction of the connection: what a session sent, held until pumped; fds
    ride on the first byte of their message, as on a socket. A sink."""

    data: bytearray = field(default_factory=bytearray)
    fds: list[tuple[int, list[int]]] = field(default_factory=list)
    """(offset in data, fds) for messages sent with fds (duplicates, owned here)."""
    backlogged: bool = False
    closed: bool = False

    def send(self, buffers: Sequence[bytes], fds: Sequence[int] = ()) -> None:
        if self.closed:
            return
        if fds:
            self.fds.append((len(self.data), [os.dup(fd) for fd in fds]))
        for buffer in buffers:
            self.data += buffer

    def take(self, size: int) -> tuple[bytes, list[int]]:
        chunk = bytes(self.data[:size])
        del self.data[:size]
        fds: list[int] = []
        rest = []
        for offset, held in self.fds:
            if offset < size:
                fds += held
            else:
                rest.append((offset - size, held))
        self.fds = rest
        return chunk, fds

    def discard(self) -> None:
        for _offset, held in self.fds:
            for fd in held:
                os.close(fd)
        self.fds.clear()
        self.data.clear()


class Driver:
    """What either session asks of whatever drives it, done in memory."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pipe = Pipe()
        """What this end sends."""
        self.logs: list[tuple[str, str, dict[str, object]]] = []
        self.closing: bool | None = None
        """None until the session asks to close; then whether to flush first."""
        self.lost = False
        self.paused = False
        self.timer: float | None = None
        self.replies: dict[int, Pending] = {}

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self, *, flush: bool) -> None:
        if self.closing is None or not flush:
            self.closing = flush
        if not flush:
            self.pipe.discard()
        self.pipe.closed = True

    def set_timer(self, deadline: float | None) -> None:
        self.timer = deadline

    def log(self, level: str, event: str, /, **fields: object) -> None:
        self.logs.append((level, event, fields))

    def log_limited(self, level: str, event: str, kind: Hashable, **fields: object) -> None:
        self.log(level, event, **fields)

    def reply_arrived(self, msg_id: int, frame: Frame) -> None:
        self.replies.pop(msg_id).resolve(frame)

    def events(self, level: str | None = None) -> list[str]:
        return [event for lvl, event, _ in self.logs if level is None or lvl == level]


class ServerDriver(Driver):
    """The server's end: runs handlers as tasks, and is the DMA link of its device."""

    session: ServerSession

    def __init__(self, clock: Clock, device: PciDevice) -> None:
        super().__init__(clock)
        self.device = device
        self.tasks: list[Task] = []
        self.handler_task: Task | None = None
        """The task awaiting a command's handler, while there is one."""
        self._in_handler = False
        self.drain_wanted = False
        self.negotiations = 0
        """How often the session said its peer negotiated (once, or never)."""

    def negotiated(self) -> None:
        self.negotiations += 1

    def run(self, call: HandlerCall) -> None:
        def done(outcome: Outcome, exc: Exception | None) -> None:
            self.handler_task = None
            if exc is None:
                self.session.finish(call, outcome)
            else:
                self.session.fail(call, exc)

        # stepped by the next pump, as a loop runs a new task on its next turn
        self.handler_task = Task(call.awaitable, done)
        self.tasks.append(self.handler_task)

    def _step(self, task: Task) -> None:
        self._in_handler = task is self.handler_task
        try:
            task.step()
        finally:
            self._in_handler = False

    def wait_for_drain(self) -> None:
        self.drain_wanted = True

    # The DMA link

    def exchange(self, command: int, payload: bytes | tuple[bytes, ...]) -> Awaitable[Frame]:
        pending = Pending()
        msg_id = self.session.send_request(command, payload)
        self.replies[msg_id] = pending
        return pending

    def in_handler(self) -> bool:
        return self._in_handler

    def max_transfer(self) -> int:
        return self.session.settings.max_data_xfer_size

    def step_tasks(self) -> bool:
        """Step every task whose Pending resolved; whether any moved."""
        moved = False
        for task in list(self.tasks):
            if task.finished:
                self.tasks.remove(task)
            elif task.waiting_on is None or task.waiting_on.done:
                self._step(task)
                moved = True
        return moved


class SessionPair:
    """A server session for `device` and a client session, back to back."""

    def __init__(
        self,
        device: PciDevice,
        *,
        settings: SessionSettings | None = None,
        dma_layout: DmaLayout = DmaLayout.AUTO,
        client_layout: DmaLayout = DmaLayout.SPEC,
        max_data_xfer_size: int = 1 << 20,
    ) -> None:
        self.clock = Clock()
        self.device = device
        self.server = ServerDriver(self.clock, device)
        self.server.session = ServerSession(
            device,
            self.server.pipe,
            self.server,
            settings=settings or SessionSettings(),
            clock=self.clock,
        )
        device.dma.messenger = DmaMessenger(self.server, dma_layout)
        self.client = Driver(self.clock)
        self.client_session = ClientSession(
            self.client.pipe,
            self.client,
            max_data_xfer_size=max_data_xfer_size,
            dma_layout=client_layout,
            clock=self.clock,
        )

    @property
    def session(self) -> ServerSession:
        return self.server.session

    # What the client does

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Bytes from the client, as they are (fds on their first byte)."""
        self.client.pipe.send((data,), fds)

    def request(
        self, command: int, payload: bytes | tuple[bytes, ...] = b"", fds: Sequence[int] = ()
    ) -> Pending:
        pending = Pending()
        msg_id = self.client_session.send_request(command, payload, fds)
        self.client.replies[msg_id] = pending
        return pending

    def post(self, command: int, payload: bytes = b"") -> None:
        self.client_session.send_request(command, payload, posted=True)

    def call(
        self, command: int, payload: bytes | tuple[bytes, ...] = b"", fds: Sequence[int] = ()
    ) -> Frame:
        """A request, pumped until its reply arrives."""
        pending = self.request(command, payload, fds)
        self.pump()
        assert pending.done, "no reply"
        frame: Frame = pending.value
        return frame

    def leave(self) -> None:
        """The client goes away."""
        self.client.pipe.discard()
        self._lose()

    def run(self, awaitable: Awaitable[Any]) -> Pending:
        """Device code outside any handler (a task it started): its result, once pumped."""
        result = Pending()

        def done(value: Any, exc: Exception | None) -> None:
            result.resolve(exc if exc is not None else value)

        task = Task(awaitable, done)
        self.server.tasks.append(task)
        task.step()
        return result

    def advance(self, seconds: float) -> None:
        """Move the clock on, firing the server's timer if it falls due."""
        self.clock.now += seconds
        timer = self.server.timer
        if timer is not None and timer <= self.clock.now:
            self.server.timer = None
            self.session.tick()
        self.pump()

    # Moving bytes

    def pump(self, cut: Cut | None = None) -> None:
        """Deliver what waits in both directions, run what became ready, until
        nothing moves. `cut` says how much each receive takes (all, if None)."""
        moved = True
        while moved:
            moved = False
            server, client = self.server, self.client
            if client.pipe.data and not server.paused and not server.lost:
                size = len(client.pipe.data) if cut is None else cut(len(client.pipe.data))
                data, fds = client.pipe.take(size)
                server.session.data_received(data, fds)
                moved = True
            if server.pipe.data and not client.lost:
                data, fds = server.pipe.take(len(server.pipe.data))
                self.client_session.data_received(data, fds)
                moved = True
            moved |= server.step_tasks()
            if server.drain_wanted and not server.pipe.backlogged:
                server.drain_wanted = False
                server.session.drained()
                moved = True
            if server.closing is not None and not server.pipe.data and not server.lost:
                self._lose()
                moved = True

    def _lose(self) -> None:
        """The connection is gone: what is still in it, fds included, goes with it."""
        self.client.pipe.discard()
        if not self.server.lost:
            self.server.lost = True
            self.server.pipe.discard()
            self.session.connection_lost()
        if not self.client.lost:
            self.client.lost = True
            self.client_session.connection_lost()
