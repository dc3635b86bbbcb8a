"""The one exception type that crosses from device code to the wire."""

from __future__ import annotations

import errno as errno_codes
import os


class VfioUserError(Exception):
    """A failure that the peer should see as this errno in an error reply.

    Device code raises it to refuse an access (`VfioUserError(errno.EINVAL)`);
    muser raises it for invalid requests; the client raises it when the server
    answered with an error reply.
    """

    def __init__(self, errno: int, message: str | None = None) -> None:
        self.errno = errno
        super().__init__(message or os.strerror(errno))

    def __repr__(self) -> str:
        name = errno_codes.errorcode.get(self.errno, str(self.errno))
        return f"{type(self).__name__}({name}, {str(self)!r})"


class ProtocolError(VfioUserError):
    """The peer sent something the protocol does not allow (always EINVAL).

    The wire layer raises nothing else for bad input, so "parse it or raise
    ProtocolError" is the invariant its fuzz tests check.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno_codes.EINVAL, message)


class ConnectionClosedError(ConnectionError):
    """The peer is gone, or the connection was closed while waiting for it."""
