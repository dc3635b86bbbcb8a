"""DMA windows: one mapped window of guest memory, how its file is reached, and the
descriptors windows keep.

Nothing a client does may crash the server, and a mapping of a file that the
client then shrinks kills the process with SIGBUS when touched. So of regular
files (memfds among them) only one sealed against shrinking (QEMU's
memory-backend-memfd, or a memfd muser can seal) is mmapped, for zero-copy
`memoryview`s; any other is reached with pread/pwrite (a short transfer is
EFAULT), through one descriptor per file however many windows lie in it; one
that pread/pwrite cannot reach as the window needs (hugetlbfs cannot be
written) by messages, as if it had come without an fd. Other files (a memory
device such as /dev/dax, which cannot shrink) are mmapped, or refused with the
errno mmap gives. The descriptors windows keep count against a budget per
client (EMFILE beyond it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import mmap
import os
import stat
import sys
from collections.abc import Callable
from typing import Any

import structlog

from muser.errors import VfioUserError
from muser.wire import close_fds
from muser.wire.constants import DmaMapFlag

_log = structlog.get_logger("muser")

_READ, _WRITE = int(DmaMapFlag.READ), int(DmaMapFlag.WRITE)
_FILE_IO = int(DmaMapFlag.FILE_IO)
_MMAP_UNTRACKED = sys.version_info >= (3, 13)
"""From Python 3.13 an mmap can be told not to keep a duplicate of its fd."""
_MMAP_OPTIONS: dict[str, Any] = {"trackfd": False} if _MMAP_UNTRACKED else {}


class HeldFile:
    """A descriptor that windows reach with pread/pwrite, held once per file and
    access mode however many windows lie in that file."""

    def __init__(self, fd: int, key: tuple[int, int, int], forget: Callable[[HeldFile], None]):
        self.fd = fd
        self.key = key
        """(device, inode, access mode) of the file."""
        self.users = 0
        self._forget = forget

    def release(self) -> None:
        self.users -= 1
        if not self.users:
            close_fds([self.fd])
            self._forget(self)


class DmaWindow:
    """One mapped window of guest memory, reached one of three ways: through a
    mapping (`view`), with pread/pwrite on a held file (`file`), or, with neither,
    by DMA_READ/DMA_WRITE messages."""

    def __init__(
        self,
        address: int,
        size: int,
        flags: int,
        *,
        offset: int,
        identity: tuple[int, int] | None,
        mapping: mmap.mmap | None = None,
        lead: int = 0,
        file: HeldFile | None = None,
    ) -> None:
        """`mapping` holds the window's bytes from `lead` on; `file` is held for it
        (the window takes one use of it)."""
        self.address = address
        self.size = size
        self.flags = flags
        self.offset = offset
        self.identity = identity
        """(device, inode) of the file behind the window, to recognise a re-map."""
        self.readable = bool(flags & _READ)
        self.writable = bool(flags & _WRITE)
        self._mapping = mapping
        self.view = None if mapping is None else memoryview(mapping)[lead : lead + size]
        """The window's bytes when it is mapped; None when it is reached otherwise."""
        self.file = file
        if file is not None:
            file.users += 1
        self.users = 0
        self._released: asyncio.Event | None = None

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def direct(self) -> bool:
        """Whether device code reaches this window without messages."""
        return self.view is not None or self.file is not None

    @property
    def holds_fd(self) -> bool:
        """Whether the window keeps a descriptor of its own open: CPython's mmap
        keeps a duplicate of the one it maps, unless told not to (3.13 on)."""
        return self._mapping is not None and not _MMAP_UNTRACKED

    def hold(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if not self.users and self._released is not None:
            self._released.set()

    async def quiesce(self) -> None:
        """Wait until no device code holds a view into the window."""
        while self.users:
            self._released = asyncio.Event()
            await self._released.wait()

    def close(self) -> bool:
        """Unmap the window. Returns False if device code still holds a view it should
        have let go of: the memory then stays mapped (leaked) rather than risk a crash."""
        if self.view is not None:
            self.view.release()
            self.view = None
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:
                return False
            self._mapping = None
        if self.file is not None:
            self.file.release()
            self.file = None
        return True

    def read_direct(self, start: int, length: int) -> bytes:
        if self.view is not None:
            return bytes(self.view[start : start + length])
        assert self.file is not None
        try:
            data = os.pread(self.file.fd, length, self.offset + start)
        except OSError as exc:
            raise VfioUserError(errno.EFAULT, f"reading the window's file: {exc}") from None
        if len(data) != length:
            raise VfioUserError(errno.EFAULT, "the window's file ended early")
        return data

    def write_direct(self, start: int, data: bytes | bytearray | memoryview) -> None:
        if self.view is not None:
            self.view[start : start + len(data)] = data
            return
        assert self.file is not None
        try:
            written = os.pwrite(self.file.fd, data, self.offset + start)
        except OSError as exc:
            raise VfioUserError(errno.EFAULT, f"writing the window's file: {exc}") from None
        if written != len(data):
            raise VfioUserError(errno.EFAULT, "the window's file took a short write")


class GuestFiles:
    """How windows reach the files the client mapped them from, and the descriptors
    they keep doing it, within the client's budget."""

    def __init__(self) -> None:
        self.budget: int | None = None
        """At most this many descriptors may the windows keep open (set per client
        from the process's limit); None for no limit."""
        self._held: dict[tuple[int, int, int], HeldFile] = {}
        """The files windows reach with pread/pwrite, by (device, inode, access mode)."""
        self.mapped = 0
        """Descriptors that mapped windows keep (see DmaWindow.holds_fd)."""

    @property
    def held(self) -> int:
        """Descriptors the windows keep open."""
        return self.mapped + len(self._held)

    def window(
        self,
        address: int,
        size: int,
        flags: int,
        *,
        offset: int,
        fd: int,
        identity: tuple[int, int],
    ) -> DmaWindow:
        """A window over `fd`'s file, reached as the file allows (see the module). The
        caller closes `fd` afterwards: what the window keeps is a duplicate."""
        regular = _check_file_size(fd, offset, size)
        readable, writable = bool(flags & _READ), bool(flags & _WRITE)
        if not flags & _FILE_IO and (not regular or _cannot_shrink(fd)):
            if not _MMAP_UNTRACKED:
                self._spend()
            mapping, lead = _map(fd, offset, size, readable, writable)
            return DmaWindow(
                address, size, flags, offset=offset, identity=identity, mapping=mapping, lead=lead
            )
        if _file_io_works(fd, offset, readable, writable):
            return DmaWindow(
                address, size, flags, offset=offset, identity=identity, file=self._hold(fd)
            )
        if flags & _FILE_IO:
            raise VfioUserError(errno.EINVAL, "FILE_IO asked for a file pread/pwrite cannot reach")
        _log.info(
            "a DMA window's file can be neither mapped safely nor read and written; "
            "reaching it by DMA messages",
            address=hex(address),
            size=size,
        )
        return DmaWindow(address, size, flags, offset=offset, identity=identity)

    def _spend(self) -> None:
        """Refuse a window that would keep one descriptor more than the client's budget."""
        if self.budget is not None and self.held >= self.budget:
            raise VfioUserError(
                errno.EMFILE,
                f"the client's DMA windows already keep {self.held} descriptors open, "
                "its share of this process's limit",
            )

    def _hold(self, fd: int) -> HeldFile:
        """The held descriptor for `fd`'s file and access mode, holding a duplicate
        of `fd` if none is held yet."""
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino, fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE)
        held = self._held.get(key)
        if held is None:
            self._spend()
            try:
                duplicate = os.dup(fd)
            except OSError as exc:
                raise VfioUserError(exc.errno or errno.EMFILE, str(exc)) from None
            held = self._held[key] = HeldFile(duplicate, key, self._forget)
        return held

    def _forget(self, held: HeldFile) -> None:
        if self._held.get(held.key) is held:
            del self._held[held.key]


def file_identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _check_file_size(fd: int, offset: int, size: int) -> bool:
    """Refuse a window that reaches past the end of its file; whether the file is a
    regular one (a memfd among them), which alone can be shrunk."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return False
    if info.st_size < offset + size:
        raise VfioUserError(errno.EINVAL, f"the window ends past its file ({info.st_size} bytes)")
    return True


def _cannot_shrink(fd: int) -> bool:
    """Whether the file behind `fd` is sealed against shrinking, sealing it first if
    it lets us (a memfd made with MFD_ALLOW_SEALING). QEMU seals the memfds of its
    memory-backend-memfd so by default."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:
        return False


def _file_io_works(fd: int, offset: int, readable: bool, writable: bool) -> bool:
    """Whether pread/pwrite reach the file as the window needs: a transfer of no
    bytes is refused just as a real one would be (a pipe, a socket, a file opened
    read-only for a writable window, hugetlbfs, which cannot be written)."""
    try:
        if readable:
            os.pread(fd, 0, offset)
        if writable:
            os.pwrite(fd, b"", offset)
    except (OSError, OverflowError):
        return False
    return True


def _map(fd: int, offset: int, size: int, readable: bool, writable: bool) -> tuple[mmap.mmap, int]:
    """A shared mapping of the window's pages, and where the window starts in it."""
    aligned = offset - offset % mmap.PAGESIZE
    lead = offset - aligned
    length = -(-(lead + size) // mmap.PAGESIZE) * mmap.PAGESIZE
    prot = (mmap.PROT_READ if readable else 0) | (mmap.PROT_WRITE if writable else 0)
    try:
        mapping = mmap.mmap(
            fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=aligned, **_MMAP_OPTIONS
        )
    except OSError as exc:
        raise VfioUserError(exc.errno or errno.EINVAL, f"cannot mmap the window: {exc}") from None
    except (ValueError, OverflowError) as exc:
        raise VfioUserError(errno.EINVAL, f"cannot mmap the window: {exc}") from None
    return mapping, lead
