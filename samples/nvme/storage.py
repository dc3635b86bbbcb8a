"""The namespaces' blocks: a file (sparse, made if absent) or a memfd, namespace n at
byte (n - 1) * namespace size. File I/O is first tried in place with RWF_NOWAIT,
which the kernel serves only from the page cache and refuses (EAGAIN) rather than
wait for the disk; what it refuses runs in a worker thread, so a slow disk never
stalls the loop. A memfd is memory, read and written in place."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .spec import LBA_SHIFT

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x1, 0x2
_ZEROES = bytes(1 << 20)
_T = TypeVar("_T")

Buffers = Sequence[memoryview]


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return fallocate


_fallocate = _libc_fallocate()


_Call = tuple[
    asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[object, ...]
]
_Done = tuple["asyncio.Future[Any]", Any, BaseException | None]


class IoThreads:
    """A few worker threads for blocking file calls. Each takes every call already
    waiting when it is free and wakes the loop once for all it finished, not once
    per call: at queue depth 32 a loop wake-up per command (`run_in_executor`) cost
    three times the writes themselves."""

    def __init__(self, count: int = 2) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._count = count
        self._threads: list[threading.Thread] = []

    async def run(self, function: Callable[..., _T], *args: object) -> _T:
        """`function(*args)` in a worker thread. If the caller is cancelled, wait for
        the call all the same before passing the cancellation on: it may be writing
        into guest memory that must stay mapped until it is done."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._work, name="muser-nvme-io", daemon=True)
                for _ in range(self._count)
            ]
            for thread in self._threads:
                thread.start()
        self._calls.put((loop, future, function, args))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([future])
            raise

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            loop, done = call[0], [_call(call)]
            with contextlib.suppress(queue.Empty):
                while (call := self._calls.get_nowait()) is not None:
                    done.append(_call(call))  # callers of one Storage share one loop
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_deliver, done)
            if call is None:
                return

    def close(self) -> None:
        for _ in self._threads:
            self._calls.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []


def _call(call: _Call) -> _Done:
    _loop, future, function, args = call
    try:
        return future, function(*args), None
    except BaseException as exc:  # handed to the caller's future
        return future, None, exc


def _deliver(done: list[_Done]) -> None:
    for future, result, exc in done:
        if future.cancelled():
            continue
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)


class Storage:
    """Blocks of `namespaces` namespaces of `namespace_size` bytes each."""

    def __init__(self, path: str | None, namespace_size: int, namespaces: int) -> None:
        if namespace_size <= 0 or namespace_size % (1 << LBA_SHIFT):
            raise ValueError("a namespace is a whole number of 512-byte blocks")
        if not 1 <= namespaces <= 1024:
            raise ValueError("1 to 1024 namespaces")
        self.namespace_size = namespace_size
        self.namespaces = namespaces
        self.path = path
        if path is None:
            self.fd = os.memfd_create("muser-nvme", os.MFD_CLOEXEC)
        else:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.threaded = path is not None
        """Whether I/O goes through worker threads (a file) or runs in place (memory)."""
        self._threads = IoThreads()
        self._nowait = dict.fromkeys((False, True), hasattr(os, "RWF_NOWAIT"))
        """Whether reads and writes take RWF_NOWAIT (keyed by write): not every file
        system takes it, and some take it for reads only."""
        total = namespace_size * namespaces
        if os.fstat(self.fd).st_size < total:
            os.ftruncate(self.fd, total)

    @property
    def blocks(self) -> int:
        """Blocks per namespace."""
        return self.namespace_size >> LBA_SHIFT

    def _offset(self, nsid: int, lba: int) -> int:
        return (nsid - 1) * self.namespace_size + (lba << LBA_SHIFT)

    async def _run(self, function: Callable[..., _T], *args: object) -> _T:
        if self.threaded:
            return await self._threads.run(function, *args)
        return function(*args)

    async def _move(self, write: bool, buffers: Buffers, offset: int) -> None:
        """Move the bytes in place where the page cache allows, the rest in a thread."""
        if self.threaded and self._nowait[write]:
            move = os.pwritev if write else os.preadv
            try:
                done = move(self.fd, buffers, offset, os.RWF_NOWAIT)
            except BlockingIOError:
                done = 0
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait[write], done = False, 0
            if done == sum(len(buffer) for buffer in buffers):
                return
            buffers, offset = _after(buffers, done), offset + done
        await self._run(_write_all if write else _read_all, self.fd, buffers, offset)

    async def read(self, nsid: int, lba: int, buffers: Buffers) -> None:
        await self._move(False, buffers, self._offset(nsid, lba))

    async def write(self, nsid: int, lba: int, buffers: Buffers) -> None:
        await self._move(True, buffers, self._offset(nsid, lba))

    async def flush(self) -> None:
        if self.threaded:
            await self._threads.run(os.fsync, self.fd)

    async def deallocate(self, nsid: int, lba: int, blocks: int) -> None:
        """The blocks read as zeros from now on, and hold no space where the file
        system can punch a hole."""
        await self._run(_punch, self.fd, self._offset(nsid, lba), blocks << LBA_SHIFT)

    def close(self) -> None:
        """Stop the I/O threads and close the file (once)."""
        self._threads.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_all(fd: int, buffers: Buffers, offset: int) -> None:
    total = sum(len(buffer) for buffer in buffers)
    done = os.preadv(fd, buffers, offset)
    while done < total:  # short only at the end of a file the host shrank: zeros
        rest = _after(buffers, done)
        got = os.preadv(fd, rest, offset + done)
        if not got:
            for buffer in rest:
                buffer[:] = bytes(len(buffer))
            return
        done += got


def _write_all(fd: int, buffers: Buffers, offset: int) -> None:
    total = sum(len(buffer) for buffer in buffers)
    done = os.pwritev(fd, buffers, offset)
    while done < total:
        done += os.pwritev(fd, _after(buffers, done), offset + done)


def _after(buffers: Buffers, skip: int) -> list[memoryview]:
    """The buffers with their first `skip` bytes cut off."""
    rest = []
    for buffer in buffers:
        if skip >= len(buffer):
            skip -= len(buffer)
        else:
            rest.append(buffer[skip:])
            skip = 0
    return rest


def _punch(fd: int, offset: int, length: int) -> None:
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _fallocate is not None and _fallocate(fd, mode, offset, length) == 0:
        return
    if _fallocate is not None and ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE) failed")
    while length:  # a file system without holes: write the zeros
        step = min(length, len(_ZEROES))
        os.pwrite(fd, _ZEROES[:step], offset)
        offset, length = offset + step, length - step
