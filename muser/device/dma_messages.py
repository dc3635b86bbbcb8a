"""Guest memory reached by messages: DMA_READ/DMA_WRITE to the client, for windows
it mapped without an fd, in the layout the client speaks (QEMU 10.x lays them out
otherwise than the spec), never awaited inside the handler of a client command."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Hashable
from enum import Enum
from typing import Protocol

from muser.errors import VfioUserError
from muser.wire import Frame
from muser.wire.constants import Command
from muser.wire.messages import (
    DMA_ACCESS_CODEC,
    DMA_DATA_QEMU_PREFIX,
    DMA_WRITE_REPLY_CODECS,
    DmaData,
    dma_data_parts,
)


class DmaLayout(Enum):
    """How DMA_READ/DMA_WRITE payloads are laid out on a connection."""

    AUTO = "auto"
    """Ask the client before the first message transfer: a DMA_WRITE of no bytes,
    which QEMU answers header-only and a client of the spec with address and count,
    then speak what it speaks. A server's default."""
    SPEC = "spec"
    """address u64, count u64, data at 16: the spec and libvfio-user."""
    QEMU = "qemu"
    """QEMU 10.x: a u32 count and data at offset 12, 4 pad bytes after it, and a
    header-only DMA_WRITE reply (protocol.md §9 row 1)."""


class DmaDeadlockError(RuntimeError):
    """A message-based DMA transfer was awaited inside a client command's handler.

    The client is waiting for that command's reply and cannot answer the DMA
    request before it gets it. Start the transfer in a task the handler creates
    (it runs once the handler has replied)."""


class MessageDma(Protocol):
    """What a connection offers for windows that have no file descriptor."""

    @property
    def max_transfer(self) -> int: ...

    def in_handler(self) -> bool: ...

    async def read(self, address: int, count: int) -> bytes: ...

    async def write(self, address: int, data: bytes) -> None: ...


class DmaLink(Protocol):
    """The connection a messenger sends its requests over."""

    def exchange(self, command: int, payload: bytes | tuple[bytes, ...]) -> Awaitable[Frame]:
        """Send a command and await its reply frame, error replies included."""

    def in_handler(self) -> bool:
        """Whether the running code is a command handler the client waits on."""

    def max_transfer(self) -> int:
        """The most bytes one message may carry, in either direction."""

    def log(self, level: str, event: str, /, **fields: object) -> None: ...

    def log_limited(self, level: str, event: str, kind: Hashable, **fields: object) -> None: ...


def _write_answered(payload: bytes, address: int, count: int, *, qemu: bool) -> bool:
    """Whether a DMA_WRITE reply answers its request: QEMU's is header-only; the
    spec's echoes address and count, the count a u32 in its text, a u64 in
    libvfio-user's."""
    if qemu:
        return not payload
    codec = DMA_WRITE_REPLY_CODECS.get(len(payload))
    return codec is not None and codec.unpack(payload) == (address, count)


class DmaMessenger:
    """DMA_READ/DMA_WRITE over a link, in the layout it speaks: `layout`, or, for
    AUTO, the one the client turns out to speak when first asked."""

    def __init__(self, link: DmaLink, layout: DmaLayout) -> None:
        self._link = link
        self.layout = layout
        """The layout spoken; AUTO until the client has been asked."""
        self._asking = asyncio.Lock()

    @property
    def max_transfer(self) -> int:
        return self._link.max_transfer()

    def in_handler(self) -> bool:
        return self._link.in_handler()

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
                    reply = await self._link.exchange(Command.DMA_WRITE, probe)
                    reply.close_fds()
                    qemu = not reply.is_error and not reply.payload
                    self.layout = DmaLayout.QEMU if qemu else DmaLayout.SPEC
                    self._link.log("info", "client's DMA layout", layout=self.layout.value)
        return self.layout is DmaLayout.QEMU

    async def _request(self, command: int, payload: bytes | tuple[bytes, ...]) -> bytes:
        reply = await self._link.exchange(command, payload)
        reply.close_fds()
        if reply.is_error:
            name = Command(command).name
            raise VfioUserError(reply.error or errno.EIO, f"{name} failed: errno {reply.error}")
        return reply.payload

    async def read(self, address: int, count: int) -> bytes:
        qemu = self.layout is DmaLayout.QEMU
        if self.layout is DmaLayout.AUTO:
            qemu = await self._qemu_layout(address)
        payload = await self._request(Command.DMA_READ, DMA_ACCESS_CODEC.pack(address, count))
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
        payload = await self._request(Command.DMA_WRITE, dma_data_parts(address, data, qemu=qemu))
        if not _write_answered(payload, address, len(data), qemu=qemu):
            raise self._misread("DMA_WRITE", address, len(data), len(payload))

    def _misread(self, command: str, address: int, count: int, got: int) -> VfioUserError:
        """A reply that does not answer the request, as when the client speaks the other
        layout than the one set: logged, since device code may swallow the error."""
        self._link.log_limited(
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
