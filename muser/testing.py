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
import inspect
import mmap
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from muser.client import Client
from muser.device import PciDevice
from muser.pci import Msi, MsiX
from muser.server import Server
from muser.wire import close_fds
from muser.wire.constants import DmaMapFlag, IrqIndex, IrqSetFlag, PciRegion, RegionFlag
from muser.wire.messages import RegionInfo, SparseMmapCap, region_caps

__all__ = ["DeviceSession", "Interrupt", "MappedArea", "attach", "muser_attach"]

TRIGGER_EVENTFD = IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.DATA_EVENTFD
_CAPABILITIES_POINTER = 0x34


class Interrupt:
    """An eventfd wired to one interrupt vector, that a test can await."""

    def __init__(
        self, index: int, vector: int, *, client: Client | None = None,
        device: PciDevice | None = None,
    ) -> None:  # fmt: skip
        self.index = index
        self.vector = vector
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.count = 0
        """Signals collected so far by `wait` and `fired`."""
        self._client = client
        self._device = device

    def fired(self) -> int:
        """How many signals arrived since last collected (0 if none), without waiting."""
        try:
            signals = os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0
        self.count += signals
        return signals

    async def wait(self, timeout: float = 5.0) -> int:
        """Wait until the device signals the eventfd and return how many signals had
        piled up; raise TimeoutError saying what holds the interrupt back. It watches
        the fd with the loop's reader, so the device code it waits for keeps running
        on the same loop."""
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
        except TimeoutError:
            raise TimeoutError(self.diagnosis(timeout)) from None
        finally:
            loop.remove_reader(self.fd)
        return signals

    def diagnosis(self, timeout: float) -> str:
        """What a timeout says: which interrupt, and what the device's side of it
        shows (when the device is served in this process)."""
        text = f"no {IrqIndex(self.index).name} interrupt on vector {self.vector} in {timeout} s"
        if self._device is None:
            return text
        irq = self._device.irqs[self.index]
        reason = irq.explain(self.vector)
        if 0 <= self.vector < irq.count and irq.is_pending(self.vector):
            return f"{text}: it is pending, held back because {reason or 'of the guest'}"
        if reason:
            return f"{text}: a trigger now would be dropped or held, because {reason}"
        return f"{text}: nothing holds it back, so the device has not raised it"

    async def unmask(self) -> None:
        """Unmask the vector (SET_IRQS ACTION_UNMASK), as QEMU does at the guest's
        EOI: muser masks INTx at each delivery, so a test that waits for a second
        INTx interrupt unmasks it after the first."""
        if self._client is None:
            raise RuntimeError("this Interrupt has no client: get it from session.interrupt()")
        flags = IrqSetFlag.ACTION_UNMASK | IrqSetFlag.DATA_NONE
        await self._client.set_irqs(self.index, flags, self.vector, 1)

    def close(self) -> None:
        """Release the eventfd; safe to call again (teardown calls it too)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class MappedArea:
    """One mappable part of a region, mapped: `memory` is the region's bytes from
    `offset` on, shared with the device."""

    offset: int
    memory: memoryview


class DeviceSession:
    """A served device and a negotiated client attached to it, with guest memory,
    interrupts and mapped regions that are released when the session ends."""

    def __init__(self, server: Server, client: Client) -> None:
        self.server = server
        self.client = client
        self.device = server.device
        self._memory: list[tuple[mmap.mmap, memoryview]] = []
        self._interrupts: list[Interrupt] = []

    async def guest_memory(self, address: int, size: int, *, writable: bool = True) -> memoryview:
        """`size` bytes of guest RAM at guest physical `address`: a memfd mapped here
        and handed to the device with DMA_MAP, so what the device writes shows in the
        returned view (and what the test writes, the device reads)."""
        fd = os.memfd_create("muser-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            view = self._keep(mmap.mmap(fd, size))
            flags = DmaMapFlag.READ | (DmaMapFlag.WRITE if writable else 0)
            await self.client.dma_map(address, size, fd=fd, flags=flags)
        finally:
            os.close(fd)
        return view

    def _keep(self, memory: mmap.mmap) -> memoryview:
        view = memoryview(memory)
        self._memory.append((memory, view))
        return view

    async def interrupt(self, index: int, vector: int = 0) -> Interrupt:
        """An eventfd wired to vector `vector` of IRQ `index` (an `IrqIndex`) with SET_IRQS."""
        interrupt = Interrupt(index, vector, client=self.client, device=self.device)
        try:
            await self.client.set_irqs(index, TRIGGER_EVENTFD, vector, 1, fds=[interrupt.fd])
        except BaseException:
            interrupt.close()
            raise
        self._interrupts.append(interrupt)
        return interrupt

    async def capability(self, cap_id: int) -> int:
        """The config-space offset of the first capability with ID `cap_id`, found
        by walking the list as a driver does (LookupError if there is none)."""
        config = PciRegion.CONFIG
        offset = (await self.client.region_read(config, _CAPABILITIES_POINTER, 1))[0] & ~3
        seen: set[int] = set()
        while offset and offset not in seen:
            seen.add(offset)
            found, following = await self.client.region_read(config, offset, 2)
            if found == cap_id:
                return offset
            offset = following & ~3
        raise LookupError(f"the device has no capability {cap_id:#x} in config space")

    async def _config_word(self, offset: int) -> int:
        return int.from_bytes(await self.client.region_read(PciRegion.CONFIG, offset, 2), "little")

    async def _set_config_word(self, offset: int, value: int) -> None:
        await self.client.region_write(PciRegion.CONFIG, offset, value.to_bytes(2, "little"))

    async def enable_msix(self) -> None:
        """What a driver does before MSI-X interrupts can arrive: set MSI-X Enable
        (Message Control bit 15), clear Function Mask, and unmask every vector in
        the table (vectors start masked)."""
        at = await self.capability(MsiX.cap_id)
        control = await self._config_word(at + MsiX.CONTROL)
        await self._set_config_word(at + MsiX.CONTROL, control & ~MsiX.FUNCTION_MASK | MsiX.ENABLE)
        raw = await self.client.region_read(PciRegion.CONFIG, at + MsiX.TABLE, 4)
        table = int.from_bytes(raw, "little")
        bar, offset = table & MsiX.BIR_MASK, table & ~MsiX.BIR_MASK
        for vector in range((control & MsiX.TABLE_SIZE_MASK) + 1):
            entry = offset + vector * MsiX.ENTRY_SIZE + MsiX.VECTOR_CONTROL
            await self.client.region_write(bar, entry, bytes(4))

    async def enable_msi(self, vectors: int = 1) -> None:
        """Set MSI Enable, with Multiple Message Enable for `vectors` (a power of two
        the device is capable of)."""
        if vectors < 1 or vectors & (vectors - 1):
            raise ValueError("MSI enables a power of two of vectors")
        at = await self.capability(Msi.cap_id)
        control = await self._config_word(at + Msi.CONTROL)
        enabled = (vectors.bit_length() - 1) << Msi.MME_SHIFT
        await self._set_config_word(
            at + Msi.CONTROL, control & ~Msi.MME_MASK | enabled | Msi.ENABLE
        )

    async def map_region(self, index: int) -> list[MappedArea]:
        """Map what the client may map of region `index` (its sparse areas, or all of
        it), as QEMU maps a BAR the device shares; unmapped when the session ends."""
        info, fds = await self.client.get_region_info(index)
        if info.argsz > RegionInfo.SIZE:  # the reply said how long it needs to be
            close_fds(fds)
            info, fds = await self.client.get_region_info(index, argsz=info.argsz)
        try:
            if not info.flags & RegionFlag.MMAP or not fds:
                raise ValueError(f"region {index} cannot be mapped (no MMAP flag or no fd)")
            sparse = [cap for cap in region_caps(info) if isinstance(cap, SparseMmapCap)]
            areas = [(a.offset, a.size) for a in sparse[0].areas] if sparse else [(0, info.size)]
            protection = (mmap.PROT_READ if info.flags & RegionFlag.READ else 0) | (
                mmap.PROT_WRITE if info.flags & RegionFlag.WRITE else 0
            )
            return [
                MappedArea(
                    offset,
                    self._keep(
                        mmap.mmap(fds[0], size, prot=protection, offset=info.offset + offset)
                    ),
                )
                for offset, size in areas
            ]
        finally:
            close_fds(fds)

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


_ASYNC_FIXTURES = frozenset({"muser_attach"})
"""Fixtures whose tests are `async def`: the plugin has them run by pytest-asyncio."""


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> Generator[None, object, object]:
    """Mark an `async def` test that uses muser's fixtures for pytest-asyncio, so it
    runs in a project whose pytest configuration says nothing about asyncio."""
    if (
        inspect.iscoroutinefunction(obj)
        and _ASYNC_FIXTURES & inspect.signature(obj).parameters.keys()
    ):
        if not collector.config.pluginmanager.hasplugin("asyncio"):
            raise pytest.UsageError(
                f"{name} is async and uses muser's fixtures, which need pytest-asyncio: "
                "pip install pytest-asyncio"
            )
        marks = getattr(obj, "pytestmark", [])
        if not any(mark.name == "asyncio" for mark in marks):
            pytest.mark.asyncio(obj)
    return (yield)
