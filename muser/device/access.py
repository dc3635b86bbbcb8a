"""Accesses that span ranges served by different parts of a device: split at the
ranges' edges, then joined (reads) or completed in order (writes)."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import TypeVar

_Claim = TypeVar("_Claim")


def split_access(
    offset: int, count: int, claims: Sequence[tuple[range, _Claim]]
) -> list[tuple[int, int, _Claim | None]]:
    """Split an access at the edges of claimed ranges (sorted, disjoint): each piece
    is (start, stop, the claim or None)."""
    end = offset + count
    pieces: list[tuple[int, int, _Claim | None]] = []
    position = offset
    for span, claim in claims:
        if span.stop <= position or span.start >= end:
            continue
        if span.start > position:
            pieces.append((position, span.start, None))
        stop = min(end, span.stop)
        pieces.append((max(position, span.start), stop, claim))
        position = stop
    if position < end:
        pieces.append((position, end, None))
    return pieces


async def await_in_order(pending: list[Awaitable[None]]) -> None:
    for awaitable in pending:
        await awaitable


async def _join_when_read(pieces: list[bytes | Awaitable[bytes]]) -> bytes:
    return b"".join([piece if isinstance(piece, bytes) else await piece for piece in pieces])


def joined(pieces: list[bytes | Awaitable[bytes]]) -> bytes | Awaitable[bytes]:
    """The pieces of a split read, joined now if none has to be awaited."""
    if all(isinstance(piece, bytes) for piece in pieces):
        return b"".join(pieces)  # type: ignore[arg-type]
    return _join_when_read(pieces)
