"""DMA window commands: DMA_MAP and DMA_UNMAP (the device's `DmaSpace` maps, checks
and quiesces)."""

from __future__ import annotations

import errno
from collections.abc import Awaitable

from muser.errors import ProtocolError, VfioUserError
from muser.session.context import Context
from muser.session.outcome import Outcome
from muser.session.regions import after
from muser.wire import Frame
from muser.wire.constants import DmaUnmapFlag
from muser.wire.messages import DmaMap, DmaUnmap, DmaUnmapReply

_UNMAP_ALL = int(DmaUnmapFlag.UNMAP_ALL)
_GET_DIRTY_BITMAP = int(DmaUnmapFlag.GET_DIRTY_BITMAP)
"""Plain ints: `flags & DmaUnmapFlag.UNMAP_ALL` goes through IntFlag's __rand__, a
microsecond or more each, and a vIOMMU guest maps and unmaps all the time."""
_UNMAP_FLAGS = _GET_DIRTY_BITMAP | _UNMAP_ALL


def dma_map(context: Context, request: DmaMap, frame: Frame) -> Outcome:
    if request.argsz < DmaMap.SIZE:
        raise ProtocolError(f"DMA_MAP argsz {request.argsz} is too small")
    if len(frame.fds) > 1:
        raise ProtocolError("DMA_MAP carries at most one file descriptor")
    fds = frame.take_fds()
    context.device.dma.map(
        request.address, request.size, request.flags, request.offset, fds[0] if fds else None
    )
    return None


def dma_unmap(context: Context, request: DmaUnmap, frame: Frame) -> Awaitable[Outcome]:
    if request.argsz < DmaUnmap.SIZE:
        raise ProtocolError(f"DMA_UNMAP argsz {request.argsz} is too small")
    flags = request.flags
    if flags & ~_UNMAP_FLAGS:
        raise VfioUserError(errno.ENOTSUP, f"DMA_UNMAP flags {flags:#x} are not supported")
    dma = context.device.dma
    if flags & _UNMAP_ALL:
        if flags & _GET_DIRTY_BITMAP or request.address or request.size:
            raise ProtocolError("UNMAP_ALL takes no range and no dirty bitmap")
        done = dma.unmap_all()
    elif flags & _GET_DIRTY_BITMAP:
        raise VfioUserError(
            errno.ENOTSUP,
            "DMA_UNMAP's legacy dirty bitmap is not supported; use DEVICE_FEATURE DMA logging",
        )
    else:
        done = dma.unmap(request.address, request.size)
    reply = DmaUnmapReply(request.argsz, flags, request.address, request.size, None, b"")
    return after(done, reply)
