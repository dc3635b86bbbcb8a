"""Test your device as a client would drive it: a pytest plugin and the helpers it hands out.

Installed with muser as the pytest plugin `muser`, so a device author's tests get
the `muser_attach` fixture without importing anything:

    async def test_counter(muser_attach):
        async with muser_attach(Counter()) as session:
            await session.client.region_write(0, 0x4, (5).to_bytes(4, "little"))
            ram = await session.guest_memory(0x10000, 1 << 20)
            interrupt = await session.interrupt(IrqIndex.INTX)
            await session.client.region_write(0, 0xC, bytes(4))
            await interrupt.wait(1.0)
            assert ram[:4] == (5).to_bytes(4, "little")

Everything is real: the device is served on a UNIX socket, guest memory is a
memfd shared with DMA_MAP and interrupts are eventfds wired with SET_IRQS, so a
test exercises the same paths QEMU does. `attach` works without pytest too, in
any asyncio code. Only this module imports pytest; `import muser` never does.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from muser.client import Client
from muser.device import PciDevice
from muser.server import Server
from muser.wire.constants import DmaMapFlag, IrqSetFlag

TRIGGER_EVENTFD = IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.DATA_EVENTFD


class Interrupt:
    """An eventfd wired to one interrupt vector, that a test can await."""

    def __init__(self, index: int, vector: int) -> None:
        self.index = index
        self.vector = vector
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.count = 0
        """Signals collected so far by `wait` and `fired`."""

    def fired(self) -> int:
        """How many signals arrived since last collected (0 if none), without waiting."""
        try:
            signals = os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0
        self.count += signals
        return signals

    async def wait(self, timeout: float = 5.0) -> int:
        """Wait until the device signals the eventfd (or raise TimeoutError), and
        return how many signals had piled up. It watches the fd with the loop's
        reader, so the device code it waits for keeps running on the same loop."""
        signals = self.fired()
        if signals:
            return signals
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(self.fd, readable.set)
        try:
            async with asyncio.timeout(timeout):
                while not signals:
                    await readable.wait()
                    readable.clear()
                    signals = self.fired()
        finally:
            loop.remove_reader(self.fd)
        return signals

    def close(self) -> None:
        """Release the eventfd; safe to call again (teardown calls it too)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DeviceSession:
    """A served device and a negotiated client attached to it, with guest memory and
    interrupts that are released when the session ends."""

    def __init__(self, server: Server, client: Client) -> None:
        self.server = server
        self.client = client
        self.device = server.device
        self._memory: list[tuple[mmap.mmap, memoryview]] = []
        self._interrupts: list[Interrupt] = []

    async def guest_memory(self, iova: int, size: int, *, writable: bool = True) -> memoryview:
        """`size` bytes of guest RAM at `iova`: a memfd mapped here and handed to the
        device with DMA_MAP, so what the device writes shows in the returned view
        (and what the test writes, the device reads)."""
        fd = os.memfd_create("muser-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            memory = mmap.mmap(fd, size)
            view = memoryview(memory)
            self._memory.append((memory, view))
            flags = DmaMapFlag.READ | (DmaMapFlag.WRITE if writable else 0)
            await self.client.dma_map(iova, size, fd=fd, flags=flags)
        finally:
            os.close(fd)
        return view

    async def interrupt(self, index: int, vector: int = 0) -> Interrupt:
        """An eventfd wired to vector `vector` of IRQ `index` (an `IrqIndex`) with SET_IRQS."""
        interrupt = Interrupt(index, vector)
        try:
            await self.client.set_irqs(index, TRIGGER_EVENTFD, vector, 1, fds=[interrupt.fd])
        except BaseException:
            interrupt.close()
            raise
        self._interrupts.append(interrupt)
        return interrupt

    def _release(self) -> None:
        for memory, view in self._memory:
            view.release()
            with contextlib.suppress(BufferError):
                # A slice the test still holds keeps the mapping; it goes with the slice.
                memory.close()
        self._memory.clear()
        for interrupt in self._interrupts:
            interrupt.close()
        self._interrupts.clear()


@contextlib.asynccontextmanager
async def attach(
    device: PciDevice,
    *,
    socket_dir: str | None = None,
    client_options: dict[str, Any] | None = None,
    **server_options: Any,
) -> AsyncIterator[DeviceSession]:
    """Serve `device` on a socket in `socket_dir` (a fresh directory under /tmp,
    removed afterwards, when not given: UNIX socket paths must stay short), connect
    and negotiate a client, and on leaving disconnect, wait until the device has
    heard the client leave, and close every fd and mapping the session made.
    `server_options` go to `Server`, `client_options` to `Client.connect`."""
    with _directory(socket_dir) as directory:
        path = os.path.join(directory, "device.sock")
        async with Server(device, path, **server_options) as server:
            client = await Client.connect(path, **(client_options or {}))
            session = DeviceSession(server, client)
            try:
                yield session
            finally:
                connection = server.connection
                client.close()
                await client.wait_closed()
                if connection is not None:
                    await connection.finished.wait()
                session._release()


@contextlib.contextmanager
def _directory(given: str | None) -> Iterator[str]:
    if given is not None:
        yield given
        return
    directory = tempfile.mkdtemp(prefix="muser-", dir="/tmp")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def muser_attach() -> Callable[..., contextlib.AbstractAsyncContextManager[DeviceSession]]:
    """`attach`, as a fixture so a test needs no import: `async with
    muser_attach(device) as session:` gives the served device and its client."""
    return attach
