"""VERSION: the protocol version and the capabilities of both ends."""

from __future__ import annotations

from muser.errors import ProtocolError
from muser.session.context import Context
from muser.session.outcome import Outcome
from muser.wire import Frame, build_capabilities, parse_capabilities
from muser.wire.constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_DMA_MAPS,
    DEFAULT_PGSIZES,
    HEADER_SIZE,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
)
from muser.wire.messages import Version

MAX_MSG_FDS = 8
"""How many fds a server accepts per message: libvfio-user's server takes as many,
and QEMU assumes as many of a server that names none. Clients size things by it
(QEMU its SET_IRQS batches, libvfio-user's sample client its DMA windows, which it
expects a migration destination to agree on), so a muser device and its
libvfio-user twin should say the same."""
_SPEC_DEFAULTS = {
    "max_data_xfer_size": DEFAULT_MAX_DATA_XFER_SIZE,
    "pgsizes": DEFAULT_PGSIZES,
    "max_dma_maps": DEFAULT_MAX_DMA_MAPS,
}


def version(context: Context, request: Version, frame: Frame) -> Outcome:
    """Negotiate, or refuse (the session then ends: a failed negotiation cannot go on)."""
    if context.peer is not None:
        raise ProtocolError("VERSION was already negotiated")
    if frame.fds:
        raise ProtocolError("VERSION carries no file descriptors")
    if request.major != PROTOCOL_MAJOR:
        raise ProtocolError(f"protocol major version {request.major} is not supported")
    peer = context.peer = parse_capabilities(request.capabilities)
    context.peer_version = f"{request.major}.{request.minor}"
    context.log(
        "info",
        "negotiated",
        client_version=context.peer_version,
        client_max_msg_fds=peer.max_msg_fds,
        client_max_data_xfer_size=peer.max_data_xfer_size,
    )
    capabilities = _reply_capabilities(context, request, HEADER_SIZE + len(frame.payload))
    return Version(PROTOCOL_MAJOR, min(request.minor, PROTOCOL_MINOR), capabilities)


def _reply_capabilities(context: Context, request: Version, request_size: int) -> bytes:
    """Our limits, for the capabilities the client named, in a reply no larger than
    its request (QEMU sizes its receive buffer by its request)."""
    peer = context.peer
    if not request.capabilities or peer is None:
        return b""
    ours = {
        "max_msg_fds": MAX_MSG_FDS,
        "max_data_xfer_size": context.max_data_xfer_size,
        "pgsizes": DEFAULT_PGSIZES,
        "max_dma_maps": context.device.dma.max_windows,
    }
    chosen: dict[str, object] = {
        name: value for name, value in ours.items() if name in peer.offered
    }
    if peer.write_multiple:
        chosen["write_multiple"] = True
    encoded = build_capabilities(chosen)
    for name, default in _SPEC_DEFAULTS.items():
        if HEADER_SIZE + 4 + len(encoded) <= request_size:
            break
        if chosen.get(name) == default:
            del chosen[name]
            encoded = build_capabilities(chosen)
    return encoded
