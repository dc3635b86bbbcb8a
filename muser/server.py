"""Serve a device on a UNIX socket, one client at a time.

Given a path, the socket file appears only once it listens, with mode 0600
already set: a client that waits for the file can connect at once, and nobody can
connect while it is more open. A stale socket file left by a dead
server is replaced; a live server's is not. While a client is attached, further
clients wait in the listen backlog and are accepted once it leaves (as
libvfio-user does), so a quick reconnect after a disconnect never races the old
session's teardown. An embedder may instead hand over a socket it made: a
listening one (its file stays the embedder's), or one already connected to a
client, which is served until that client leaves.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import secrets
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
from muser.recording import WireTrace
from muser.session import MAX_MSG_FDS, SessionSettings
from muser.transport import FdTransport
from muser.wire.constants import DEFAULT_MAX_DATA_XFER_SIZE

LISTEN_BACKLOG = 8
_MAX_SOCKET_PATH = 107
"""Bytes of a UNIX socket path (sun_path holds 108, with its NUL)."""
DEFAULT_HANDLER_TIMEOUT = 4.5
"""Below QEMU's 5 s reply timeout, so QEMU hears ETIMEDOUT rather than nothing."""
DEFAULT_NEGOTIATION_TIMEOUT = 10.0
"""Seconds a client has from being accepted to VERSION: QEMU sends it at once."""
DEFAULT_MESSAGE_TIMEOUT = 10.0
"""Seconds a message has to arrive whole once it has begun to: milliseconds for a
megabyte over a UNIX socket."""
MIN_FD_BUDGET = 16
ACCEPT_BACKOFF = (0.05, 1.0)
"""First and longest pause, in seconds, before accepting again when the process
(or the system) has no descriptor left for a new connection."""


def default_fd_budget() -> int | None:
    """A client's share of this process's descriptors: a quarter of RLIMIT_NOFILE's
    soft limit (at least MIN_FD_BUDGET), read when it connects, so that one client
    cannot take what other devices' clients, and accepting them, need."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(MIN_FD_BUDGET, soft // 4)


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        probe.close()
    return True


def is_listening(sock: socket.socket) -> bool:
    """Whether `sock` accepts connections (SO_ACCEPTCONN) rather than being one."""
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def socket_path(sock: socket.socket) -> str:
    """The path `sock` is bound to; "" for an unnamed socket (one of a socketpair)."""
    name = sock.getsockname()
    return os.fsdecode(name) if name else ""


def bind_unix_socket(path: str, mode: int = 0o600) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at `path`, and the (device, inode) of its file.

    The socket is bound under a staging name beside `path`, given `mode`, made to
    listen, and only then linked to `path`: a client that waits for the file to
    appear (as scripts starting QEMU do) never finds it refusing connections, and
    nobody can connect while it is more open than `mode`. Only a path so near
    the 107-byte limit that no staging name beside it fits is bound in place.
    """
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise OSError(errno.ENAMETOOLONG, "a UNIX socket path holds at most 107 bytes", path)
    staging = _staging_name(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if staging is None:
            _clear_stale(path)
        sock.bind(staging or path)
        try:
            os.chmod(staging or path, mode)
            info = os.stat(staging or path)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            if staging is not None:
                _publish(staging, path)
        finally:
            if staging is not None:
                os.unlink(staging)
    except BaseException:
        sock.close()
        raise
    return sock, (info.st_dev, info.st_ino)


def _staging_name(path: str) -> str | None:
    directory, name = os.path.split(path)
    for staging in (f".{name[:8]}-{secrets.token_hex(4)}", f".{secrets.token_hex(3)}"):
        candidate = os.path.join(directory, staging)
        if len(os.fsencode(candidate)) <= _MAX_SOCKET_PATH:
            return candidate
    return None


def _publish(staging: str, path: str) -> None:
    """Name the listening socket `path` with a hard link, which never replaces a file."""
    try:
        os.link(staging, path)
    except FileExistsError:
        _clear_stale(path)
        os.link(staging, path)


def _clear_stale(path: str) -> None:
    """Remove a socket file a dead server left at `path`; refuse a live server's
    socket, or anything that is not a socket."""
    try:
        file_mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(file_mode):
        raise FileExistsError(errno.EEXIST, "not a socket; refusing to replace it", path)
    if _socket_is_live(path):
        raise OSError(errno.EADDRINUSE, "another live server owns this socket", path)
    os.unlink(path)


def _where(path: str | os.PathLike[str] | None, sock: socket.socket | None) -> str:
    if sock is None:
        if path is None:
            raise TypeError("Server needs a socket path or a socket")
        return os.fspath(path)
    if path is not None:
        raise TypeError("Server takes a socket path or a socket, not both")
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ValueError("Server needs an AF_UNIX SOCK_STREAM socket")
    return socket_path(sock)


class Server:
    """Serves one device on one socket; several can share one loop.

    Used like `asyncio.Server`: `async with Server(device, path):`, or
    `start_serving` / `serve_forever` / `close` / `wait_closed`. Instead of a path,
    `sock=` takes a UNIX stream socket the server then owns: a listening one is
    accepted from (its file is left for its creator to remove), a connected one is
    served until its client leaves, which ends the server.
    """

    def __init__(
        self,
        device: PciDevice,
        path: str | os.PathLike[str] | None = None,
        *,
        sock: socket.socket | None = None,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
        dma_layout: DmaLayout | None = None,
        handler_timeout: float | None = DEFAULT_HANDLER_TIMEOUT,
        negotiation_timeout: float | None = DEFAULT_NEGOTIATION_TIMEOUT,
        message_timeout: float | None = DEFAULT_MESSAGE_TIMEOUT,
        fd_budget: int | None = None,
        mode: int = 0o600,
        allowed_uids: Iterable[int] | None = None,
        allowed_gids: Iterable[int] | None = None,
        trace: str | os.PathLike[str] | None = None,
        fast_path: bool = True,
    ) -> None:
        self.device = device
        self.path = _where(path, sock)
        """Where clients connect; for a given socket, its bound name ("" if unnamed)."""
        self.max_data_xfer_size = max_data_xfer_size
        self.dma_layout = device.dma_layout if dma_layout is None else dma_layout
        """How DMA_READ/DMA_WRITE are laid out: asked of each client (AUTO), or fixed;
        the device's choice (`PciDevice.dma_layout`) unless given."""
        self.handler_timeout = handler_timeout
        """Seconds an awaiting handler may take before the client gets ETIMEDOUT
        (under QEMU's own 5 s); None waits forever."""
        self.negotiation_timeout = negotiation_timeout
        """Seconds from accepting a client to its VERSION; a client that has not
        negotiated by then is closed, so that it cannot hold the device. None waits
        forever. A negotiated client may idle between messages for as long as it
        likes."""
        self.message_timeout = message_timeout
        """Seconds a message has to arrive whole once it has begun to (between one
        and two such periods, precisely); a client that stops halfway is closed.
        None waits forever."""
        self.fd_budget = fd_budget
        """Descriptors a client's DMA windows may keep open (EMFILE beyond); None
        takes a quarter of RLIMIT_NOFILE's soft limit when the client connects."""
        self.mode = mode
        """Permissions of the socket file muser creates; only its owner may connect by
        default. A given socket's file is its creator's to set up."""
        self.allowed_uids = None if allowed_uids is None else frozenset(allowed_uids)
        self.allowed_gids = None if allowed_gids is None else frozenset(allowed_gids)
        """When set, peers whose uid (or gid) is not listed are refused (SO_PEERCRED)."""
        self.trace = None if trace is None else os.fspath(trace)
        self.fast_path = fast_path
        """Serve whole REGION_READ/WRITE messages by the hot path when the session can
        (False: every message the general way, for comparing the two)."""
        """A JSON-lines file every session's messages are appended to (`muser.trace`)."""
        self.connection: ServerConnection | None = None
        """The attached client's session, if one is attached."""
        self.log: Any = structlog.get_logger("muser").bind(socket=self.path, device=device.name)
        self._given = sock
        """The caller's socket, until serving starts (or close, if it never does)."""
        self._binds_path = sock is None
        """Only a server given a path binds one; a given socket is served once."""
        self._serving = False
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None
        """The (device, inode) of the socket file muser created, the only one it removes."""
        self._accepting = False
        self._accept_backoff: asyncio.TimerHandle | None = None
        self._accept_delay = ACCEPT_BACKOFF[0]
        self._sessions: set[asyncio.Task[None]] = set()
        self._closed: asyncio.Event | None = None

    def is_serving(self) -> bool:
        """Serving clients (between start_serving and close)."""
        return self._serving

    async def start_serving(self) -> None:
        """Start serving on the running loop and return at once."""
        if self._serving or (not self._binds_path and self._closed is not None):
            return
        self._closed = asyncio.Event()
        given, self._given = self._given, None
        if given is None:
            self._listener, self._identity = bind_unix_socket(self.path, self.mode)
        elif is_listening(given):
            given.setblocking(False)
            self._listener = given
        self._serving = True
        self.device.doorbells.watch()
        self.log.info("serving")
        if self._listener is not None:
            self._resume_accepting()
        elif given is not None:
            self._attach(given)

    async def serve_forever(self) -> None:
        """Serve until `close` is called, the connected client of a given socket
        leaves, or the task is cancelled (which closes)."""
        await self.start_serving()
        assert self._closed is not None
        try:
            await self._closed.wait()
        finally:
            self.close()
            await self.wait_closed()

    def _resume_accepting(self) -> None:
        self._cancel_backoff()
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
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            self._back_off(exc)
            return
        self._accept_delay = ACCEPT_BACKOFF[0]
        self._attach(sock)

    def _back_off(self, exc: OSError) -> None:
        """Accept failed for want of something (EMFILE, ENFILE, ENOBUFS, ENOMEM): the
        client stays queued while we stop listening for a while, doubling the pause
        up to a second, and say so once, not once per attempt."""
        if self._accept_delay == ACCEPT_BACKOFF[0]:
            self.log.warning(
                "cannot accept a client; retrying", error=errno.errorcode.get(exc.errno or 0)
            )
        self._pause_accepting()
        self._accept_backoff = asyncio.get_running_loop().call_later(
            self._accept_delay, self._retry_accept
        )
        self._accept_delay = min(self._accept_delay * 2, ACCEPT_BACKOFF[1])

    def _retry_accept(self) -> None:
        self._accept_backoff = None
        if self.connection is None:
            self._resume_accepting()

    def _cancel_backoff(self) -> None:
        if self._accept_backoff is not None:
            self._accept_backoff.cancel()
            self._accept_backoff = None

    def _attach(self, sock: socket.socket) -> None:
        """Start a session with the client on `sock`, if it is allowed; without a
        listener, a client that cannot be served leaves nothing to serve."""
        connection = self._connect(sock) if self._peer_allowed(sock) else None
        if connection is None:
            sock.close()
            if self._listener is None:
                self.close()
            return
        self._pause_accepting()
        connection.logger.info("client connected")
        self.connection = connection
        session = asyncio.get_running_loop().create_task(self._session(connection))
        self._sessions.add(session)
        session.add_done_callback(self._sessions.discard)

    def _connect(self, sock: socket.socket) -> ServerConnection | None:
        recorder: WireTrace | None = None
        try:
            recorder = None if self.trace is None else WireTrace(self.trace)
            transport = FdTransport(sock, max_receive_fds=MAX_MSG_FDS, read_while_backlogged=False)
            settings = SessionSettings(
                max_data_xfer_size=self.max_data_xfer_size,
                negotiation_timeout=self.negotiation_timeout,
                message_timeout=self.message_timeout,
                fast_path=self.fast_path,
            )
            return ServerConnection(
                transport,
                self.device,
                settings=settings,
                dma_layout=self.dma_layout,
                handler_timeout=self.handler_timeout,
                fd_budget=self.fd_budget if self.fd_budget is not None else default_fd_budget(),
                logger=self.log.bind(client_pid=transport.peer_pid()),
                recorder=recorder,
            )
        except Exception as exc:
            if recorder is not None:
                recorder.close()
            self.log.exception("could not set up a client connection", exc_info=exc)
            return None

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
        await connection.finished.wait()
        connection.logger.info("client disconnected")
        self.connection = None
        if self._listener is None:
            self.close()
        else:
            self._resume_accepting()

    def close(self) -> None:
        """Stop listening and remove the socket file muser created; the attached
        client's request in progress is answered before it is dropped."""
        if self._given is not None:
            self._given.close()
            self._given = None
        if not self._serving:
            return
        self._serving = False
        self._pause_accepting()
        self._cancel_backoff()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._unlink_own_socket()
        self.device.doorbells.unwatch()
        if self.connection is not None:
            self.connection.shut_down()
        if self._closed is not None:
            self._closed.set()
        self.log.info("closed")

    def _unlink_own_socket(self) -> None:
        """Remove the socket file unless someone has replaced it with their own."""
        identity, self._identity = self._identity, None
        if identity is None:
            return
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == identity:
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
