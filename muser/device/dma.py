"""Guest memory as the client maps it (protocol.md §3.2, §3.3, §3.11, §3.12, §7.8).

The client maps windows of guest memory with DMA_MAP. A window that comes with a
file descriptor is reached directly by device code; a window without one by
sending the client DMA_READ/DMA_WRITE messages. Windows are kept sorted by
address, so a lookup is a bisection even with 65,535 of them.

How a window's file is reached, mapped or not, so that nothing a client does with
it can crash the server, is `muser.device.windows`; the message path is
`muser.device.dma_messages`.

Two rules keep the guest safe. A DMA_UNMAP (or a reset) completes only after
device code has let go of every view into the window (`with dma.view(...)`).
And a message-based transfer is never awaited by the task that handles a client
command: the client (QEMU's vCPU) waits for that command's reply and cannot
answer our DMA request until it has it, so muser raises DmaDeadlockError there.
"""

from __future__ import annotations

import bisect
import errno
from dataclasses import dataclass
from types import TracebackType

import structlog

from muser.device.dma_messages import DmaDeadlockError, DmaLayout, MessageDma
from muser.device.windows import DmaWindow, GuestFiles, file_identity
from muser.errors import VfioUserError
from muser.wire import close_fds
from muser.wire.constants import PAGE_SIZE, DmaMapFlag

_log = structlog.get_logger("muser")

MAX_WINDOW_SIZE = 1 << 43
"""Larger windows are refused with ENOSPC, as libvfio-user does (8 TiB)."""
DEFAULT_MAX_WINDOWS = 65535
_ADDRESS_LIMIT = 1 << 64
_READ, _WRITE = int(DmaMapFlag.READ), int(DmaMapFlag.WRITE)
_MMAP, _FILE_IO = int(DmaMapFlag.MMAP), int(DmaMapFlag.FILE_IO)
"""Plain ints: `flags & DmaMapFlag.READ` goes through IntFlag's __rand__, a
microsecond or more each, and a vIOMMU guest maps and unmaps all the time."""
_KNOWN_MAP_FLAGS = _READ | _WRITE | _MMAP | _FILE_IO

__all__ = ["DmaDeadlockError", "DmaLayout", "DmaSegment", "DmaSpace", "DmaView", "DmaWindow"]


@dataclass(frozen=True, slots=True)
class DmaSegment:
    """A piece of a guest-memory range that lies in one window."""

    window: DmaWindow
    address: int
    length: int

    @property
    def start(self) -> int:
        """Offset of the piece within its window."""
        return self.address - self.window.address


class DirtyLog:
    """Pages written through the device API while DMA logging runs (§7.8)."""

    def __init__(self, page_size: int, ranges: list[tuple[int, int]]) -> None:
        self.page_size = page_size
        self.ranges = ranges
        """(iova, length) pairs to log; empty means all of guest memory."""
        self.pages: set[int] = set()

    def mark(self, address: int, length: int) -> None:
        if not length:
            return
        end = address + length
        if self.ranges:
            for start, size in self.ranges:
                low, high = max(address, start), min(end, start + size)
                if low < high:
                    self.pages.update(
                        range(low // self.page_size, (high - 1) // self.page_size + 1)
                    )
        else:
            self.pages.update(range(address // self.page_size, (end - 1) // self.page_size + 1))

    def report(self, iova: int, length: int, page_size: int) -> bytes:
        """The bitmap of `page_size` pages from `iova`, LSB first in u64 words; the
        reported pages are clean afterwards."""
        count = -(-length // page_size)
        bits = 0
        end = iova + length
        first, last = iova // self.page_size, (end - 1) // self.page_size
        reported = [page for page in self.pages if first <= page <= last]
        for page in reported:
            low = max(page * self.page_size, iova)
            high = min((page + 1) * self.page_size, end)
            for bit in range((low - iova) // page_size, (high - 1 - iova) // page_size + 1):
                bits |= 1 << bit
            if page * self.page_size >= iova and (page + 1) * self.page_size <= end:
                self.pages.discard(page)
        return bits.to_bytes(-(-count // 64) * 8, "little")


class DmaSpace:
    """A device's view of guest memory: the windows its client mapped."""

    def __init__(self, max_windows: int = DEFAULT_MAX_WINDOWS) -> None:
        self.max_windows = max_windows
        self._starts: list[int] = []
        self._windows: list[DmaWindow] = []
        self.files = GuestFiles()
        """How windows reach their files, within the client's descriptor budget."""
        self.stopped = False
        """True while migration has the device stopped: device code may not DMA."""
        self.messenger: MessageDma | None = None
        """Set by the connection: how to reach windows that have no fd."""
        self.log: DirtyLog | None = None

    def __len__(self) -> int:
        return len(self._windows)

    @property
    def windows(self) -> list[DmaWindow]:
        """The mapped windows, in address order (`address`, `size` and more each)."""
        return list(self._windows)

    @property
    def busy(self) -> bool:
        """Whether device code holds a view into any window."""
        return any(window.users for window in self._windows)

    # What the client asks for

    def map(self, address: int, size: int, flags: int, offset: int, fd: int | None) -> None:
        """DMA_MAP. Takes ownership of `fd`: held (for pread/pwrite) or closed."""
        try:
            window = self._new_window(address, size, flags, offset, fd)
        finally:
            if fd is not None:
                close_fds([fd])
        if window is not None:
            index = bisect.bisect_left(self._starts, address)
            self._starts.insert(index, address)
            self._windows.insert(index, window)
            self.files.mapped += window.holds_fd

    def _new_window(
        self, address: int, size: int, flags: int, offset: int, fd: int | None
    ) -> DmaWindow | None:
        """A checked window, reached as its fd allows; None for an identical re-map
        (a no-op). The caller closes `fd` afterwards: what the window keeps is a
        duplicate."""
        self._check_map(address, size, flags, offset, fd)
        identity = file_identity(fd) if fd is not None else None
        existing = self._overlapping(address, size)
        if existing is not None:
            same = (existing.address, existing.size, existing.flags, existing.offset)
            if same == (address, size, flags, offset) and existing.identity == identity:
                return None
            raise VfioUserError(
                errno.EEXIST,
                f"window {address:#x}+{size:#x} overlaps {existing.address:#x}+{existing.size:#x}",
            )
        if len(self._windows) >= self.max_windows:
            raise VfioUserError(errno.EINVAL, f"already {self.max_windows} windows mapped")
        if fd is None:
            return DmaWindow(address, size, flags, offset=offset, identity=None)
        assert identity is not None
        return self.files.window(address, size, flags, offset=offset, fd=fd, identity=identity)

    @staticmethod
    def _check_map(address: int, size: int, flags: int, offset: int, fd: int | None) -> None:
        if flags & ~_KNOWN_MAP_FLAGS:
            raise VfioUserError(
                errno.EINVAL, f"unknown DMA_MAP flags {flags & ~_KNOWN_MAP_FLAGS:#x}"
            )
        if not flags & (_READ | _WRITE):
            raise VfioUserError(errno.EINVAL, "a window must be readable or writable")
        if fd is None and flags & (_MMAP | _FILE_IO):
            raise VfioUserError(errno.EINVAL, "MMAP and FILE_IO need a file descriptor")
        if flags & _MMAP and flags & _FILE_IO:
            raise VfioUserError(errno.EINVAL, "MMAP and FILE_IO exclude each other")
        if not size or address % PAGE_SIZE or size % PAGE_SIZE:
            raise VfioUserError(errno.EINVAL, f"window {address:#x}+{size:#x} is not whole pages")
        if address + size > _ADDRESS_LIMIT:
            raise VfioUserError(errno.EINVAL, "the window wraps past the end of the address space")
        if size > MAX_WINDOW_SIZE:
            raise VfioUserError(errno.ENOSPC, f"window of {size:#x} bytes is too large")
        if fd is None and offset:
            raise VfioUserError(errno.EINVAL, "an offset without a file descriptor")

    def _overlapping(self, address: int, size: int) -> DmaWindow | None:
        index = bisect.bisect_right(self._starts, address + size - 1)
        if index and self._windows[index - 1].end > address:
            return self._windows[index - 1]
        return None

    async def unmap(self, address: int, size: int) -> None:
        """DMA_UNMAP of exactly one window: it disappears at once for new accesses, and
        is unmapped once device code let go of it."""
        index = bisect.bisect_left(self._starts, address)
        if (
            index == len(self._windows)
            or self._windows[index].address != address
            or self._windows[index].size != size
        ):
            raise VfioUserError(errno.ENOENT, f"no window {address:#x}+{size:#x}")
        window = self._windows.pop(index)
        del self._starts[index]
        await self._retire(window)

    async def unmap_all(self) -> None:
        windows, self._windows, self._starts = self._windows, [], []
        for window in windows:
            await self._retire(window)

    async def _retire(self, window: DmaWindow) -> None:
        await window.quiesce()
        held_fd = window.holds_fd
        if window.close():
            self.files.mapped -= held_fd
        else:
            _log.error(
                "device code kept a view past its `with` block; the window stays mapped",
                address=hex(window.address),
                size=window.size,
            )

    async def quiesce(self) -> None:
        """Wait until device code holds no view into any window (before a reset)."""
        for window in list(self._windows):
            await window.quiesce()

    # What device code uses

    def translate(self, address: int, length: int, *, write: bool = False) -> list[DmaSegment]:
        """The pieces of [address, address + length) window by window; a hole is EFAULT,
        a window without the needed permission EPERM."""
        if self.stopped:
            raise VfioUserError(errno.EBUSY, "the device is stopped for migration: no DMA")
        if length < 0 or address < 0 or address + length > _ADDRESS_LIMIT:
            raise VfioUserError(errno.EFAULT, f"range {address:#x}+{length:#x} is invalid")
        segments: list[DmaSegment] = []
        position, end = address, address + length
        index = bisect.bisect_right(self._starts, address) - 1
        while position < end:
            if (
                index < 0
                or index >= len(self._windows)
                or self._windows[index].end <= position
                or self._windows[index].address > position
            ):
                raise VfioUserError(errno.EFAULT, f"guest address {position:#x} is not mapped")
            window = self._windows[index]
            if not (window.writable if write else window.readable):
                raise VfioUserError(
                    errno.EPERM,
                    f"window {window.address:#x} is not {'writable' if write else 'readable'}",
                )
            stop = min(end, window.end)
            segments.append(DmaSegment(window, position, stop - position))
            position = stop
            index += 1
        return segments

    def _window_over(self, address: int, length: int, write: bool) -> DmaWindow | None:
        """The one window that holds the whole range with the needed access, or None
        when the general path must decide (several windows, holes)."""
        if self.stopped:
            raise VfioUserError(errno.EBUSY, "the device is stopped for migration: no DMA")
        index = bisect.bisect_right(self._starts, address) - 1
        if index < 0 or length < 0:
            return None
        window = self._windows[index]
        if address + length <= window.address + window.size and (
            window.writable if write else window.readable
        ):
            return window
        return None

    def read_direct(self, address: int, length: int) -> bytes:
        """Read guest memory now, from windows that came with a file descriptor."""
        window = self._window_over(address, length, False)
        if window is not None and window.direct:
            return window.read_direct(address - window.address, length)
        segments = self.translate(address, length)
        self._require_direct(segments)
        return b"".join(
            segment.window.read_direct(segment.start, segment.length) for segment in segments
        )

    def write_direct(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest memory now, to windows that came with a file descriptor."""
        window = self._window_over(address, len(data), True)
        if window is not None and window.direct:
            window.write_direct(address - window.address, data)
            if self.log is not None:
                self.log.mark(address, len(data))
            return
        segments = self.translate(address, len(data), write=True)
        self._require_direct(segments)
        position = 0
        for segment in segments:
            segment.window.write_direct(segment.start, data[position : position + segment.length])
            position += segment.length
        self._mark_dirty(address, len(data))

    @staticmethod
    def _require_direct(segments: list[DmaSegment]) -> None:
        for segment in segments:
            if not segment.window.direct:
                raise VfioUserError(
                    errno.EFAULT,
                    f"window {segment.window.address:#x} has no fd:"
                    " use `await dma.read()`/`write()` from a task",
                )

    async def read(self, address: int, length: int, *, messages: bool = False) -> bytes:
        """Read guest memory through whichever path each window needs; `messages`
        uses DMA_READ even for windows that came with an fd."""
        window = self._window_over(address, length, False)
        if window is not None and length:  # the common case, without segments
            if window.direct and not messages:
                return window.read_direct(address - window.address, length)
            messenger = self._messenger()
            if length <= messenger.max_transfer:
                return await messenger.read(address, length)
        pieces = []
        for segment in self.translate(address, length):
            if segment.window.direct and not messages:
                pieces.append(segment.window.read_direct(segment.start, segment.length))
            else:
                pieces.append(await self._read_messages(segment.address, segment.length))
        return b"".join(pieces)

    async def write(
        self, address: int, data: bytes | bytearray | memoryview, *, messages: bool = False
    ) -> None:
        """Write guest memory through whichever path each window needs; `messages`
        uses DMA_WRITE even for windows that came with an fd."""
        window = self._window_over(address, len(data), True)
        if window is not None and data:  # the common case, without segments
            if window.direct and not messages:
                self.write_direct(address, data)
                return
            messenger = self._messenger()
            if len(data) <= messenger.max_transfer:
                await messenger.write(address, bytes(data))
                self._mark_dirty(address, len(data))
                return
        position = 0
        for segment in self.translate(address, len(data), write=True):
            piece = data[position : position + segment.length]
            if segment.window.direct and not messages:
                segment.window.write_direct(segment.start, piece)
            else:
                await self._write_messages(segment.address, bytes(piece))
            position += segment.length
        self._mark_dirty(address, len(data))

    def _messenger(self) -> MessageDma:
        messenger = self.messenger
        if messenger is None:
            raise VfioUserError(errno.ENOTCONN, "no client to send DMA messages to")
        if messenger.in_handler():
            raise DmaDeadlockError(
                "message-based DMA awaited inside a client command's handler would deadlock "
                "the client; run it in a task the handler starts"
            )
        return messenger

    async def _read_messages(self, address: int, length: int) -> bytes:
        messenger = self._messenger()
        chunks = []
        for start in range(address, address + length, messenger.max_transfer):
            count = min(messenger.max_transfer, address + length - start)
            chunks.append(await messenger.read(start, count))
        return b"".join(chunks)

    async def _write_messages(self, address: int, data: bytes) -> None:
        messenger = self._messenger()
        step = messenger.max_transfer
        for position in range(0, len(data), step):
            await messenger.write(address + position, data[position : position + step])

    def view(self, address: int, length: int, *, write: bool = False) -> DmaView:
        """A zero-copy view of guest memory in one mmapped window; holding it (with
        `with` or `async with`) delays an unmap of that window until it is let go."""
        window = self._window_over(address, length, write)
        if window is None or window.view is None or not length:
            self.translate(address, length, write=write)  # EFAULT, EPERM or EBUSY if it says so
            reason = "is not in one mapped window"
            if window is not None and window.file is not None:
                reason = (
                    "lies in a window whose file is not sealed against shrinking, so it is "
                    "reached with pread/pwrite, not mapped: use dma.read()/dma.write()"
                )
            raise VfioUserError(errno.EFAULT, f"{address:#x}+{length:#x} {reason}")
        return DmaView(self, window, address, length, write)

    # Dirty-page logging

    def _mark_dirty(self, address: int, length: int) -> None:
        if self.log is not None:
            self.log.mark(address, length)

    def logging_start(self, page_size: int, ranges: list[tuple[int, int]]) -> None:
        if page_size < PAGE_SIZE or page_size & (page_size - 1):
            raise VfioUserError(
                errno.EINVAL,
                f"logging page size {page_size} is not a power of two of at least 4 KiB",
            )
        for start, size in ranges:
            if not size or start + size > _ADDRESS_LIMIT:
                raise VfioUserError(errno.EINVAL, f"logging range {start:#x}+{size:#x} is invalid")
        if self.log is not None:
            if self.log.page_size != page_size:
                raise VfioUserError(
                    errno.EINVAL, "DMA logging already runs with another page size"
                )
            return
        self.log = DirtyLog(page_size, sorted(ranges))

    def logging_stop(self) -> None:
        self.log = None

    def report_size(self, iova: int, length: int, page_size: int) -> int:
        """Bytes of the bitmap a report of this range needs; EINVAL for a bad request."""
        if self.log is None:
            raise VfioUserError(errno.EINVAL, "DMA logging has not been started")
        if not length or iova + length > _ADDRESS_LIMIT:
            raise VfioUserError(errno.EINVAL, f"report range {iova:#x}+{length:#x} is invalid")
        if page_size < PAGE_SIZE or page_size & (page_size - 1):
            raise VfioUserError(errno.EINVAL, f"report page size {page_size} is invalid")
        pages = -(-length // page_size)
        return -(-pages // 64) * 8

    def logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        """The dirty bitmap of a range (which may span windows and holes); clears it."""
        self.report_size(iova, length, page_size)
        assert self.log is not None
        return self.log.report(iova, length, page_size)


class DmaView:
    """A held zero-copy view; use with `with` or `async with`. The memoryview is
    released when the block ends, so it can't outlive the window it points into."""

    __slots__ = ("_address", "_length", "_space", "_views", "_window", "_write")

    def __init__(
        self, space: DmaSpace, window: DmaWindow, address: int, length: int, write: bool
    ) -> None:
        self._space = space
        self._window = window
        self._address = address
        self._length = length
        self._write = write
        self._views: tuple[memoryview, ...] = ()

    def __enter__(self) -> memoryview:
        window = self._window
        assert window.view is not None
        window.hold()
        start = self._address - window.address
        view = window.view[start : start + self._length]
        if self._write:
            self._views = (view,)
            return view
        readonly = view.toreadonly()
        self._views = (view, readonly)
        return readonly

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for view in reversed(self._views):
            view.release()
        self._views = ()
        if self._write:
            self._space._mark_dirty(self._address, self._length)
        self._window.release()

    async def __aenter__(self) -> memoryview:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
