"""Serve a device on a UNIX socket path, one client at a time.

The socket file is created with mode 0600 before `listen`, so nobody can connect
while it is briefly more open. A stale socket file left by a dead server is
replaced; a live server's is not. While a client is attached, further clients
wait in the listen backlog and are accepted once it leaves (as libvfio-user does),
so a quick reconnect after a disconnect never races the old session's teardown.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import struct
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

import structlog

from muser.connection import ServerConnection
from muser.device import PciDevice
from muser.device.dma import DmaLayout
from muser.wire.constants import DEFAULT_MAX_DATA_XFER_SIZE

LISTEN_BACKLOG = 8
DEFAULT_HANDLER_TIMEOUT = 4.5
"""Below QEMU's 5 s reply timeout, so QEMU hears ETIMEDOUT rather than nothing."""


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        probe.close()
    return True


def bind_unix_socket(path: str, mode: int = 0o600) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at `path` with permissions `mode` set before anyone can
    connect, and the (device, inode) of its file."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(
                    errno.EEXIST, "not a socket; refusing to replace it", path
                ) from None
            if _socket_is_live(path):
                raise OSError(
                    errno.EADDRINUSE, "another live server owns this socket", path
                ) from None
            os.unlink(path)
            sock.bind(path)
        os.chmod(path, mode)
        info = os.stat(path)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, (info.st_dev, info.st_ino)


class Server:
    """Serves one device at one socket path; several can share one loop.

    Used like `asyncio.Server`: `async with Server(device, path):`, or
    `start_serving` / `serve_forever` / `close` / `wait_closed`.
    """

    def __init__(
        self,
        device: PciDevice,
        path: str | os.PathLike[str],
        *,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
        dma_layout: DmaLayout = DmaLayout.SPEC,
        handler_timeout: float | None = DEFAULT_HANDLER_TIMEOUT,
        mode: int = 0o600,
        allowed_uids: Iterable[int] | None = None,
        allowed_gids: Iterable[int] | None = None,
    ) -> None:
        self.device = device
        self.path = os.fspath(path)
        self.max_data_xfer_size = max_data_xfer_size
        self.dma_layout = dma_layout
        """How DMA_READ/DMA_WRITE are laid out; DmaLayout.QEMU for QEMU's client."""
        self.handler_timeout = handler_timeout
        """Seconds an awaiting handler may take before the client gets ETIMEDOUT
        (under QEMU's own 5 s); None waits forever."""
        self.mode = mode
        """Permissions of the socket file; only its owner may connect by default."""
        self.allowed_uids = None if allowed_uids is None else frozenset(allowed_uids)
        self.allowed_gids = None if allowed_gids is None else frozenset(allowed_gids)
        """When set, peers whose uid (or gid) is not listed are refused (SO_PEERCRED)."""
        self.connection: ServerConnection | None = None
        """The attached client's session, if one is attached."""
        self.log: Any = structlog.get_logger("muser").bind(socket=self.path, device=device.name)
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None
        self._accepting = False
        self._sessions: set[asyncio.Task[None]] = set()
        self._closed: asyncio.Event | None = None

    def is_serving(self) -> bool:
        return self._listener is not None

    async def start_serving(self) -> None:
        if self._listener is not None:
            return
        self._closed = asyncio.Event()
        self._listener, self._identity = bind_unix_socket(self.path, self.mode)
        self.device.doorbells.watch()
        self._resume_accepting()
        self.log.info("serving")

    async def serve_forever(self) -> None:
        """Serve until `close` is called (or the task is cancelled, which closes)."""
        await self.start_serving()
        assert self._closed is not None
        try:
            await self._closed.wait()
        finally:
            self.close()
            await self.wait_closed()

    def _resume_accepting(self) -> None:
        if self._listener is not None and not self._accepting:
            asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept)
            self._accepting = True

    def _pause_accepting(self) -> None:
        if self._listener is not None and self._accepting:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._accepting = False

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.log.warning("accept failed", error=str(exc))
            return
        if not self._peer_allowed(sock):
            sock.close()
            return
        try:
            connection = ServerConnection(
                sock,
                self.device,
                max_data_xfer_size=self.max_data_xfer_size,
                dma_layout=self.dma_layout,
                logger=self.log,
                handler_timeout=self.handler_timeout,
            )
        except Exception as exc:
            sock.close()
            self.log.exception("could not set up a client connection", exc_info=exc)
            return
        self._pause_accepting()
        connection.log = self.log.bind(client_pid=connection.transport.peer_pid())
        connection.log.info("client connected")
        self.connection = connection
        session = asyncio.get_running_loop().create_task(self._session(connection))
        self._sessions.add(session)
        session.add_done_callback(self._sessions.discard)

    def _peer_allowed(self, sock: socket.socket) -> bool:
        if self.allowed_uids is None and self.allowed_gids is None:
            return True
        try:
            credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        except OSError:
            return False
        pid, uid, gid = struct.unpack("3i", credentials)
        allowed = (self.allowed_uids is None or uid in self.allowed_uids) and (
            self.allowed_gids is None or gid in self.allowed_gids
        )
        if not allowed:
            self.log.warning(
                "refused a client not on the allow-list", client_pid=pid, uid=uid, gid=gid
            )
        return allowed

    async def _session(self, connection: ServerConnection) -> None:
        await connection.finished
        connection.log.info("client disconnected")
        self.connection = None
        self._resume_accepting()

    def close(self) -> None:
        """Stop listening, remove the socket file, and drop the attached client."""
        if self._listener is None:
            return
        self._pause_accepting()
        self._listener.close()
        self._listener = None
        self._unlink_own_socket()
        self.device.doorbells.unwatch()
        if self.connection is not None:
            self.connection.close()
        if self._closed is not None:
            self._closed.set()
        self.log.info("closed")

    def _unlink_own_socket(self) -> None:
        """Remove the socket file unless someone has replaced it with their own."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == self._identity:
            os.unlink(self.path)

    async def wait_closed(self) -> None:
        """Wait until the last client's session has ended and the device was told."""
        while self._sessions:
            await asyncio.gather(*self._sessions, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start_serving()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()
