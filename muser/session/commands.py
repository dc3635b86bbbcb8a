"""The command table: for each command the server serves, how its request is read,
who handles it, and when it is allowed; and the dispatch through it. Commands not in
it are refused with EINVAL, as libvfio-user refuses them."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from muser.device.migration import SAVING
from muser.errors import ProtocolError, VfioUserError
from muser.session.context import Context
from muser.session.dma import dma_map, dma_unmap
from muser.session.features import device_feature
from muser.session.irqs import irq_info, set_irqs
from muser.session.migration import mig_data_read, mig_data_write, parse_mig_data_write
from muser.session.negotiation import version
from muser.session.outcome import Outcome
from muser.session.regions import (
    device_info,
    device_reset,
    region_info,
    region_io_fds,
    region_read,
    region_write,
    region_write_multi,
)
from muser.wire import Frame
from muser.wire.constants import Command, MigrationState, command_name
from muser.wire.messages import (
    DeviceFeature,
    DeviceInfo,
    DmaMap,
    DmaUnmap,
    Empty,
    IoFdsRequest,
    IrqInfo,
    IrqSet,
    MigDataRead,
    RegionAccess,
    RegionData,
    RegionInfo,
    Version,
    parse_write_multi,
)

Handler = Callable[[Context, Any, Frame], Outcome | Awaitable[Outcome]]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    parse: Callable[[bytes], Any]
    """The request from the payload (ProtocolError, so EINVAL, if it is not one)."""
    handler: Handler
    before_version: bool = False
    """Whether it may come before VERSION is negotiated (only VERSION may)."""
    migration_states: frozenset[MigrationState] | None = None
    """The migration states it is allowed in (EINVAL in others, or on a device that
    does not migrate); None: any state, migration or not. muser takes every other
    command in every state, stopped ones included, as Linux does: a stopped device
    still answers its registers; it is device activity (DMA, interrupts) that
    stopping holds back."""


COMMANDS: dict[int, CommandSpec] = {
    Command.VERSION: CommandSpec(Version.parse, version, before_version=True),
    Command.DMA_MAP: CommandSpec(DmaMap.parse, dma_map),
    Command.DMA_UNMAP: CommandSpec(DmaUnmap.parse, dma_unmap),
    Command.DEVICE_GET_INFO: CommandSpec(DeviceInfo.parse, device_info),
    Command.DEVICE_GET_REGION_INFO: CommandSpec(RegionInfo.parse, region_info),
    Command.DEVICE_GET_REGION_IO_FDS: CommandSpec(IoFdsRequest.parse, region_io_fds),
    Command.DEVICE_GET_IRQ_INFO: CommandSpec(IrqInfo.parse, irq_info),
    Command.DEVICE_SET_IRQS: CommandSpec(IrqSet.parse, set_irqs),
    Command.REGION_READ: CommandSpec(RegionAccess.parse, region_read),
    Command.REGION_WRITE: CommandSpec(RegionData.parse, region_write),
    Command.DEVICE_RESET: CommandSpec(Empty.parse, device_reset),
    Command.REGION_WRITE_MULTI: CommandSpec(parse_write_multi, region_write_multi),
    Command.DEVICE_FEATURE: CommandSpec(DeviceFeature.parse, device_feature),
    Command.MIG_DATA_READ: CommandSpec(MigDataRead.parse, mig_data_read, migration_states=SAVING),
    Command.MIG_DATA_WRITE: CommandSpec(
        parse_mig_data_write, mig_data_write, migration_states=frozenset({MigrationState.RESUMING})
    ),
}


def dispatch(context: Context, frame: Frame) -> Outcome | Awaitable[Outcome]:
    """Hand a command to its handler, or raise why it may not run now."""
    spec = COMMANDS.get(frame.command)
    if context.peer is None and (spec is None or not spec.before_version):
        raise ProtocolError("the first message must be VERSION")
    if frame.fds_lost:
        command = command_name(frame.command)
        context.log_limited(
            "warning",
            "a message's file descriptors were lost: the process has none left",
            command,
            command=command,
        )
        raise VfioUserError(errno.EMFILE, "the server had no descriptors left for its fds")
    if spec is None:
        raise ProtocolError(f"unknown command {frame.command}")
    states = spec.migration_states
    if states is not None:
        migration = context.device.migration
        if migration is None:
            raise ProtocolError("the device does not support migration")
        if migration.state not in states:
            raise ProtocolError(f"{command_name(frame.command)} in {migration.state.name}")
    return spec.handler(context, spec.parse(frame.payload), frame)
