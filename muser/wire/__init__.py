"""The sans-IO vfio-user wire layer: constants, layouts, framing, capabilities.

Nothing here touches a socket or an event loop, so it can be tested, fuzzed and
benchmarked on its own, and the client reuses it from the other side. Layouts live
in `muser.wire.messages`, numbers in `muser.wire.constants`.
"""

from muser.wire.capabilities import Capabilities, build_capabilities, parse_capabilities
from muser.wire.framer import (
    Frame,
    Framer,
    FramingError,
    close_fds,
    encode_header,
    gather_piece,
)
from muser.wire.layout import Layout

__all__ = [
    "Capabilities",
    "Frame",
    "Framer",
    "FramingError",
    "Layout",
    "build_capabilities",
    "close_fds",
    "encode_header",
    "gather_piece",
    "parse_capabilities",
]
