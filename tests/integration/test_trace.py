"""Wire traces: a server records its sessions, the replayer plays the client's side
back at a fresh device and reports every reply that differs."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from muser import Client, Server
from muser.recording import Record, load
from muser.trace import replay
from muser.wire.constants import Command, IrqIndex, IrqSetFlag
from muser.wire.messages import RegionAccess
from muser_samples import gpio
from tests.helpers import open_fds

TRIGGER_EVENTFD = IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.DATA_EVENTFD


async def record_sessions(sock_path: str, trace: Path) -> None:
    """Two sessions with a gpio board: outputs, its interrupt wired to an eventfd,
    a memfd-backed DMA window at a file offset; then a second client."""
    async with Server(gpio.create(), sock_path, trace=trace):
        async with await Client.connect(sock_path) as client:
            await client.get_device_info()
            interrupt = os.eventfd(0)
            await client.set_irqs(IrqIndex.INTX, TRIGGER_EVENTFD, 0, 1, fds=[interrupt])
            os.close(interrupt)
            ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(ram, 0x3000)
            await client.dma_map(0x100000, 0x1000, fd=ram, offset=0x2000)
            os.close(ram)
            await client.region_read(2, gpio.IRQ_CONTROL, 1)
            await client.region_write(2, gpio.OUT_0_7, b"\x05")
            await client.region_read(2, gpio.IN_0_7, 1)
            outside = await client.exchange(Command.REGION_READ, RegionAccess(0x100, 2, 1).build())
            assert outside.error == errno.EINVAL
        async with await Client.connect(sock_path) as client:
            await client.region_read(2, gpio.OUT_0_7, 1)


def replay_command(trace: Path, device: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "muser.trace", "replay", str(trace), device],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
async def trace(sock_path: str, sock_dir: str) -> Path:
    path = Path(sock_dir) / "gpio.jsonl"
    await record_sessions(sock_path, path)
    return path


async def test_a_trace_records_every_message_in_the_vector_shape(trace: Path) -> None:
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert {tuple(sorted(line)) for line in lines} == {
        ("command", "dir", "error", "flags", "hex", "msg_id", "name", "nfds", "session")
    }
    records = load(trace)
    assert [record.direction for record in records] == ["c2s", "s2c"] * 10
    assert len({record.session for record in records}) == 2
    fds = {record.describe(): record.nfds for record in records if record.nfds}
    assert fds == {"VFIO_USER_DEVICE_SET_IRQS msg_id 2": 1, "VFIO_USER_DMA_MAP msg_id 3": 1}
    error = records[15]
    assert (error.command, error.flags, error.error) == (Command.REGION_READ, 0x21, 22)
    assert lines[0]["name"] == "VFIO_USER_VERSION"
    assert all(bytes.fromhex(line["hex"])[2] == line["command"] for line in lines)


async def test_replaying_against_the_same_device_matches(trace: Path) -> None:
    before = open_fds()
    assert await replay(load(trace), gpio.create()) == []
    assert open_fds() == before


async def test_replaying_reports_a_changed_reply(trace: Path) -> None:
    records = load(trace)
    read = records[13]
    assert read.command == Command.REGION_READ
    changed = read.data[:-1] + bytes([read.data[-1] ^ 0xFF])
    records[13] = Record(read.direction, changed, read.nfds, read.session)
    differences = await replay(records, gpio.create())
    assert len(differences) == 1
    assert "message 13 (VFIO_USER_REGION_READ msg_id 6)" in differences[0]
    assert f"recorded {changed.hex()}" in differences[0]
    assert f"replayed {read.data.hex()}" in differences[0]


async def test_the_command_line_replays_and_fails_on_a_difference(trace: Path) -> None:
    same = replay_command(trace, "gpio")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "10 replies identical" in same.stderr
    other = replay_command(trace, "null")
    assert other.returncode == 1
    assert "VFIO_USER_REGION_READ" in other.stdout
    assert "differences in 10 replies" in other.stderr


async def test_a_trace_that_cannot_be_written_stops_but_the_session_goes_on(
    sock_path: str,
) -> None:
    """/dev/full fails every write, as a full disk would."""
    async with Server(gpio.create(), sock_path, trace="/dev/full"):
        async with await Client.connect(sock_path) as client:
            assert (await client.get_device_info()).num_regions == 9
        async with await Client.connect(sock_path) as client:
            await client.region_read(7, 0, 4)
