"""Migration commands: the MIGRATION and MIG_DEVICE_STATE features of
DEVICE_FEATURE, and MIG_DATA_READ/MIG_DATA_WRITE (the device's
`MigrationController` walks the states and holds the streams)."""

from __future__ import annotations

from collections.abc import Awaitable

from muser.device.migration import MigrationController
from muser.errors import ProtocolError
from muser.session.context import Context
from muser.session.outcome import Outcome
from muser.session.regions import after
from muser.wire import Frame
from muser.wire.constants import Feature, FeatureFlag, MigrationState
from muser.wire.messages import (
    MIG_DATA_PREFIX,
    DeviceFeature,
    MigData,
    MigDataRead,
    MigDeviceState,
    MigrationFeature,
)

_GET = int(FeatureFlag.GET)


def controller(context: Context) -> MigrationController:
    migration = context.device.migration
    if migration is None:
        raise ProtocolError("the device does not support migration")
    return migration


def migration_feature(context: Context, request: DeviceFeature) -> Outcome | Awaitable[Outcome]:
    """GET MIGRATION, or GET or SET MIG_DEVICE_STATE (already checked by the caller)."""
    migration = controller(context)
    if request.flags & _GET:
        if request.feature == Feature.MIGRATION:
            data = MigrationFeature(migration.flags).build()
        else:
            data = MigDeviceState(migration.state, 0).build()
        if request.argsz < DeviceFeature.SIZE + len(data):
            raise ProtocolError("DEVICE_FEATURE GET needs room for the feature's data")
        return DeviceFeature(DeviceFeature.SIZE + len(data), request.flags, data)
    target = MigDeviceState.parse(request.data).device_state
    try:
        state = MigrationState(target)
    except ValueError:
        raise ProtocolError(f"migration state {target} does not exist") from None
    context.log("info", "migration state", current=migration.state.name, target=state.name)
    return after(migration.set_state(state), request)


async def mig_data_read(context: Context, request: MigDataRead, frame: Frame) -> Outcome:
    limit = context.peer.max_data_xfer_size if context.peer is not None else 0
    if request.size > min(limit, context.max_data_xfer_size):
        raise ProtocolError(f"MIG_DATA_READ of {request.size} bytes is over the limit")
    if request.argsz < MigData.SIZE + request.size:
        raise ProtocolError("MIG_DATA_READ argsz is too small for the data asked")
    data = await controller(context).read(request.size)
    # argsz and size say how much is data; the message is padded with zeros to the
    # size asked for, as libvfio-user sends it and its client reads it.
    padded = data if len(data) == request.size else data + bytes(request.size - len(data))
    return MigData(MigData.SIZE + len(data), len(data), padded)


def parse_mig_data_write(payload: bytes) -> memoryview:
    """MIG_DATA_WRITE's data, a view of the payload: a megabyte, passed on uncopied."""
    if len(payload) < MIG_DATA_PREFIX.size:
        raise ProtocolError(f"MIG_DATA_WRITE payload of {len(payload)} bytes")
    argsz, size = MIG_DATA_PREFIX.unpack_from(payload)
    data = memoryview(payload)[MIG_DATA_PREFIX.size :]
    if size != len(data) or argsz < MIG_DATA_PREFIX.size + size:
        raise ProtocolError("MIG_DATA_WRITE size and data disagree")
    return data


def mig_data_write(context: Context, data: memoryview, frame: Frame) -> Outcome:
    controller(context).write(data)
    return None
