"""The session core in memory: a server's and a client's, back to back, with no socket
and no event loop (tests/session_pair.py). Negotiation, each command's refusal, the
order of posted writes, message DMA in both layouts, closing in every state, and the
deadlines, all by bytes in and messages out."""

from __future__ import annotations

import errno
import os

import pytest

from muser import Bar, DisconnectReason, PciDevice, VfioUserError
from muser.device.dma_messages import DmaLayout
from muser.session import TRANSITIONS, Lifecycle, LifecycleError, SessionSettings
from muser.session.commands import COMMANDS
from muser.session.server import SHUTDOWN_GRACE
from muser.session.state import check_transition
from muser.wire import build_capabilities
from muser.wire.constants import (
    FLAGS_REPLY,
    Command,
    DmaMapFlag,
    IrqSetFlag,
    MigrationState,
)
from muser.wire.messages import (
    DeviceFeature,
    DeviceInfo,
    DmaMap,
    DmaUnmap,
    IoFdsRequest,
    IrqInfo,
    IrqSet,
    MigDataRead,
    RegionAccess,
    RegionData,
    RegionInfo,
    Version,
    WriteMulti,
    WriteOne,
)
from muser_samples import timer
from tests.helpers import message, open_fds
from tests.session_pair import Pending, SessionPair

TRIGGER_NONE = int(IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.DATA_NONE)
CAPABILITIES = build_capabilities({"max_msg_fds": 8, "max_data_xfer_size": 1 << 20})


class CoreDevice(PciDevice):
    """BAR0: 256 bytes of memory. BAR1: 16 bytes whose handlers await a Pending the
    test resolves. BAR2: 16 bytes whose reads are refused (EPERM) and writes crash."""

    def __init__(self) -> None:
        self.memory = bytearray(256)
        self.slow = bytearray(16)
        self.log: list[tuple[str, int, bytes]] = []
        self.waiting: list[Pending] = []
        super().__init__(
            vendor_id=0x1AF4,
            device_id=0x10F2,
            intx=True,
            bars={
                0: Bar(256, read=self.read_memory, write=self.write_memory),
                1: Bar(16, read=self.read_slowly, write=self.write_slowly),
                2: Bar(16, read=self.refuse, write=self.crash),
            },
        )

    def read_memory(self, offset: int, count: int) -> bytes:
        self.log.append(("read", offset, b""))
        return bytes(self.memory[offset : offset + count])

    def write_memory(self, offset: int, data: bytes) -> None:
        self.log.append(("write", offset, data))
        self.memory[offset : offset + len(data)] = data

    async def read_slowly(self, offset: int, count: int) -> bytes:
        gate = Pending()
        self.waiting.append(gate)
        await gate
        self.log.append(("read_slowly", offset, b""))
        return bytes(self.slow[offset : offset + count])

    async def write_slowly(self, offset: int, data: bytes) -> None:
        gate = Pending()
        self.waiting.append(gate)
        await gate
        self.log.append(("write_slowly", offset, data))
        self.slow[offset : offset + len(data)] = data

    def refuse(self, offset: int, count: int) -> bytes:
        raise VfioUserError(errno.EPERM, "not now")

    def crash(self, offset: int, data: bytes) -> None:
        raise RuntimeError("device bug")

    def open_gates(self) -> None:
        while self.waiting:
            self.waiting.pop(0).resolve()


@pytest.fixture
def pair() -> SessionPair:
    return SessionPair(CoreDevice())


def negotiated(device: PciDevice | None = None, **options: object) -> SessionPair:
    pair = SessionPair(device or CoreDevice(), **options)  # type: ignore[arg-type]
    reply = pair.call(Command.VERSION, Version(0, 0, CAPABILITIES).build())
    assert reply.flags == FLAGS_REPLY
    return pair


def read_request(region: int, offset: int, count: int) -> bytes:
    return RegionAccess(offset, region, count).build()


def write_request(region: int, offset: int, data: bytes) -> bytes:
    return RegionData(offset, region, len(data), data).build()


# The lifecycle table


def test_every_transition_outside_the_table_is_refused() -> None:
    for old in Lifecycle:
        for new in Lifecycle:
            if new in TRANSITIONS[old]:
                check_transition(old, new)
            else:
                with pytest.raises(LifecycleError):
                    check_transition(old, new)
    assert TRANSITIONS[Lifecycle.CLOSED] == frozenset()
    assert all(
        Lifecycle.CLOSED in TRANSITIONS[state] for state in Lifecycle if state.name != "CLOSED"
    )


# Negotiation


def test_negotiation_makes_the_session_ready(pair: SessionPair) -> None:
    assert pair.session.state is Lifecycle.NEGOTIATING
    reply = pair.call(Command.VERSION, Version(0, 0, CAPABILITIES).build())
    assert not reply.is_error
    version = Version.parse(reply.payload)
    assert (version.major, version.minor) == (0, 0)
    assert b"max_msg_fds" in version.capabilities
    assert pair.session.state is Lifecycle.READY
    assert pair.server.events("info") == ["negotiated"]


@pytest.mark.parametrize(
    ("command", "payload"),
    [
        (Command.DEVICE_GET_INFO, DeviceInfo(16, 0, 0, 0).build()),
        (Command.VERSION, Version(1, 0, b"").build()),
        (Command.VERSION, Version(0, 0, b'{"capabilities": 7}\0').build()),
        (Command.VERSION, b"\0"),
        (0x7F, b""),
    ],
    ids=["another-command-first", "major-1", "bad-json", "short", "unknown-command"],
)
def test_a_failed_negotiation_is_answered_then_closed(
    pair: SessionPair, command: int, payload: bytes
) -> None:
    reply = pair.call(command, payload)
    assert (reply.is_error, reply.error) == (True, errno.EINVAL)
    assert pair.session.state is Lifecycle.CLOSED
    assert pair.server.closing is True, "flushed: the refusal reaches the client"
    assert pair.server.lost


def test_a_second_version_is_refused_and_the_session_goes_on() -> None:
    pair = negotiated()
    reply = pair.call(Command.VERSION, Version(0, 0, CAPABILITIES).build())
    assert (reply.is_error, reply.error) == (True, errno.EINVAL)
    assert pair.session.state is Lifecycle.READY


# Every command's refusal, negotiated


def _refusals() -> list[tuple[str, int, bytes, int]]:
    both = int(DmaMapFlag.READ | DmaMapFlag.WRITE)
    return [
        (
            "dma-map-unaligned",
            Command.DMA_MAP,
            DmaMap(32, both, 0, 0x1001, 0x1000).build(),
            errno.EINVAL,
        ),
        ("dma-map-short", Command.DMA_MAP, b"\0" * 8, errno.EINVAL),
        (
            "dma-unmap-unmapped",
            Command.DMA_UNMAP,
            DmaUnmap(24, 0, 0x100000, 0x1000, None).build(),
            errno.ENOENT,
        ),
        (
            "device-info-argsz",
            Command.DEVICE_GET_INFO,
            DeviceInfo(8, 0, 0, 0).build(),
            errno.EINVAL,
        ),
        (
            "region-info-index",
            Command.DEVICE_GET_REGION_INFO,
            RegionInfo(32, 0, 99, 0, 0, 0, b"").build(),
            errno.EINVAL,
        ),
        (
            "io-fds-index",
            Command.DEVICE_GET_REGION_IO_FDS,
            IoFdsRequest(16, 0, 99, 0).build(),
            errno.EINVAL,
        ),
        (
            "irq-info-index",
            Command.DEVICE_GET_IRQ_INFO,
            IrqInfo(16, 0, 99, 0).build(),
            errno.EINVAL,
        ),
        (
            "set-irqs-index",
            Command.DEVICE_SET_IRQS,
            IrqSet(20, TRIGGER_NONE, 99, 0, 1, b"").build(),
            errno.EINVAL,
        ),
        ("read-outside", Command.REGION_READ, read_request(0, 254, 4), errno.EINVAL),
        ("read-no-region", Command.REGION_READ, read_request(3, 0, 4), errno.EINVAL),
        ("read-refused", Command.REGION_READ, read_request(2, 0, 4), errno.EPERM),
        (
            "read-too-long-message",
            Command.REGION_READ,
            read_request(0, 0, 4) + b"\0",
            errno.EINVAL,
        ),
        ("write-outside", Command.REGION_WRITE, write_request(0, 255, b"ab"), errno.EINVAL),
        (
            "write-count-mismatch",
            Command.REGION_WRITE,
            RegionData(0, 0, 4, b"ab").build(),
            errno.EINVAL,
        ),
        ("write-crashes", Command.REGION_WRITE, write_request(2, 0, b"ab"), errno.EIO),
        ("reset-with-payload", Command.DEVICE_RESET, b"\0", errno.EINVAL),
        (
            "write-multi-outside",
            Command.REGION_WRITE_MULTI,
            WriteMulti(1, (WriteOne(255, 0, 4, bytes(8)),)).build(),
            errno.EINVAL,
        ),
        ("feature-argsz", Command.DEVICE_FEATURE, DeviceFeature(4, 0, b"").build(), errno.EINVAL),
        (
            "mig-data-read-no-migration",
            Command.MIG_DATA_READ,
            MigDataRead(8, 16).build(),
            errno.EINVAL,
        ),
        (
            "mig-data-write-no-migration",
            Command.MIG_DATA_WRITE,
            MigDataRead(8, 0).build(),
            errno.EINVAL,
        ),
        ("unknown", 0x7F, b"", errno.EINVAL),
        ("server-to-client-command", Command.DMA_READ, bytes(16), errno.EINVAL),
    ]


@pytest.mark.parametrize(
    ("command", "payload", "code"),
    [refusal[1:] for refusal in _refusals()],
    ids=[refusal[0] for refusal in _refusals()],
)
def test_each_command_refused_with_its_errno(command: int, payload: bytes, code: int) -> None:
    pair = negotiated()
    reply = pair.call(command, payload)
    assert (reply.is_error, reply.error) == (True, code)
    assert pair.session.state is Lifecycle.READY
    assert pair.call(Command.REGION_READ, read_request(0, 0, 4)).payload[-4:] == bytes(4)


def test_every_command_in_the_table_has_a_refusal_here() -> None:
    refused = {refusal[1] for refusal in _refusals()}
    assert set(COMMANDS) - {Command.VERSION} <= refused


@pytest.mark.parametrize("command", sorted(set(Command) - {Command.VERSION}), ids=lambda c: c.name)
def test_nothing_but_version_comes_first(command: Command) -> None:
    pair = SessionPair(CoreDevice())
    reply = pair.call(command, bytes(32))
    assert (reply.is_error, reply.error) == (True, errno.EINVAL)
    assert pair.session.state is Lifecycle.CLOSED
    assert pair.device.log == []  # type: ignore[attr-defined]


def test_a_migration_command_in_the_wrong_state_is_refused() -> None:
    pair = negotiated(timer.create())
    migration = pair.device.migration
    assert migration is not None
    assert migration.state is MigrationState.RUNNING
    reply = pair.call(Command.MIG_DATA_WRITE, MigDataRead(8, 0).build())
    assert (reply.is_error, reply.error) == (True, errno.EINVAL)
    reply = pair.call(Command.MIG_DATA_READ, MigDataRead(8, 16).build())
    assert (reply.is_error, reply.error) == (True, errno.EINVAL)


def test_lost_fds_are_refused_with_emfile() -> None:
    pair = negotiated()
    pair.send_raw(message(9, Command.DEVICE_RESET))
    data, fds = pair.client.pipe.take(len(pair.client.pipe.data))
    pair.session.data_received(data, fds, True)
    pair.pump()
    assert pair.client.pipe.data == b""
    assert (
        "a message's file descriptors were lost: the process has none left" in pair.server.events()
    )


# Order


def test_posted_writes_run_in_order_before_a_later_reply() -> None:
    pair = negotiated()
    device = pair.device
    assert isinstance(device, CoreDevice)
    for offset, value in ((0, b"\x01"), (1, b"\x02"), (0, b"\x03")):
        pair.post(Command.REGION_WRITE, write_request(1, offset, value))
    reply = pair.request(Command.REGION_READ, read_request(1, 0, 2))
    pair.post(Command.REGION_WRITE, write_request(0, 0, b"\x09"))
    pair.pump()
    assert pair.session.state is Lifecycle.BUSY
    assert not reply.done
    assert device.log == []
    for expected in range(1, 4):
        device.open_gates()
        pair.pump()
        assert len(device.log) == expected
        assert not reply.done
    device.open_gates()
    pair.pump()
    assert [entry[0] for entry in device.log] == ["write_slowly"] * 3 + ["read_slowly", "write"]
    assert reply.done
    assert reply.value.payload[-2:] == b"\x03\x02"
    assert pair.session.state is Lifecycle.READY


def test_a_posted_command_gets_no_reply_even_when_refused() -> None:
    pair = negotiated()
    pair.post(Command.REGION_READ, read_request(0, 1000, 4))
    pair.post(Command.REGION_WRITE, write_request(2, 0, b"x"))
    pair.pump()
    assert pair.client.replies == {}
    assert pair.server.pipe.data == b""
    assert pair.call(Command.REGION_READ, read_request(0, 0, 1)).payload[-1:] == b"\0"


def test_a_reply_to_nothing_is_refused_and_the_session_goes_on() -> None:
    pair = negotiated()
    pair.send_raw(message(77, Command.DMA_READ, b"", flags=FLAGS_REPLY))
    pair.pump()
    assert pair.session.state is Lifecycle.READY
    assert "unexpected reply" in pair.server.events("warning")


# Message DMA, both layouts


@pytest.mark.parametrize(
    ("server_layout", "client_layout"),
    [
        (DmaLayout.AUTO, DmaLayout.SPEC),
        (DmaLayout.AUTO, DmaLayout.QEMU),
        (DmaLayout.SPEC, DmaLayout.SPEC),
        (DmaLayout.QEMU, DmaLayout.QEMU),
    ],
)
def test_message_dma_in_either_layout(server_layout: DmaLayout, client_layout: DmaLayout) -> None:
    pair = negotiated(dma_layout=server_layout, client_layout=client_layout)
    flags = int(DmaMapFlag.READ | DmaMapFlag.WRITE)
    assert not pair.call(Command.DMA_MAP, DmaMap(32, flags, 0, 0x10000, 0x1000).build()).is_error
    guest = bytearray(0x1000)
    pair.client_session.guest[0x10000] = memoryview(guest)
    written = pair.run(pair.device.dma.write(0x10010, b"hello"))
    pair.pump()
    assert written.done
    assert written.value is None
    assert guest[0x10:0x15] == b"hello"
    guest[0x20:0x24] = b"abcd"
    read = pair.run(pair.device.dma.read(0x10020, 4))
    pair.pump()
    assert read.value == b"abcd"
    messenger = pair.device.dma.messenger
    assert messenger is not None
    assert messenger.layout is client_layout


def test_message_dma_in_the_wrong_fixed_layout_fails_with_eio() -> None:
    pair = negotiated(dma_layout=DmaLayout.SPEC, client_layout=DmaLayout.QEMU)
    flags = int(DmaMapFlag.READ | DmaMapFlag.WRITE)
    pair.call(Command.DMA_MAP, DmaMap(32, flags, 0, 0x10000, 0x1000).build())
    pair.client_session.guest[0x10000] = memoryview(bytearray(b"\xaa" * 0x1000))
    read = pair.run(pair.device.dma.read(0x10000, 4))
    pair.pump()
    assert isinstance(read.value, VfioUserError)
    assert read.value.errno == errno.EIO
    assert "DMA reply does not match its request" in pair.server.events("error")


def test_message_dma_inside_a_handler_is_refused() -> None:
    """The client waits for the handler's reply, so it cannot serve the DMA: the
    transfer raises at once instead of deadlocking."""

    class DmaInHandler(CoreDevice):
        async def write_slowly(self, offset: int, data: bytes) -> None:
            await self.dma.write(0x10000, data)

    pair = negotiated(DmaInHandler())
    flags = int(DmaMapFlag.READ | DmaMapFlag.WRITE)
    pair.call(Command.DMA_MAP, DmaMap(32, flags, 0, 0x10000, 0x1000).build())
    reply = pair.call(Command.REGION_WRITE, write_request(1, 0, b"x"))
    assert (reply.is_error, reply.error) == (True, errno.EIO)
    assert "handler failed" in pair.server.events("error")


# Closing, in every state


def _busy(pair: SessionPair) -> Pending:
    reply = pair.request(Command.REGION_WRITE, write_request(1, 0, b"\x05"))
    pair.request(Command.REGION_READ, read_request(0, 0, 1))
    pair.pump()
    assert pair.session.state is Lifecycle.BUSY
    return reply


def _draining(pair: SessionPair) -> Pending:
    reply = _busy(pair)
    pair.send_raw(b"\xff" * 16)  # a header whose size is below 16: the stream is broken
    pair.pump()
    assert pair.session.state is Lifecycle.DRAINING
    return reply


@pytest.mark.parametrize("state", list(Lifecycle), ids=lambda s: s.name)
@pytest.mark.parametrize("how", ["server", "client"])
def test_closing_in_every_state(state: Lifecycle, how: str) -> None:
    """Whoever closes, in whatever state: the session ends CLOSED, the command in
    flight (if any) is answered when the server closes gracefully, and no fd it
    was given stays open."""
    before = open_fds()
    device = CoreDevice()
    pair = SessionPair(device)
    if state is not Lifecycle.NEGOTIATING:
        pair.call(Command.VERSION, Version(0, 0, CAPABILITIES).build())
    in_flight: Pending | None = None
    if state in (Lifecycle.BUSY, Lifecycle.SHUTTING_DOWN):
        in_flight = _busy(pair)
    elif state is Lifecycle.DRAINING:
        in_flight = _draining(pair)
    if state in (Lifecycle.BUSY, Lifecycle.DRAINING, Lifecycle.SHUTTING_DOWN):
        fd = os.eventfd(0)
        pair.request(Command.DEVICE_RESET, b"", [fd])  # queued behind, holding an fd
        os.close(fd)
        pair.pump()
    if state is Lifecycle.SHUTTING_DOWN:
        pair.session.shut_down()
        assert pair.session.state is Lifecycle.SHUTTING_DOWN
    if state is Lifecycle.CLOSED:
        pair.session.shut_down()
        pair.pump()
        assert pair.session.state is Lifecycle.CLOSED
    assert pair.session.state is state

    if how == "server":
        pair.session.shut_down()
        pair.pump()
        device.open_gates()
        pair.pump()
        if in_flight is not None and state is not Lifecycle.DRAINING:
            assert in_flight.done
            assert not in_flight.value.is_error
    else:
        pair.leave()
        device.open_gates()
        pair.pump()
    assert pair.session.state is Lifecycle.CLOSED
    assert pair.server.lost
    assert pair.client.lost
    assert pair.server.timer is None
    assert open_fds() == before


@pytest.mark.parametrize(
    ("ending", "reason"),
    [
        ("leave", DisconnectReason.CLIENT_LEFT),
        ("shut_down", DisconnectReason.SERVER_CLOSING),
        ("broken", DisconnectReason.PROTOCOL_ERROR),
        ("half_message", DisconnectReason.TIMED_OUT),
    ],
)
def test_the_session_knows_why_it_ended(ending: str, reason: DisconnectReason) -> None:
    """What the device's `disconnected` hook is told; the first cause wins (a broken
    stream is closed by the session, then its peer is lost)."""
    pair = negotiated(settings=SessionSettings(message_timeout=1.0))
    assert pair.server.negotiations == 1
    if ending == "leave":
        pair.leave()
    elif ending == "shut_down":
        pair.session.shut_down()
    elif ending == "broken":
        pair.send_raw(b"\xff" * 16)
    else:
        pair.send_raw(message(5, Command.REGION_READ, read_request(0, 0, 4))[:10])
        pair.pump()
        pair.advance(1.1)
    pair.pump()
    assert pair.session.state is Lifecycle.CLOSED
    assert pair.server.lost
    assert pair.session.close_reason is reason


def test_a_client_that_never_negotiates_is_never_the_devices(pair: SessionPair) -> None:
    pair.call(Command.DEVICE_GET_INFO, DeviceInfo(16, 0, 0, 0).build())
    assert pair.session.state is Lifecycle.CLOSED
    assert pair.server.negotiations == 0


def test_a_graceful_close_is_cut_after_the_grace_time() -> None:
    pair = negotiated()
    reply = _busy(pair)
    pair.session.shut_down()
    pair.advance(SHUTDOWN_GRACE - 0.1)
    assert pair.session.state is Lifecycle.SHUTTING_DOWN
    pair.advance(0.2)
    assert pair.session.state is Lifecycle.CLOSED
    assert pair.server.closing is False
    assert not reply.done


def test_a_flushing_close_the_client_never_reads_is_cut_too() -> None:
    pair = negotiated()
    pair.server.pipe.backlogged = True
    pair.session.shut_down()
    assert pair.server.closing is True
    assert pair.server.timer is not None
    pair.client.lost = True  # the client reads nothing more
    pair.advance(SHUTDOWN_GRACE + 0.1)
    assert pair.server.closing is False


def test_a_handler_that_closes_the_server_still_gets_its_reply() -> None:
    class SwitchOff(CoreDevice):
        session: object = None

        def write_memory(self, offset: int, data: bytes) -> None:
            super().write_memory(offset, data)
            pair.session.shut_down()

    device = SwitchOff()
    pair = negotiated(device)
    first = pair.request(Command.REGION_WRITE, write_request(0, 0, b"a"))
    second = pair.request(Command.REGION_WRITE, write_request(0, 1, b"b"))
    pair.pump()
    assert first.done
    assert not first.value.is_error
    assert not second.done
    assert device.log == [("write", 0, b"a")]
    assert pair.session.state is Lifecycle.CLOSED


# Deadlines


def test_a_client_that_does_not_negotiate_in_time_is_cut() -> None:
    pair = SessionPair(CoreDevice(), settings=SessionSettings(negotiation_timeout=2.0))
    assert pair.server.timer == 2.0
    pair.advance(1.9)
    assert pair.session.state is Lifecycle.NEGOTIATING
    pair.advance(0.2)
    assert pair.session.state is Lifecycle.CLOSED
    assert pair.server.closing is False
    assert "client did not negotiate in time; closing" in pair.server.events("warning")


def test_negotiating_in_time_clears_the_deadline() -> None:
    pair = SessionPair(CoreDevice(), settings=SessionSettings(negotiation_timeout=2.0))
    pair.call(Command.VERSION, Version(0, 0, CAPABILITIES).build())
    assert pair.server.timer is None
    pair.advance(10)
    assert pair.session.state is Lifecycle.READY


def test_a_timer_that_fires_early_is_set_again() -> None:
    """uvloop rounds timers to milliseconds, so one may fire a hair early: the
    deadline must be asked for again, not forgotten."""
    pair = SessionPair(CoreDevice(), settings=SessionSettings(negotiation_timeout=2.0))
    pair.clock.now = 1.9995
    pair.server.timer = None
    pair.session.tick()
    assert pair.session.state is Lifecycle.NEGOTIATING
    assert pair.server.timer == 2.0


def test_a_message_that_stops_halfway_is_cut() -> None:
    pair = negotiated(settings=SessionSettings(message_timeout=1.0))
    pair.send_raw(message(5, Command.REGION_READ, read_request(0, 0, 4))[:10])
    pair.pump()
    assert pair.server.timer == 1.0
    pair.advance(1.1)
    assert pair.session.state is Lifecycle.CLOSED
    assert "a message did not arrive whole in time; closing" in pair.server.events("warning")


def test_a_slow_stream_of_whole_messages_is_not_cut() -> None:
    """Each message may take up to a period: one that began after a deadline was set
    gets a period of its own."""
    pair = negotiated(settings=SessionSettings(message_timeout=1.0))
    stream = b"".join(message(i, Command.REGION_READ, read_request(0, 0, 4)) for i in range(6))
    for position in range(0, len(stream), 20):
        pair.send_raw(stream[position : position + 20])
        pair.pump()
        pair.advance(0.6)
    assert pair.session.state is Lifecycle.READY


def test_unknown_flag_bits_are_ignored_and_an_unknown_type_breaks_the_stream() -> None:
    pair = negotiated()
    reply = pair.request(Command.REGION_READ, b"")  # a msg_id the client expects
    pair.client.pipe.discard()
    (msg_id,) = pair.client.replies
    pair.send_raw(message(msg_id, Command.REGION_READ, read_request(0, 0, 4), flags=0x100))
    pair.pump()
    assert reply.done
    assert reply.value.payload[-4:] == bytes(4)
    pair.send_raw(message(9, Command.REGION_READ, read_request(0, 0, 4), flags=0x2))
    pair.pump()
    assert pair.session.state is Lifecycle.CLOSED
    assert "protocol violation; closing the connection" in pair.server.events("warning")
