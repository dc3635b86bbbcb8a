"""The VERSION capabilities JSON (protocol.md §2.3): parsed untrusting, built compactly."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from muser.errors import ProtocolError
from muser.wire.constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_DMA_MAPS,
    DEFAULT_MAX_MSG_FDS,
    DEFAULT_PGSIZES,
)

MAX_MSG_FDS_LIMIT = 1024
"""The most fds a peer may claim to accept per message (libvfio-user's bound)."""

_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1
_PAGE_BITS = 0xFFF


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a peer announced, with the spec's defaults for what it left out."""

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = DEFAULT_PGSIZES
    twin_socket: bool = False
    write_multiple: bool = False
    migration_pgsize: int | None = None
    """From the legacy `migration` object (QEMU still sends it); informational."""
    offered: frozenset[str] = field(default_factory=frozenset)
    """The capability names the peer sent, so a reply can stay within them."""


def _integer(caps: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    if name not in caps:
        return None
    value = caps[name]
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"capability {name} must be an integer in [{low}, {high}]")
    return value


def _boolean(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(f"capability {name} must be a boolean")
    return value


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{name} must be a JSON object")
    return value


def parse_capabilities(raw: bytes) -> Capabilities:
    """Decode VERSION's JSON tail (empty, or UTF-8 JSON followed by one NUL)."""
    if not raw:
        return Capabilities()
    if raw[-1] != 0:
        raise ProtocolError("version capabilities are not NUL-terminated")
    try:
        document = json.loads(raw[:-1].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("version capabilities are not valid JSON") from None
    caps = _object(_object(document, "version JSON").get("capabilities", {}), "capabilities")
    values: dict[str, Any] = {"offered": frozenset(caps)}
    limits = {
        "max_msg_fds": (0, MAX_MSG_FDS_LIMIT),
        "max_data_xfer_size": (1, _U32_MAX),
        "max_dma_maps": (0, _U32_MAX),
        "pgsizes": (1, _U64_MAX),
    }
    for name, (low, high) in limits.items():
        value = _integer(caps, name, low, high)
        if value is not None:
            values[name] = value
    if values.get("pgsizes", DEFAULT_PGSIZES) & _PAGE_BITS:
        raise ProtocolError("capability pgsizes must not include sizes below 4 KiB")
    if "twin_socket" in caps:
        twin = _object(caps["twin_socket"], "capability twin_socket")
        values["twin_socket"] = _boolean(twin.get("supported", False), "twin_socket.supported")
    if "write_multiple" in caps:
        values["write_multiple"] = _boolean(caps["write_multiple"], "write_multiple")
    if "migration" in caps:
        migration = _object(caps["migration"], "capability migration")
        values["migration_pgsize"] = _integer(migration, "pgsize", 1, _U64_MAX)
        _integer(migration, "max_bitmap_size", 0, _U64_MAX)
    return Capabilities(**values)


def build_capabilities(capabilities: Mapping[str, Any]) -> bytes:
    """Compact JSON followed by one NUL: what VERSION carries."""
    document = {"capabilities": dict(capabilities)}
    return json.dumps(document, separators=(",", ":")).encode() + b"\0"
