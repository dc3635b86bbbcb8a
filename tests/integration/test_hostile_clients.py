"""Clients that try to wedge, crash, starve or balloon a device: each defect once
found, kept found (every test runs on asyncio and on uvloop).

1. closing with a reply unread and bytes in flight (uvloop drops a reader after EPOLLERR)
2. never negotiating, or stopping halfway through a message
3. never reading what we answer (the send queue bounds every reply path; repeated
   warnings are held back), or writing a migration stream that never ends
4. shrinking a mapped file under us (SIGBUS)
5. exhausting file descriptors (per-client budget, EMFILE replies, accept back-off)
8. SET_IRQS loopback triggers; 9. DEVICE_FEATURE SET with a short argsz

Items 6 and 7 (libvfio-user's client, IRQ info flags) are test_libvfio_user_client.py
and test_interrupts.py; item 10 (the CLI's access options) is in test_cli.py.
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import structlog

from muser import (
    Bar,
    Client,
    IrqIndex,
    Migration,
    Msi,
    MsiX,
    PciDevice,
    Server,
    SharedMemory,
    VfioUserError,
)
from muser.transport import RECEIVE_SIZE, WRITE_HIGH_WATER
from muser.wire.constants import (
    FLAGS_REPLY,
    Command,
    DmaMapFlag,
    FeatureFlag,
    HeaderFlag,
    IrqSetFlag,
    MigrationState,
)
from muser.wire.messages import DeviceFeature, DmaMap, MigDeviceState, RegionData
from tests.helpers import RawPeer, RecordingDevice, message, open_fds, version_request

ROOT = Path(__file__).resolve().parents[2]
RW = DmaMapFlag.READ | DmaMapFlag.WRITE


def memfd(size: int = 0x10000, *, sealable: bool) -> int:
    """Guest memory: sealable, as QEMU's memory-backend-memfd makes it, or not."""
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0)
    fd = os.memfd_create("guest-ram", flags)
    os.ftruncate(fd, size)
    return fd


def unread_bytes(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0]


async def until(condition: object, timeout: float = 5.0) -> None:
    """Wait until `condition()` holds."""
    assert callable(condition)
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


# 1. A client that closes with our reply unread and its own bytes in flight


@pytest.mark.parametrize(
    "last_words",
    [
        b"\0",
        message(7, Command.REGION_WRITE, RegionData(0, 0, 1, b"x").build(), HeaderFlag.NO_REPLY),
        message(7, Command.REGION_READ, bytes(16))[:9],
    ],
    ids=["stray byte", "posted write", "partial header"],
)
async def test_close_with_reply_unread_frees_the_device(sock_path: str, last_words: bytes) -> None:
    """The peer's close then reaches us as EPOLLERR, on which uvloop calls the reader
    once and stops watching: the server must still see the close, close every fd the
    client gave it, and take the next client."""
    before = open_fds()
    async with Server(RecordingDevice(), sock_path) as server:
        peer = await RawPeer.connect(sock_path)
        peer.send(version_request())
        await until(lambda: unread_bytes(peer.sock) > 0)  # answered, never read
        ram, eventfd = memfd(sealable=True), os.eventfd(0)
        peer.send(message(1, Command.DMA_MAP, DmaMap(32, RW, 0, 0x100000, 0x1000).build()), [ram])
        irq = struct.pack("<5I", 20, IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.DATA_EVENTFD, 0, 0, 1)
        peer.send(message(2, Command.DEVICE_SET_IRQS, irq), [eventfd])
        os.close(ram)
        os.close(eventfd)
        await until(lambda: len(server.device.dma) == 1)
        peer.send(last_words)
        peer.close()
        async with asyncio.timeout(5), await Client.connect(sock_path) as successor:
            assert (await successor.get_device_info()).num_regions == 9
    assert open_fds() == before


# 2. A client that never negotiates, or stops halfway through a message


async def test_client_that_never_negotiates_is_closed(sock_path: str) -> None:
    with structlog.testing.capture_logs() as logs:
        async with Server(RecordingDevice(), sock_path, negotiation_timeout=0.2):
            silent = await RawPeer.connect(sock_path)
            started = time.monotonic()
            assert await silent.expect_closed() == b""
            assert 0.15 < time.monotonic() - started < 2
            silent.close()
            async with await Client.connect(sock_path) as next_client:
                assert (await next_client.get_device_info()).num_regions == 9
    assert any(log["event"] == "client did not negotiate in time; closing" for log in logs)


async def test_message_trickled_byte_by_byte_is_cut_off(sock_path: str) -> None:
    """A header announcing 1 MiB, then a byte every 20 ms: the message has its
    deadline, whatever the client keeps sending."""
    with structlog.testing.capture_logs() as logs:
        async with Server(RecordingDevice(), sock_path, message_timeout=0.2):
            peer = await RawPeer.connect(sock_path)
            await peer.negotiate()
            peer.send(message(1, Command.REGION_WRITE, b"", size=16 + (1 << 20)))
            started = time.monotonic()
            cut_off = False
            while not cut_off and time.monotonic() - started < 3:
                try:
                    peer.send(b"\0")
                except (BrokenPipeError, ConnectionResetError):
                    cut_off = True
                await asyncio.sleep(0.02)
            assert cut_off
            assert time.monotonic() - started < 1
            peer.close()
    assert any(log["event"] == "a message did not arrive whole in time; closing" for log in logs)


async def test_idle_negotiated_client_and_a_slow_whole_message_are_left_alone(
    sock_path: str,
) -> None:
    """Between messages a negotiated client may idle as long as it likes, and a
    message that arrives in pieces within its time is taken."""
    device = RecordingDevice()
    async with Server(device, sock_path, negotiation_timeout=0.1, message_timeout=0.3):
        peer = await RawPeer.connect(sock_path)
        await peer.negotiate()
        await asyncio.sleep(0.4)
        write = message(1, Command.REGION_WRITE, RegionData(0, 0, 4, b"slow").build())
        for piece in (write[:10], write[10:20], write[20:]):
            peer.send(piece)
            await asyncio.sleep(0.05)
        header, _ = await peer.receive()
        assert (header.msg_id, header.flags, header.error) == (1, FLAGS_REPLY, 0)
        peer.close()
    assert device.memory[:4] == b"slow"


# 3. A client that never reads what we answer


async def test_replies_to_nothing_stop_the_reading_not_the_memory(sock_path: str) -> None:
    """Reply-typed junk that is never read: each gets an EINVAL reply, but once 4 MiB
    wait for the client nothing more is read, and one warning line stands for the
    rest. When the client reads again, the device serves it."""
    junk = message(0xBEEF, Command.DEVICE_GET_INFO, flags=FLAGS_REPLY) * 4096  # 64 KiB
    with structlog.testing.capture_logs() as logs:
        async with Server(RecordingDevice(), sock_path) as server:
            peer = await RawPeer.connect(sock_path)
            await peer.negotiate()
            connection = server.connection
            assert connection is not None
            sent = 0
            while sent < 64 << 20:
                try:
                    sent += peer.sock.send(junk)
                except BlockingIOError:
                    await asyncio.sleep(0.05)
                    if not connection.transport.reading:
                        break
            assert not connection.transport.reading
            backlog = connection.transport.write_buffer_size
            assert WRITE_HIGH_WATER < backlog <= WRITE_HIGH_WATER + RECEIVE_SIZE
            assert sent < 16 << 20, "the client could not send far beyond the backlog"
            # every junk message is answered once the client reads: 16 bytes for 16
            cut = sent % 16
            finishing = asyncio.create_task(peer.send_all(junk[cut:16] if cut else b""))
            sent += 16 - cut if cut else 0
            drained = 0
            while drained < sent:
                replies = await peer.receive_bytes(min(sent - drained, 1 << 20))
                for _, _, size, flags, error in struct.iter_unpack("<HHIII", replies):
                    assert (size, flags, error) == (16, FLAGS_REPLY | 0x20, errno.EINVAL)
                drained += len(replies)
            await finishing
            peer.send(message(1, Command.DEVICE_GET_INFO, struct.pack("<4I", 16, 0, 0, 0)))
            header, _ = await peer.receive()
            assert (header.msg_id, header.error) == (1, 0)
            peer.close()
    warnings = [log for log in logs if log["event"] == "unexpected reply"]
    assert 1 <= len(warnings) <= 2
    held = [log for log in logs if log["event"] == "log lines held back"]
    assert held
    assert held[0]["count"] > 1000


async def test_region_reads_never_read_stop_the_reading_too(sock_path: str) -> None:
    """The fast lane answers from the receive callback; it too stops at the bound."""
    async with Server(RecordingDevice(), sock_path) as server:
        peer = await RawPeer.connect(sock_path)
        await peer.negotiate()
        read = message(1, Command.REGION_READ, struct.pack("<QII", 0, 0, 4096))
        connection = server.connection
        assert connection is not None
        for _ in range(4000):
            try:
                peer.sock.send(read * 32)
            except BlockingIOError:
                await asyncio.sleep(0.02)
                if not connection.transport.reading:
                    break
        assert not connection.transport.reading
        assert connection.transport.write_buffer_size < 2 * WRITE_HIGH_WATER
        peer.close()


async def test_a_migration_stream_without_end_is_refused_at_its_bound(sock_path: str) -> None:
    """A destination holds the stream until RESUMING -> STOP; past the device's bound
    MIG_DATA_WRITE is ENOSPC, whatever the client keeps writing."""
    device = PciDevice(
        vendor_id=1, device_id=2, migration=Migration(max_device_data=1 << 20), name="dst"
    )
    async with Server(device, sock_path), await Client.connect(sock_path) as client:
        await client.set_migration_state(MigrationState.RESUMING)
        chunk = bytes(256 << 10)
        refused = None
        for _ in range(16):
            try:
                await client.mig_data_write(chunk)
            except VfioUserError as exc:
                refused = exc
                break
        assert refused is not None
        assert refused.errno == errno.ENOSPC
        assert device.migration is not None
        assert device.migration.state is MigrationState.RESUMING


# 4. A client that shrinks a mapped file under us


class DmaReader(PciDevice):
    def __init__(self) -> None:
        super().__init__(vendor_id=0x1234, device_id=0x5678, bars={0: Bar(0x1000)})


async def test_unsealable_memory_is_reached_with_pread_and_shrinking_it_is_efault(
    sock_path: str,
) -> None:
    """A memfd that cannot be sealed is never mapped: device code reads it with pread,
    gets EFAULT once the client shrank it, and the process lives on."""
    device = DmaReader()
    ram = memfd(sealable=False)
    os.pwrite(ram, b"guest", 0x1000)
    async with Server(device, sock_path), await Client.connect(sock_path) as client:
        await client.dma_map(0x100000, 0x10000, fd=ram)
        assert device.dma.read_direct(0x101000, 5) == b"guest"
        with pytest.raises(VfioUserError) as not_mapped:
            device.dma.view(0x101000, 5)
        assert not_mapped.value.errno == errno.EFAULT
        assert "sealed" in str(not_mapped.value)
        os.ftruncate(ram, 0)
        with pytest.raises(VfioUserError) as gone:
            device.dma.read_direct(0x101000, 5)
        assert gone.value.errno == errno.EFAULT
    os.close(ram)


async def test_sealable_memory_is_sealed_and_mapped(sock_path: str) -> None:
    device = DmaReader()
    ram = memfd(sealable=True)
    async with Server(device, sock_path), await Client.connect(sock_path) as client:
        await client.dma_map(0x100000, 0x10000, fd=ram)
        with pytest.raises(PermissionError):
            os.ftruncate(ram, 0)
        with device.dma.view(0x100000, 4, write=True) as view:
            view[:] = b"zero"
        assert os.pread(ram, 4, 0) == b"zero"
    os.close(ram)


async def test_shared_bar_memory_cannot_be_shrunk_by_the_client(sock_path: str) -> None:
    """The client gets the BAR's memfd itself; muser sealed its size first."""
    device = PciDevice(
        vendor_id=0x1234, device_id=0x5678, bars={0: Bar(0x2000, shared=SharedMemory())}
    )
    async with Server(device, sock_path), await Client.connect(sock_path) as client:
        _, fds = await client.get_region_info(0, argsz=1024)
        with pytest.raises(PermissionError):
            os.ftruncate(fds[0], 0)
        os.close(fds[0])
    device.close()


def test_an_author_file_that_cannot_be_sealed_is_refused() -> None:
    fd = memfd(0x2000, sealable=False)
    try:
        with pytest.raises(ValueError, match="sealed against shrinking"):
            PciDevice(vendor_id=1, device_id=2, bars={0: Bar(0x2000, shared=SharedMemory(fd=fd))})
    finally:
        os.close(fd)


def serve_in_a_process(*args: str, nofile: int | None = None) -> subprocess.Popen[bytes]:
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.Popen(
        [sys.executable, "-m", "muser.run", *args, "--log-format", "json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limit,  # noqa: PLW1509 - sets a limit, nothing else
    )


def wait_for_sockets(process: subprocess.Popen[bytes], *paths: str) -> None:
    deadline = time.monotonic() + 20
    while not all(os.path.exists(path) for path in paths):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def blocking_request(
    sock: socket.socket, msg_id: int, command: int, payload: bytes, fds: list[int] | None = None
) -> tuple[int, int]:
    """Send a command over a blocking socket; the reply's flags and errno."""
    ancillary = []
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sock.sendmsg([message(msg_id, command, payload)], ancillary)
    header = sock.recv(16, socket.MSG_WAITALL)
    _, _, size, flags, error = struct.unpack("<HHIII", header)
    if size > 16:
        sock.recv(size - 16, socket.MSG_WAITALL)
    return flags, error


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_shrinking_memory_the_edu_device_dmas_from_does_not_kill_it(
    sock_dir: str,
) -> None:
    """The reproducer, end to end: edu's DMA engine reads guest memory the client has
    shrunk to nothing. The DMA fails; the server lives."""
    path = os.path.join(sock_dir, "edu.sock")
    process = serve_in_a_process("edu", "--socket", path)
    try:
        wait_for_sockets(process, path)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(version_request())
            sock.recv(4096)
            ram = memfd(sealable=False)
            flags, error = blocking_request(
                sock, 2, Command.DMA_MAP, DmaMap(32, RW, 0, 0x10000, 0x10000).build(), [ram]
            )
            assert (flags, error) == (FLAGS_REPLY, 0)
            os.ftruncate(ram, 0)
            for offset, value in ((0x80, 0x10000), (0x88, 0x40000), (0x90, 4096), (0x98, 1)):
                write = RegionData(offset, 0, 8, value.to_bytes(8, "little")).build()
                assert blocking_request(sock, 3, Command.REGION_WRITE, write) == (FLAGS_REPLY, 0)
            time.sleep(0.5)
            assert process.poll() is None, "the server died"
            read = struct.pack("<QII", 0x98, 0, 8)  # the DMA engine says it finished
            assert blocking_request(sock, 4, Command.REGION_READ, read) == (FLAGS_REPLY, 0)
            os.close(ram)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=10)
    assert process.returncode == 0


# 5. A client that exhausts file descriptors


async def test_dma_windows_beyond_the_fd_budget_are_emfile(sock_path: str) -> None:
    """Windows over files the client has not mapped before each keep a descriptor;
    beyond the budget DMA_MAP is EMFILE and the connection goes on."""
    device = DmaReader()
    async with (
        Server(device, sock_path, fd_budget=4),
        await Client.connect(sock_path) as client,
    ):
        files = [memfd(sealable=False) for _ in range(5)]
        for index, fd in enumerate(files[:4]):
            await client.dma_map(0x100000 * (index + 1), 0x10000, fd=fd)
        with pytest.raises(VfioUserError) as refused:
            await client.dma_map(0x500000, 0x10000, fd=files[4])
        assert refused.value.errno == errno.EMFILE
        # a window in a file already held costs nothing more
        await client.dma_map(0x600000, 0x1000, fd=files[0], offset=0x10000 - 0x1000)
        assert device.dma.files.held == 4
        assert (await client.get_device_info()).num_regions == 9
        for fd in files:
            os.close(fd)


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_a_process_out_of_fds_answers_emfile_and_backs_off_accepting(
    sock_dir: str,
) -> None:
    """One process serving two devices with 64 descriptors and no budget to speak of:
    client A maps distinct files until the process has none left. Its next DMA_MAP is
    EMFILE (its fd could not even be received), its connection goes on, device B's
    client waits without the accept loop spinning, and is served once A leaves."""
    first, second = os.path.join(sock_dir, "a.sock"), os.path.join(sock_dir, "b.sock")
    process = serve_in_a_process(
        "gpio", "gpio", "--socket", first, "--socket", second, "--fd-budget", "100000", nofile=64
    )
    try:
        wait_for_sockets(process, first, second)
        a = socket.socket(socket.AF_UNIX)
        a.settimeout(5)
        a.connect(first)
        a.sendall(version_request())
        a.recv(4096)
        errors = []
        for index in range(100):
            ram = memfd(0x1000, sealable=False)
            map_request = DmaMap(
                32,
                RW | (DmaMapFlag.FILE_IO if index % 2 else 0),
                0,
                0x100000 * (index + 1),
                0x1000,
            ).build()
            _, error = blocking_request(a, index, Command.DMA_MAP, map_request, [ram])
            os.close(ram)
            errors.append(error)
            if errors[-3:] == [errno.EMFILE] * 3:
                break
        assert errno.EMFILE in errors
        info = struct.pack("<4I", 16, 0, 0, 0)
        assert blocking_request(a, 999, Command.DEVICE_GET_INFO, info) == (FLAGS_REPLY, 0)
        b = socket.socket(socket.AF_UNIX)
        b.settimeout(8)
        b.connect(second)
        b.sendall(version_request())
        cpu_before = _cpu_seconds(process.pid)
        time.sleep(1.0)
        assert _cpu_seconds(process.pid) - cpu_before < 0.3, "the accept loop spins"
        a.close()
        header = b.recv(16, socket.MSG_WAITALL)
        assert len(header) == 16, "device B's client was never served"
        b.close()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    assert sum(line["event"] == "cannot accept a client; retrying" for line in lines) <= 2


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# 8. SET_IRQS loopback; 9. DEVICE_FEATURE SET with a short argsz


class Interrupting(PciDevice):
    def __init__(self) -> None:
        super().__init__(
            vendor_id=0x1234,
            device_id=0x5678,
            bars={0: Bar(0x4000)},
            intx=True,
            capabilities=[
                Msi(vectors=2),
                MsiX(table_size=2, table_bar=0, table_offset=0x2000, pba_bar=0, pba_offset=0x3000),
            ],
        )


async def test_loopback_trigger_signals_whatever_the_guest_enabled(sock_path: str) -> None:
    """The guest has enabled neither MSI nor MSI-X and INTx is masked: the client's
    TRIGGER with DATA_NONE or DATA_BOOL still signals the eventfds, as Linux does."""
    device = Interrupting()
    eventfds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    async with Server(device, sock_path), await Client.connect(sock_path) as client:
        trigger_eventfd = IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.DATA_EVENTFD
        await client.set_irqs(IrqIndex.MSIX, trigger_eventfd, 0, 2, fds=eventfds)
        await client.set_irqs(IrqIndex.MSIX, IrqSetFlag.ACTION_MASK | IrqSetFlag.DATA_NONE, 0, 2)
        await client.set_irqs(
            IrqIndex.MSIX, IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.DATA_NONE, 0, 1
        )
        trigger_bool = IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.DATA_BOOL
        await client.set_irqs(IrqIndex.MSIX, trigger_bool, 0, 2, data=b"\0\x02")
        assert [os.eventfd_read(fd) for fd in eventfds] == [1, 1]
        assert device.irqs.msix.delivered == 0, "a loopback is not the device's interrupt"
        assert not device.irqs.msix.is_pending(0)
    for fd in eventfds:
        os.close(fd)


async def test_feature_set_with_a_short_argsz_is_refused_before_acting(sock_path: str) -> None:
    device = PciDevice(vendor_id=1, device_id=2, migration=Migration())
    state = MigDeviceState(MigrationState.STOP, 0).build()
    flags = FeatureFlag.SET | 2
    async with Server(device, sock_path), await Client.connect(sock_path) as client:
        for argsz in (8, 15):
            request = DeviceFeature(argsz, flags, state).build()
            reply = await client.exchange(Command.DEVICE_FEATURE, request)
            assert (reply.is_error, reply.error) == (True, errno.EINVAL)
        assert device.migration is not None
        assert device.migration.state is MigrationState.RUNNING
        await client.set_migration_state(MigrationState.STOP)
        assert device.migration.state is MigrationState.STOP
