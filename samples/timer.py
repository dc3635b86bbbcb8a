"""timer: a stateful device that migrates, modelled on libvfio-user's samples/server.c.

    python -m muser.run timer --socket /tmp/timer.sock

It is for vfio-user clients that speak migration (libvfio-user's, muser's own),
not for QEMU: like the original, BAR1 is an I/O BAR of 0x3000 bytes, which PCI
(and so QEMU) does not allow. libvfio-user's `samples/client` runs against it
unmodified, migrating from it to its C twin or from the twin to it.

- IDs dead:beef, subsystem cafe:babe, conventional PCI, no capabilities, INTx.
- BAR0, 8 bytes of I/O, takes only 8-byte accesses at offset 0 (anything else is
  EINVAL). Writing stores an absolute time in epoch seconds and, while the device
  runs, arms a timer for that moment; reading returns now minus the stored time.
- BAR1, 0x3000 bytes of I/O backed by a file; the client may map [0, 0x1000) and
  [0x2000, 0x3000), the page between is served by messages.
- The timer runs only while a client is attached: the `disconnected` hook disarms
  it (and stops DMA in progress), `connected` re-arms it from the stored time.
- When the timer fires the device raises INTx, writes 4 KiB ('A'..'D', 1 KiB
  each) straight into the second DMA window (dirtying its pages), then does four
  1 KiB DMA_WRITEs of 'A'..'D' into the first window and reads them back with two
  2 KiB DMA_READs, by message even though that window has an fd. It speaks the
  spec's DMA layout without asking (QEMU's is moot here), since libvfio-user's
  client counts every DMA_WRITE it gets, a layout probe included.
- Migration keeps server.c's stream, byte for byte, so either side may be the C
  sample: PRE_COPY is BAR1 (0x3000 bytes), STOP_COPY is BAR1 again and then BAR0's
  value (8 bytes, little-endian), an image complete on its own. A destination takes
  that image alone (libvfio-user's client sends only the STOP_COPY part) or behind
  whatever part of the PRE_COPY data came first (as a VMM sends the stream), and on
  RUNNING re-arms the timer from it.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator

import muser
from muser import MigrationState, SharedMemory

BAR1_SIZE = 0x3000
IMAGE_SIZE = BAR1_SIZE + 8
"""STOP_COPY's data: BAR1, then BAR0's value."""
PATTERN = b"".join(bytes([ord("A") + index]) * 1024 for index in range(4))


class Timer(muser.PciDevice):
    def __init__(self) -> None:
        self.deadline = 0
        self.expired = 0
        self.dma_matched: list[bool] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        super().__init__(
            vendor_id=0xDEAD,
            device_id=0xBEEF,
            subsystem_vendor_id=0xCAFE,
            subsystem_id=0xBABE,
            intx=True,
            bars={
                0: muser.Bar(8, kind=muser.BarKind.IO, read=self.read_bar0, write=self.write_bar0),
                1: muser.Bar(
                    BAR1_SIZE,
                    kind=muser.BarKind.IO,
                    nonstandard=True,
                    read=self.read_bar1,
                    write=self.write_bar1,
                    shared=SharedMemory(areas=((0, 0x1000), (0x2000, 0x1000))),
                ),
            },
            migration=muser.Migration(pre_copy=True, stream=muser.MigrationStream.DEVICE),
            dma_layout=muser.DmaLayout.SPEC,
            name="timer",
        )

    # BAR0: the timer

    @staticmethod
    def check(offset: int, count: int) -> None:
        if (offset, count) != (0, 8):
            raise muser.VfioUserError(errno.EINVAL, "BAR0 takes 8-byte accesses at 0")

    def read_bar0(self, offset: int, count: int) -> bytes:
        self.check(offset, count)
        return ((int(time.time()) - self.deadline) & (1 << 64) - 1).to_bytes(8, "little")

    def write_bar0(self, offset: int, data: bytes) -> None:
        self.check(offset, len(data))
        self.deadline = int.from_bytes(data, "little", signed=True)
        if self.migration is None or self.migration.active:
            self.arm()

    def arm(self) -> None:
        self.disarm()
        loop = asyncio.get_running_loop()
        delay = max(0.0, self.deadline - time.time())
        self._timer = loop.call_later(delay, self.fire)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def fire(self) -> None:
        self._timer = None
        self.expired += 1
        self.irqs.intx.trigger()
        task = asyncio.get_running_loop().create_task(self.do_dma())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def do_dma(self) -> None:
        windows = self.dma.windows
        if len(windows) < 2:
            return
        self.dma.write_direct(windows[1].address, PATTERN)
        first = windows[0].address
        for index in range(4):
            piece = PATTERN[index * 1024 : (index + 1) * 1024]
            await self.dma.write(first + index * 1024, piece, messages=True)
        back = b"".join(
            [await self.dma.read(first + half * 2048, 2048, messages=True) for half in range(2)]
        )
        self.dma_matched.append(back == PATTERN)

    # BAR1: file-backed memory; the page between the mapped areas is trapped

    def read_bar1(self, offset: int, count: int) -> bytes:
        return bytes(self.shared_memory(1)[offset : offset + count])

    def write_bar1(self, offset: int, data: bytes) -> None:
        self.shared_memory(1)[offset : offset + len(data)] = data

    # Migration and reset

    def migration_transition(self, old: MigrationState, new: MigrationState) -> None:
        if new == MigrationState.RUNNING and self.deadline:
            self.arm()
        elif old == MigrationState.RUNNING:
            self.disarm()

    def save_state(self, phase: MigrationState) -> bytes:
        bar1 = self.shared_memory(1).tobytes()
        if phase == MigrationState.STOP_COPY:
            return bar1 + self.deadline.to_bytes(8, "little", signed=True)
        return bar1

    async def load_state(self, chunks: AsyncIterator[bytes]) -> None:
        stream = b"".join([chunk async for chunk in chunks])
        if not IMAGE_SIZE <= len(stream) <= BAR1_SIZE + IMAGE_SIZE:
            raise muser.VfioUserError(
                errno.EINVAL, f"a timer stream is a {IMAGE_SIZE}-byte image, after pre-copy data"
            )
        image = stream[-IMAGE_SIZE:]
        self.shared_memory(1)[:] = image[:BAR1_SIZE]
        self.deadline = int.from_bytes(image[BAR1_SIZE:], "little", signed=True)

    # The client's lifecycle: the timer runs only while a client is there to see it

    def connected(self, client: muser.ClientInfo) -> None:
        if self.deadline and (self.migration is None or self.migration.active):
            self.arm()

    async def disconnected(self, reason: muser.DisconnectReason) -> None:
        self.disarm()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def reset(self, reason: muser.ResetReason) -> None:
        if reason is not muser.ResetReason.LOST_CONNECTION:
            self.disarm()
            self.deadline = 0


def create() -> Timer:
    return Timer()
