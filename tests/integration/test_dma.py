"""DMA end to end: memfd-backed windows passed over the socket, message-based
windows served by the client in both layouts, quiesce, and dirty logging."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog

import muser
from muser import Bar, Client, Server, VfioUserError
from muser.device.dma import DmaDeadlockError, DmaLayout
from muser.wire.constants import Command, DmaMapFlag, FeatureFlag
from muser.wire.messages import (
    DmaLoggingRange,
    DmaLoggingReport,
    DmaLoggingStart,
    DmaMap,
    Header,
)
from tests.helpers import RawPeer, message, open_fds

RW = DmaMapFlag.READ | DmaMapFlag.WRITE
GUEST = 1 << 20


class DmaDevice(muser.PciDevice):
    """BAR0 register 0 holds a guest address; writing register 4 makes the device copy
    16 bytes from that address into itself (through a task, after the reply)."""

    def __init__(self) -> None:
        self.copied: list[bytes] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.address = 0
        super().__init__(
            vendor_id=0x1234,
            device_id=0x11E8,
            bars={0: Bar(0x1000, read=self.read, write=self.write)},
        )

    def read(self, offset: int, count: int) -> bytes:
        return bytes(count)

    async def write(self, offset: int, data: bytes) -> None:
        if offset == 0:
            self.address = int.from_bytes(data, "little")
        elif offset == 4:
            self.copied.append(await self.dma.read(self.address, 16))
        elif offset == 8:
            task = asyncio.get_running_loop().create_task(self.copy_later())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def copy_later(self) -> None:
        self.copied.append(await self.dma.read(self.address, 16))


@pytest.fixture
def device() -> DmaDevice:
    return DmaDevice()


@pytest.fixture
def guest() -> Iterator[tuple[int, mmap.mmap]]:
    """Guest RAM as a client has it: a memfd, mapped on the client's side too."""
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, GUEST)
    memory = mmap.mmap(fd, GUEST)
    yield fd, memory
    memory.close()
    os.close(fd)


@pytest.fixture
async def client(device: DmaDevice, sock_path: str) -> AsyncIterator[Client]:
    async with Server(device, sock_path), await Client.connect(sock_path) as connected:
        yield connected


class TestMappedWindows:
    async def test_both_directions(
        self, client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
    ) -> None:
        fd, memory = guest
        await client.dma_map(0x10000, 0x4000, fd=fd, offset=0x8000)
        memory[0x8000 + 0x100 : 0x8000 + 0x105] = b"hello"
        assert device.dma.read_direct(0x10100, 5) == b"hello"
        assert await device.dma.read(0x10100, 5) == b"hello"
        device.dma.write_direct(0x13FFC, b"tail")
        assert memory[0x8000 + 0x3FFC : 0x8000 + 0x4000] == b"tail"
        await device.dma.write(0x10000, b"head")
        assert memory[0x8000:0x8004] == b"head"

    async def test_zero_copy_view_sees_client_writes(
        self, client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
    ) -> None:
        fd, memory = guest
        await client.dma_map(0x10000, 0x1000, fd=fd)
        with device.dma.view(0x10010, 8, write=True) as view:
            memory[0x10:0x18] = b"ABCDEFGH"
            assert bytes(view) == b"ABCDEFGH"
            view[:2] = b"xy"
        assert memory[0x10:0x12] == b"xy"
        async with device.dma.view(0x10010, 8) as readonly:
            assert readonly.readonly
            assert bytes(readonly) == b"xyCDEFGH"

    async def test_unaligned_file_offset(
        self, client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
    ) -> None:
        fd, memory = guest
        memory[0x1234:0x1238] = b"odd!"
        await client.dma_map(0x40000, 0x1000, fd=fd, offset=0x1234)
        assert device.dma.read_direct(0x40000, 4) == b"odd!"

    async def test_transfer_spanning_windows(
        self, client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
    ) -> None:
        fd, memory = guest
        await client.dma_map(0x10000, 0x1000, fd=fd, offset=0)
        await client.dma_map(0x11000, 0x1000, fd=fd, offset=0x5000)
        memory[0xFFE:0x1000] = b"ab"
        memory[0x5000:0x5002] = b"cd"
        assert await device.dma.read(0x10FFE, 4) == b"abcd"
        segments = device.dma.translate(0x10FFE, 4)
        assert [(s.address, s.length, s.start) for s in segments] == [
            (0x10FFE, 2, 0xFFE),
            (0x11000, 2, 0),
        ]
        with pytest.raises(VfioUserError) as caught:
            device.dma.view(0x10FFE, 4)
        assert caught.value.errno == errno.EFAULT

    async def test_holes_and_protections(
        self, client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
    ) -> None:
        fd, _ = guest
        await client.dma_map(0x10000, 0x1000, fd=fd, flags=DmaMapFlag.READ)
        await client.dma_map(0x12000, 0x1000, fd=fd, offset=0x2000, flags=DmaMapFlag.WRITE)
        for call, code in [
            (lambda: device.dma.read_direct(0x11000, 4), errno.EFAULT),
            (lambda: device.dma.read_direct(0x10FFE, 4), errno.EFAULT),
            (lambda: device.dma.read_direct(0x0, 4), errno.EFAULT),
            (lambda: device.dma.write_direct(0x10000, b"x"), errno.EPERM),
            (lambda: device.dma.read_direct(0x12000, 1), errno.EPERM),
            (lambda: device.dma.view(0x10000, 4, write=True), errno.EPERM),
        ]:
            with pytest.raises(VfioUserError) as caught:
                call()
            assert caught.value.errno == code
        device.dma.write_direct(0x12000, b"ok")

    async def test_file_io_windows(
        self, client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
    ) -> None:
        fd, memory = guest
        await client.dma_map(0x10000, 0x1000, fd=fd, offset=0x3000, flags=RW | DmaMapFlag.FILE_IO)
        device.dma.write_direct(0x10008, b"pwrite")
        assert memory[0x3008:0x300E] == b"pwrite"
        assert device.dma.read_direct(0x10008, 6) == b"pwrite"
        with pytest.raises(VfioUserError):
            device.dma.view(0x10000, 8)


def dma_map(argsz: int, flags: int, offset: int, address: int, size: int) -> bytes:
    return DmaMap(argsz, flags, offset, address, size).build()


MAP_INVALID = [
    ("short payload", dma_map(32, RW, 0, 0, 0x1000)[:31], 0, errno.EINVAL),
    ("argsz 31", dma_map(31, RW, 0, 0x100000, 0x1000), 0, errno.EINVAL),
    ("unknown flag", dma_map(32, RW | 0x10, 0, 0x100000, 0x1000), 0, errno.EINVAL),
    ("neither read nor write", dma_map(32, 0, 0, 0x100000, 0x1000), 0, errno.EINVAL),
    ("MMAP without fd", dma_map(32, RW | DmaMapFlag.MMAP, 0, 0x100000, 0x1000), 0, errno.EINVAL),
    (
        "FILE_IO without fd",
        dma_map(32, RW | DmaMapFlag.FILE_IO, 0, 0x100000, 0x1000),
        0,
        errno.EINVAL,
    ),
    (
        "MMAP and FILE_IO",
        dma_map(32, RW | DmaMapFlag.MMAP | DmaMapFlag.FILE_IO, 0, 0x100000, 0x1000),
        1,
        errno.EINVAL,
    ),
    ("unaligned address", dma_map(32, RW, 0, 0x100800, 0x1000), 0, errno.EINVAL),
    ("unaligned size", dma_map(32, RW, 0, 0x100000, 0x1800), 0, errno.EINVAL),
    ("size 0", dma_map(32, RW, 0, 0x100000, 0), 0, errno.EINVAL),
    ("wraps the address space", dma_map(32, RW, 0, 0xFFFFFFFFFFFFF000, 0x2000), 0, errno.EINVAL),
    ("larger than 8 TiB", dma_map(32, RW, 0, 0, 1 << 44), 0, errno.ENOSPC),
    ("offset without fd", dma_map(32, RW, 0x1000, 0x100000, 0x1000), 0, errno.EINVAL),
    ("two fds", dma_map(32, RW, 0, 0x100000, 0x1000), 2, errno.EINVAL),
    ("overlaps the start", dma_map(32, RW, 0, 0x1F000, 0x2000), 0, errno.EEXIST),
    ("overlaps the end", dma_map(32, RW, 0, 0x20000 + 0x3000, 0x2000), 0, errno.EEXIST),
    ("inside", dma_map(32, RW, 0, 0x21000, 0x1000), 0, errno.EEXIST),
    ("covers", dma_map(32, RW, 0, 0x1F000, 0x10000), 0, errno.EEXIST),
    ("same range, other flags", dma_map(32, DmaMapFlag.READ, 0, 0x20000, 0x4000), 0, errno.EEXIST),
    (
        "past the end of its file",
        dma_map(32, RW, GUEST - 0x1000, 0x100000, 0x2000),
        1,
        errno.EINVAL,
    ),
    ("an fd that cannot be mapped", dma_map(32, RW, 0, 0x100000, 0x1000), -1, errno.EACCES),
]


@pytest.mark.parametrize(
    ("name", "payload", "nfds", "code"), MAP_INVALID, ids=[row[0] for row in MAP_INVALID]
)
async def test_invalid_dma_map(
    client: Client,
    device: DmaDevice,
    guest: tuple[int, mmap.mmap],
    name: str,
    payload: bytes,
    nfds: int,
    code: int,
) -> None:
    await client.dma_map(0x20000, 0x4000)
    before = open_fds()
    if nfds < 0:
        read_end, write_end = os.pipe()
        os.close(write_end)
        fds = [read_end]
    else:
        fds = [os.dup(guest[0]) for _ in range(nfds)]
    reply = await client.exchange(Command.DMA_MAP, payload, fds)
    for fd in fds:
        os.close(fd)
    assert (reply.is_error, reply.error) == (True, code), name
    assert open_fds() == before
    assert len(device.dma) == 1


async def test_identical_remap_succeeds(
    client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
) -> None:
    before = open_fds()
    await client.dma_map(0x20000, 0x4000, fd=guest[0], offset=0x4000)
    await client.dma_map(0x20000, 0x4000, fd=guest[0], offset=0x4000)
    await client.dma_map(0x30000, 0x1000)
    await client.dma_map(0x30000, 0x1000)
    assert len(device.dma) == 2
    assert len(open_fds()) == len(before) + 1, "the mapping's own descriptor, no other"
    await client.dma_unmap(0x20000, 0x4000)
    assert open_fds() == before


UNMAP_INVALID = [
    ("short payload", struct.pack("<IIQ", 24, 0, 0x20000), errno.EINVAL),
    ("argsz 23", struct.pack("<IIQQ", 23, 0, 0x20000, 0x4000), errno.EINVAL),
    ("unknown flag", struct.pack("<IIQQ", 24, 0x4, 0x20000, 0x4000), errno.ENOTSUP),
    (
        "legacy dirty bitmap",
        struct.pack("<IIQQQQ", 40, 1, 0x20000, 0x4000, 4096, 1),
        errno.ENOTSUP,
    ),
    ("UNMAP_ALL with a range", struct.pack("<IIQQ", 24, 2, 0x20000, 0x4000), errno.EINVAL),
    ("UNMAP_ALL and bitmap", struct.pack("<IIQQQQ", 40, 3, 0, 0, 4096, 1), errno.EINVAL),
    ("no such window", struct.pack("<IIQQ", 24, 0, 0x80000, 0x1000), errno.ENOENT),
    ("part of a window", struct.pack("<IIQQ", 24, 0, 0x20000, 0x1000), errno.ENOENT),
    ("more than a window", struct.pack("<IIQQ", 24, 0, 0x20000, 0x8000), errno.ENOENT),
]


@pytest.mark.parametrize(
    ("name", "payload", "code"), UNMAP_INVALID, ids=[row[0] for row in UNMAP_INVALID]
)
async def test_invalid_dma_unmap(
    client: Client, device: DmaDevice, name: str, payload: bytes, code: int
) -> None:
    await client.dma_map(0x20000, 0x4000)
    reply = await client.exchange(Command.DMA_UNMAP, payload)
    assert (reply.is_error, reply.error) == (True, code), name
    assert len(device.dma) == 1


async def test_unmap_reply_echoes_the_request(
    client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
) -> None:
    await client.dma_map(0x20000, 0x4000, fd=guest[0])
    reply = await client.dma_unmap(0x20000, 0x4000)
    assert (reply.argsz, reply.flags, reply.address, reply.size) == (24, 0, 0x20000, 0x4000)
    assert len(device.dma) == 0
    with pytest.raises(VfioUserError):
        device.dma.read_direct(0x20000, 1)


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_65535_windows_then_unmap_all(device: DmaDevice, sock_path: str) -> None:
    """A vIOMMU guest maps many small windows; the last one over the limit is refused."""
    async with Server(device, sock_path):
        peer = await RawPeer.connect(sock_path)
        await peer.negotiate()
        burst = b"".join(
            message(index % 65536, Command.DMA_MAP, dma_map(32, RW, 0, index * 0x2000, 0x1000))
            for index in range(65536)
        )
        await peer.send_all(burst)
        replies = await peer.receive_bytes(65535 * 16 + 16)
        flags = struct.unpack_from("<" + "8xI4x" * 65536, replies)
        assert flags[:65535] == (1,) * 65535
        assert flags[65535] == 0x21
        assert len(device.dma) == 65535
        middle = device.dma.translate(32767 * 0x2000 + 8, 8)
        assert middle[0].window.address == 32767 * 0x2000
        peer.send(message(1, Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 2, 0, 0)))
        header, _ = await peer.receive()
        assert header.flags == 1
        assert len(device.dma) == 0
        peer.close()


async def test_max_dma_maps_is_advertised(client: Client) -> None:
    assert client.server is not None
    assert client.server.max_dma_maps == 65535


async def peer_with_window(sock_path: str, flags: int) -> RawPeer:
    """A raw client, negotiated, that mapped 4 KiB at 0x100000 without an fd."""
    peer = await RawPeer.connect(sock_path)
    await peer.negotiate()
    peer.send(message(1, Command.DMA_MAP, DmaMap(32, flags, 0, 0x100000, 0x1000).build()))
    assert (await peer.receive())[0].flags == 1
    return peer


class TestMessageDma:
    @pytest.mark.parametrize(
        ("server_layout", "client_layout"),
        [
            (DmaLayout.SPEC, DmaLayout.SPEC),
            (DmaLayout.QEMU, DmaLayout.QEMU),
            (DmaLayout.AUTO, DmaLayout.SPEC),
            (DmaLayout.AUTO, DmaLayout.QEMU),
        ],
        ids=lambda layout: layout.value,
    )
    async def test_large_transfers_in_chunks(
        self,
        device: DmaDevice,
        sock_path: str,
        server_layout: DmaLayout,
        client_layout: DmaLayout,
    ) -> None:
        memory = bytearray(os.urandom(0x40000))
        async with (
            Server(device, sock_path, dma_layout=server_layout),
            await Client.connect(
                sock_path, max_data_xfer_size=0x4000, dma_layout=client_layout
            ) as client,
        ):
            await client.dma_map(0x100000, 0x40000, backing=memory)
            with structlog.testing.capture_logs() as logs:
                assert await device.dma.read(0x100000, 0x40000) == memory
                data = bytes(4) + os.urandom(0x30000 + 123)  # zeros first: no layout hides
                await device.dma.write(0x100100, data)
            assert memory[0x100 : 0x100 + len(data)] == data
            asked = [log["layout"] for log in logs if log["event"] == "client's DMA layout"]
            assert asked == ([client_layout.value] if server_layout is DmaLayout.AUTO else [])
            with pytest.raises(VfioUserError) as caught:
                device.dma.read_direct(0x100000, 4)
            assert caught.value.errno == errno.EFAULT

    @pytest.mark.parametrize(
        ("layout", "reply"),
        [(DmaLayout.SPEC, b""), (DmaLayout.QEMU, struct.pack("<QQ", 0x100000, 64))],
        ids=["spec-answered-as-qemu", "qemu-answered-as-spec"],
    )
    async def test_a_write_in_the_wrong_layout_is_reported(
        self, device: DmaDevice, sock_path: str, layout: DmaLayout, reply: bytes
    ) -> None:
        """A client that takes a DMA_WRITE in either layout without complaint, as QEMU
        does, still answers in its own: the mismatch reaches the device as EIO and
        the log as an error, instead of passing unseen."""
        async with Server(device, sock_path, dma_layout=layout):
            peer = await peer_with_window(sock_path, 3)
            with structlog.testing.capture_logs() as logs:
                write = asyncio.create_task(device.dma.write(0x100000, b"\1" * 64))
                request, _payload = await peer.receive()
                assert request.command == Command.DMA_WRITE
                peer.send(message(request.msg_id, Command.DMA_WRITE, reply, flags=1))
                with pytest.raises(VfioUserError) as caught:
                    await write
            assert caught.value.errno == errno.EIO
            assert [log["command"] for log in logs if log["log_level"] == "error"] == ["DMA_WRITE"]
            peer.close()

    async def test_messages_can_be_asked_for_a_mapped_window(
        self, device: DmaDevice, sock_path: str
    ) -> None:
        """`messages=True` sends DMA_READ/DMA_WRITE even where an fd maps the window:
        the client then serves them from its `backing`, here not the fd's memory."""
        fd = os.memfd_create("guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 0x1000)
        os.pwrite(fd, b"mapped", 0)
        backing = bytearray(b"backed") + bytearray(0x1000 - 6)
        async with Server(device, sock_path), await Client.connect(sock_path) as client:
            await client.dma_map(0x100000, 0x1000, fd=fd, backing=backing)
            os.close(fd)
            dma = device.dma
            assert await dma.read(0x100000, 6) == b"mapped"
            assert await dma.read(0x100000, 6, messages=True) == b"backed"
            await dma.write(0x100000, b"M", messages=True)
            await dma.write(0x100001, b"A")
            assert (bytes(backing[:2]), dma.read_direct(0x100000, 2)) == (b"Ma", b"mA")

    @pytest.mark.parametrize(
        ("layout", "answer", "read"),
        [
            (DmaLayout.SPEC, struct.pack("<QQ", 0x100000, 4) + b"data", b"data"),
            (DmaLayout.SPEC, struct.pack("<QQ", 0x100000, 4) + b"data!", None),
            (DmaLayout.SPEC, struct.pack("<QQ", 0x100000, 4) + b"dat", None),
            (DmaLayout.SPEC, struct.pack("<QQ", 0x100008, 4) + b"data", None),
            (DmaLayout.SPEC, struct.pack("<QQ", 0x100000, 3) + b"data", None),
            (DmaLayout.SPEC, struct.pack("<Q", 0x100000), None),
            (DmaLayout.QEMU, struct.pack("<QI", 0x100000, 4) + b"data" + bytes(4), b"data"),
            (DmaLayout.QEMU, struct.pack("<QI", 0x100000, 4) + b"data", b"data"),
            (DmaLayout.QEMU, struct.pack("<QI", 0x100000, 4) + b"dat", None),
            (DmaLayout.QEMU, struct.pack("<QI", 0x100000, 5) + b"data" + bytes(4), None),
            (DmaLayout.QEMU, b"", None),
        ],
    )
    async def test_a_read_reply_must_answer_its_request(
        self,
        device: DmaDevice,
        sock_path: str,
        layout: DmaLayout,
        answer: bytes,
        read: bytes | None,
    ) -> None:
        """DMA_READ's reply gives back the address and count asked and exactly that
        many bytes (QEMU's may pad them); anything else is EIO, never other data."""
        async with Server(device, sock_path, dma_layout=layout):
            peer = await peer_with_window(sock_path, 1)
            reading = asyncio.create_task(device.dma.read(0x100000, 4))
            request, payload = await peer.receive()
            assert (request.command, payload) == (
                Command.DMA_READ,
                struct.pack("<QQ", 0x100000, 4),
            )
            peer.send(message(request.msg_id, Command.DMA_READ, answer, flags=1))
            if read is None:
                with pytest.raises(VfioUserError) as caught:
                    await reading
                assert caught.value.errno == errno.EIO
            else:
                assert await reading == read
            peer.close()

    async def test_a_client_refusing_the_question_speaks_the_spec(
        self, device: DmaDevice, sock_path: str
    ) -> None:
        """A spec client may refuse an empty or read-only DMA_WRITE; QEMU never does,
        so an error answer to AUTO's question means the spec's layout."""
        async with Server(device, sock_path):
            peer = await peer_with_window(sock_path, 1)
            read = asyncio.create_task(device.dma.read(0x100000, 4))
            probe, payload = await peer.receive()
            assert (probe.command, payload) == (Command.DMA_WRITE, struct.pack("<QQ", 0x100000, 0))
            peer.send(Header(probe.msg_id, Command.DMA_WRITE, 16, 0x21, errno.EPERM).build())
            request, _payload = await peer.receive()
            assert request.command == Command.DMA_READ
            answer = struct.pack("<QQ", 0x100000, 4) + b"data"
            peer.send(message(request.msg_id, Command.DMA_READ, answer, flags=1))
            assert await read == b"data"
            peer.close()

    async def test_a_client_speaks_one_layout(self) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs, pytest.raises(ValueError, match="one DMA layout"):
            Client(ours, dma_layout=DmaLayout.AUTO)

    async def test_mismatched_layout_is_detected(self, device: DmaDevice, sock_path: str) -> None:
        memory = bytearray(b"\xff" * 0x1000)
        async with (
            Server(device, sock_path, dma_layout=DmaLayout.SPEC),
            await Client.connect(sock_path, dma_layout=DmaLayout.QEMU) as client,
        ):
            await client.dma_map(0x100000, 0x1000, backing=memory)
            with pytest.raises(VfioUserError):
                await device.dma.read(0x100000, 64)

    async def test_client_errors_reach_the_device(self, client: Client, device: DmaDevice) -> None:
        await client.dma_map(0x100000, 0x1000)
        with pytest.raises(VfioUserError) as caught:
            await device.dma.read(0x100000, 8)
        assert caught.value.errno == errno.EFAULT

    async def test_handler_awaiting_message_dma_is_refused(
        self, client: Client, device: DmaDevice
    ) -> None:
        """Awaiting a DMA reply inside the client's command would deadlock QEMU for 5 s:
        the handler gets DmaDeadlockError (EIO to the client) at once instead."""
        memory = bytearray(b"descriptor......" * 2)
        await client.dma_map(0x100000, 0x1000, backing=memory + bytes(0x1000 - 32))
        await client.region_write(0, 0, (0x100000).to_bytes(4, "little"))
        with pytest.raises(VfioUserError) as caught:
            await asyncio.wait_for(client.region_write(0, 4, b"\1\0\0\0"), 2)
        assert caught.value.errno == errno.EIO
        assert device.copied == []
        await client.region_write(0, 8, b"\1\0\0\0")
        while device.tasks:
            await asyncio.sleep(0.005)
        assert device.copied == [b"descriptor......"]

    async def test_deadlock_error_type(self, client: Client, device: DmaDevice) -> None:
        await client.dma_map(0x100000, 0x1000, backing=bytearray(0x1000))
        connection = device.dma.messenger
        assert connection is not None
        assert not connection.in_handler()
        assert issubclass(DmaDeadlockError, RuntimeError)


class TestQuiesce:
    async def test_unmap_waits_for_views(
        self, client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
    ) -> None:
        await client.dma_map(0x10000, 0x1000, fd=guest[0])
        events: list[str] = []
        held = asyncio.Event()

        async def device_work() -> None:
            async with device.dma.view(0x10000, 16, write=True) as view:
                held.set()
                await asyncio.sleep(0.1)
                view[:4] = b"done"
                events.append("released")

        work = asyncio.ensure_future(device_work())
        await held.wait()
        await client.dma_unmap(0x10000, 0x1000)
        events.append("unmapped")
        await work
        assert events == ["released", "unmapped"]
        assert guest[1][:4] == b"done"

    async def test_new_access_fails_while_unmap_waits(
        self, client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
    ) -> None:
        await client.dma_map(0x10000, 0x1000, fd=guest[0])
        view = device.dma.view(0x10000, 16)
        view.__enter__()
        unmap = asyncio.ensure_future(client.dma_unmap(0x10000, 0x1000))
        await asyncio.sleep(0.02)
        assert not unmap.done()
        with pytest.raises(VfioUserError):
            device.dma.read_direct(0x10000, 1)
        view.__exit__(None, None, None)
        await asyncio.wait_for(unmap, 2)

    async def test_reset_waits_for_views(
        self, client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
    ) -> None:
        await client.dma_map(0x10000, 0x1000, fd=guest[0])
        view = device.dma.view(0x10000, 16)
        view.__enter__()
        reset = asyncio.ensure_future(client.reset())
        await asyncio.sleep(0.02)
        assert not reset.done()
        view.__exit__(None, None, None)
        await asyncio.wait_for(reset, 2)
        assert len(device.dma) == 1, "a reset keeps the windows"

    async def test_disconnect_unmaps_everything(
        self, device: DmaDevice, sock_path: str, guest: tuple[int, mmap.mmap]
    ) -> None:
        before = open_fds()
        async with Server(device, sock_path) as server:
            async with await Client.connect(sock_path) as client:
                await client.dma_map(0x10000, 0x1000, fd=guest[0])
                await client.dma_map(0x20000, 0x1000, fd=guest[0], flags=RW | DmaMapFlag.FILE_IO)
                await client.dma_map(0x30000, 0x1000)
            while server.connection is not None:
                await asyncio.sleep(0.01)
            assert len(device.dma) == 0
            assert device.dma.messenger is None
        assert open_fds() == before


def start_logging(page_size: int = 4096, ranges: tuple[DmaLoggingRange, ...] = ()) -> bytes:
    return DmaLoggingStart(page_size, len(ranges), 0, ranges).build()


def report_request(iova: int, length: int, page_size: int) -> bytes:
    return DmaLoggingReport(iova, length, page_size, b"").build()


def bitmap_bytes(length: int, page_size: int) -> int:
    """u64 words of one bit per page, as §7.8 sizes the bitmap."""
    pages = (length + page_size - 1) // page_size
    return (pages + 63) // 64 * 8


async def report(client: Client, iova: int, length: int, page_size: int = 4096) -> int:
    size = bitmap_bytes(length, page_size)
    request = report_request(iova, length, page_size)
    reply = await client.device_feature(FeatureFlag.GET | 8, request, argsz=8 + 24 + size)
    data = DmaLoggingReport.parse(reply.data)
    assert reply.argsz == 8 + 24 + size
    assert len(data.bitmap) == size
    return int.from_bytes(data.bitmap, "little")


class TestDirtyLogging:
    async def test_exact_bitmaps_across_windows(
        self, client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
    ) -> None:
        fd, _ = guest
        await client.dma_map(0x100000, 0x10000, fd=fd)
        await client.dma_map(0x110000, 0x10000, fd=fd, offset=0x10000)
        await client.device_feature(FeatureFlag.SET | 6, start_logging())
        device.dma.write_direct(0x100000, b"x")
        device.dma.write_direct(0x10FFFF, b"yz")
        with device.dma.view(0x115000, 0x2000, write=True) as view:
            view[0] = 1
        device.dma.read_direct(0x118000, 0x1000)
        assert await report(client, 0x100000, 0x20000) == (
            1 << 0 | 1 << 15 | 1 << 16 | 1 << 21 | 1 << 22
        )
        assert await report(client, 0x100000, 0x20000) == 0, "reporting clears"

    async def test_page_sizes_and_partial_ranges(
        self, client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
    ) -> None:
        await client.dma_map(0x100000, 0x20000, fd=guest[0])
        await client.device_feature(FeatureFlag.SET | 6, start_logging())
        device.dma.write_direct(0x103000, b"a")
        device.dma.write_direct(0x10A000, b"b")
        assert await report(client, 0x100000, 0x20000, page_size=0x8000) == 0b011
        device.dma.write_direct(0x103000, b"a")
        assert await report(client, 0x102000, 0x3000) == 0b010, "a range inside the window"
        device.dma.write_direct(0x100000, bytes(0x11000))
        bits = await report(client, 0x100000, 0x12000)
        assert bits == (1 << 17) - 1, "17 pages over a 64-bit word boundary"

    async def test_report_over_holes_and_message_windows(
        self, client: Client, device: DmaDevice
    ) -> None:
        memory = bytearray(0x2000)
        await client.dma_map(0x200000, 0x2000, backing=memory)
        await client.device_feature(FeatureFlag.SET | 6, start_logging())
        await device.dma.write(0x201000, b"through messages")
        assert await report(client, 0x1FE000, 0x6000) == 0b001000

    async def test_ranges_limit_logging(
        self, client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
    ) -> None:
        await client.dma_map(0x100000, 0x10000, fd=guest[0])
        ranges = (DmaLoggingRange(0x104000, 0x2000),)
        await client.device_feature(FeatureFlag.SET | 6, start_logging(ranges=ranges))
        device.dma.write_direct(0x100000, bytes(0x10000))
        assert await report(client, 0x100000, 0x10000) == 0b110000

    async def test_probe_stop_and_errors(self, client: Client, device: DmaDevice) -> None:
        for flags in (
            FeatureFlag.PROBE | FeatureFlag.SET | 6,
            FeatureFlag.PROBE | 6,
            FeatureFlag.PROBE | FeatureFlag.SET | 7,
            FeatureFlag.PROBE | FeatureFlag.GET | 8,
        ):
            reply = await client.device_feature(flags)
            assert (reply.argsz, reply.flags) == (8, flags)
        refused = [
            (FeatureFlag.PROBE | FeatureFlag.GET | 6, b""),
            (FeatureFlag.GET | 1, bytes(8)),
            (FeatureFlag.SET | 2, bytes(8)),
            (FeatureFlag.PROBE | 1, b""),
            (FeatureFlag.GET | 8, report_request(0, 0x1000, 4096)),
            (FeatureFlag.SET | 6, start_logging(page_size=1000)),
            (FeatureFlag.SET | 6, start_logging(page_size=0)),
            (FeatureFlag.SET | FeatureFlag.GET | 6, start_logging()),
            (0x80000 | 6, start_logging()),
            (FeatureFlag.SET | 0x1234, b""),
        ]
        for flags, data in refused:
            with pytest.raises(VfioUserError) as caught:
                await client.device_feature(flags, data)
            assert caught.value.errno == errno.EINVAL, hex(flags)
        await client.device_feature(FeatureFlag.SET | 6, start_logging())
        with pytest.raises(VfioUserError):
            await client.device_feature(FeatureFlag.SET | 6, start_logging(page_size=8192))
        with pytest.raises(VfioUserError):
            await client.device_feature(
                FeatureFlag.GET | 8, report_request(0, 0x1000, 4096), argsz=32
            )
        stop = await client.device_feature(FeatureFlag.SET | 7, start_logging())
        assert stop.data == start_logging(), "STOP ignores and echoes what it is sent"
        assert device.dma.log is None


async def test_a_view_cannot_outlive_its_block(
    client: Client, device: DmaDevice, guest: tuple[int, mmap.mmap]
) -> None:
    """The usual `with ... as view:` leaves the name bound; the view itself is released
    so the window unmaps cleanly instead of leaking its mapping."""
    await client.dma_map(0x10000, 0x1000, fd=guest[0])
    with device.dma.view(0x10000, 16) as view:
        assert len(view) == 16
    with pytest.raises(ValueError, match="released"):
        bytes(view)
    windows = device.dma.windows
    await client.dma_unmap(0x10000, 0x1000)
    assert windows[0].view is None
    assert windows[0].close(), "the mapping is gone, nothing kept it"
