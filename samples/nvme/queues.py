"""Submission and completion queues: rings in guest memory, with the controller's
side of their heads, tails and phase tag."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .spec import CQE_SIZE, SQE_SIZE


@dataclass(eq=False)
class CompletionQueue:
    qid: int
    base: int
    size: int
    vector: int
    interrupts: bool
    """IEN: whether posting an entry raises the queue's interrupt vector."""
    head: int = 0
    """Where the host has consumed up to (its head doorbell)."""
    tail: int = 0
    phase: int = 1
    submission_queues: set[int] = field(default_factory=set)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while an entry can be posted; cleared when the ring is full."""

    def __post_init__(self) -> None:
        self.room.set()

    @property
    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head

    @property
    def unread(self) -> bool:
        """Whether entries are posted that the host has not consumed."""
        return self.head != self.tail

    def reserve(self) -> tuple[int, int]:
        """The guest address and phase tag of the next entry, taken."""
        address, phase = self.base + self.tail * CQE_SIZE, self.phase
        self.tail += 1
        if self.tail == self.size:
            self.tail, self.phase = 0, self.phase ^ 1
        if self.full:
            self.room.clear()
        return address, phase

    def consumed(self, head: int) -> None:
        self.head = head
        if not self.full:
            self.room.set()


@dataclass(eq=False)
class SubmissionQueue:
    qid: int
    base: int
    size: int
    completion: CompletionQueue
    head: int = 0
    """The next entry the controller fetches."""
    tail: int = 0
    """Where the host has submitted up to (its tail doorbell)."""
    kicked: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task[None] | None = None
    running: set[asyncio.Task[None]] = field(default_factory=set)
    """Commands fetched and not yet completed."""
    deleted: bool = False

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.size)
        """At most a ring's worth of commands run at once."""

    def fetchable(self) -> tuple[int, int]:
        """The guest address and count of the entries to fetch next, up to the tail
        or the end of the ring, whichever comes first."""
        end = self.tail if self.tail >= self.head else self.size
        return self.base + self.head * SQE_SIZE, end - self.head

    def fetched(self, count: int) -> None:
        self.head = (self.head + count) % self.size
