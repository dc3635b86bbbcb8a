"""The memory behind BARs a client may mmap, and the eventfds behind doorbells."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import mmap
import os
import stat
import weakref
from collections.abc import AsyncIterator, Callable

import structlog

from muser.device.regions import Bar, Doorbell
from muser.wire import close_fds

_log = structlog.get_logger("muser")


def _seal(fd: int, seals: int) -> bool:
    """Add `seals` to the file if it lets us; whether it cannot shrink now."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:
        return False


class SharedBar:
    """A BAR's bytes in a file both sides map: a memfd muser made, or the author's.

    The client gets the file itself and could shrink it, and touching our mapping
    past its end would kill the server with SIGBUS; so the file's size is sealed,
    and an author's file that cannot be sealed is refused."""

    def __init__(self, bar: Bar, name: str) -> None:
        spec = bar.shared
        assert spec is not None
        self.size = bar.size
        self.areas = bar.mmap_areas
        self.owns_fd = spec.fd is None
        if spec.fd is None:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            self._release_fd = weakref.finalize(self, close_fds, [self.fd])
            os.ftruncate(self.fd, bar.size)
            _seal(self.fd, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        else:
            self.fd = spec.fd
            info = os.fstat(self.fd)
            if stat.S_ISREG(info.st_mode) and info.st_size < spec.offset + bar.size:
                raise ValueError("the shared memory file is smaller than the BAR")
            if not _seal(self.fd, fcntl.F_SEAL_SHRINK):
                raise ValueError(
                    "the shared memory file must be sealed against shrinking (a memfd made "
                    "with MFD_ALLOW_SEALING, which muser seals, or one sealed with "
                    "F_SEAL_SHRINK): the client gets the file, and one it could shrink "
                    "would crash the server when it touches the memory"
                )
        self.offset = spec.offset
        self._mapping = mmap.mmap(
            self.fd,
            bar.size,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=spec.offset,
        )
        self.memory = memoryview(self._mapping)
        """The BAR's bytes, indexed by BAR offset."""

    def close(self) -> None:
        """Unmap, and close the memfd if muser made it (the author's fd stays theirs)."""
        self.memory.release()
        self._mapping.close()
        if self.owns_fd:
            self._release_fd()

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.memory[offset : offset + count])

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.memory[offset : offset + len(data)] = data

    async def changes(self, offset: int, size: int, interval: float) -> AsyncIterator[bytes]:
        """Poll [offset, offset + size) every `interval` seconds; yield it when it changed."""
        last = self.read(offset, size)
        while True:
            await asyncio.sleep(interval)
            current = self.read(offset, size)
            if current != last:
                last = current
                yield current


class DoorbellFds:
    """One eventfd per declared doorbell; the loop watches them while served."""

    def __init__(self, bars: dict[int, Bar]) -> None:
        self.by_region: dict[int, list[tuple[Doorbell, int]]] = {}
        for index, bar in bars.items():
            for doorbell in bar.doorbells:
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self.by_region.setdefault(index, []).append((doorbell, fd))
        fds = [fd for entries in self.by_region.values() for _doorbell, fd in entries]
        self._release_fds = weakref.finalize(self, close_fds, fds)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def watch(self) -> None:
        """Start calling handlers when the eventfds fire (on the running loop)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        for entries in self.by_region.values():
            for doorbell, fd in entries:
                self._loop.add_reader(fd, self._rang, doorbell, fd)

    def unwatch(self) -> None:
        if self._loop is None:
            return
        for entries in self.by_region.values():
            for _doorbell, fd in entries:
                self._loop.remove_reader(fd)
        self._loop = None

    def _rang(self, doorbell: Doorbell, fd: int) -> None:
        try:
            count = os.eventfd_read(fd)
        except BlockingIOError:
            return
        ring(doorbell, doorbell.datamatch, count, self._tasks)

    def close(self) -> None:
        self.unwatch()
        self._release_fds()
        self.by_region = {}


def ring(
    doorbell: Doorbell, value: int | None, count: int, tasks: set[asyncio.Task[None]]
) -> None:
    """Call a doorbell's handler for its eventfd; an async one runs as a task, its
    failure logged (nobody waits for an eventfd's outcome)."""
    try:
        result = doorbell.handler(value, count)
    except Exception as exc:
        _log.exception("doorbell handler failed", offset=doorbell.offset, exc_info=exc)
        return
    if inspect.isawaitable(result):
        task = asyncio.ensure_future(result)
        tasks.add(task)
        task.add_done_callback(_finished(tasks))


def _finished(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("doorbell handler failed", exc_info=task.exception())

    return done
