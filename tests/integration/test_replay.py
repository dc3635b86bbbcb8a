"""Replay what QEMU's vfio-user-pci sent while booting a Linux guest (the golden
transcripts), with real fds where it sent fds, in the order and with the
pipelining it used: every request gets one reply, in order, and nothing leaks."""

from __future__ import annotations

import asyncio
import os

import pytest

from muser import Server
from muser.wire import close_fds
from muser.wire.constants import Command
from muser.wire.messages import RegionAccess
from tests.helpers import RawPeer, open_fds
from tests.vectors import VECTOR_DIR, load

GUEST_RAM = 1 << 30
"""At least the 512 MiB the recorded guest had: a window may not end past its file."""


def fresh_fds(command: int, count: int) -> list[int]:
    if command == Command.DMA_MAP:
        fds = [
            os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            for _ in range(count)
        ]
        for fd in fds:
            os.ftruncate(fd, GUEST_RAM)
        return fds
    return [os.eventfd(0) for _ in range(count)]


@pytest.mark.parametrize("file", ["qemu-gpio-guest.json", "qemu-gpio-guest-nofd.json"])
async def test_replay_qemu_boot(server: Server, file: str) -> None:
    before = open_fds()
    records = load(VECTOR_DIR / file)
    peer = await RawPeer.connect(server.path)
    outstanding: list[RegionAccess | None] = []
    requests: list[tuple[int, int]] = []
    answered = 0
    for record in records:
        if record.direction == "c2s":
            fds = fresh_fds(record.command, record.nfds)
            peer.send(record.data, fds)
            close_fds(fds)
            requests.append((record.msg_id, record.command))
            read = record.command == Command.REGION_READ
            outstanding.append(RegionAccess.parse(record.data[16:]) if read else None)
            continue
        header, payload = await peer.receive()
        assert (header.msg_id, header.command) == requests.pop(0)
        read = outstanding.pop(0)
        assert header.flags == 1, header
        if read is not None:
            assert len(payload) == 16 + read.count
        answered += 1
    assert answered == 399
    assert not requests
    peer.close()
    await server.wait_closed()
    while server.connection is not None:
        await asyncio.sleep(0.001)
    assert open_fds() == before
