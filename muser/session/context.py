"""What command handlers work with: the device, this server's limits, the client."""

from __future__ import annotations

import functools
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

from muser.device import PciDevice
from muser.device.bars import Reader, Writer
from muser.wire import Capabilities


class Logger(Protocol):
    def __call__(self, level: str, event: str, /, **fields: object) -> None: ...


class LimitedLogger(Protocol):
    def __call__(self, level: str, event: str, kind: Hashable, **fields: object) -> None: ...


@dataclass(eq=False)
class Context:
    """One session's view of its device, shared by every handler."""

    device: PciDevice
    max_data_xfer_size: int
    log: Logger
    log_limited: LimitedLogger
    """Log, unless this client repeats itself."""
    peer: Capabilities | None = None
    """The client's capabilities, once VERSION is negotiated."""
    peer_version: str = ""
    """The protocol version the client asked for, "major.minor"."""
    readers: tuple[Reader, ...] = field(default=())
    """What reads each region (offset, count), decided once."""
    writers: tuple[Writer, ...] = field(default=())
    """What writes each region (offset, data), decided once."""
    stopping: bool = False
    """Set when the server closes: no command after the one being handled runs (the
    hot path checks it between messages)."""

    def __post_init__(self) -> None:
        device = self.device
        regions = range(len(device.region_readers))
        # A subclass that overrides read_region or write_region is asked through it.
        if type(device).read_region is PciDevice.read_region:
            self.readers = device.region_readers
        else:
            self.readers = tuple(functools.partial(device.read_region, i) for i in regions)
        if type(device).write_region is PciDevice.write_region:
            self.writers = device.region_writers
        else:
            self.writers = tuple(functools.partial(device.write_region, i) for i in regions)
