"""DEVICE_FEATURE: its flags checked as Linux's vfio_check_feature checks them, then
the feature served: DMA logging for every device, migration for one that declared it
(one without refuses the migration features with EINVAL, as libvfio-user does)."""

from __future__ import annotations

from collections.abc import Awaitable

from muser.errors import ProtocolError
from muser.session.context import Context
from muser.session.migration import migration_feature
from muser.session.outcome import Outcome
from muser.wire import Frame
from muser.wire.constants import Feature, FeatureFlag
from muser.wire.messages import (
    DeviceFeature,
    DmaLoggingReport,
    DmaLoggingStart,
    MigDeviceState,
    MigrationFeature,
)

_GET, _SET, _PROBE = int(FeatureFlag.GET), int(FeatureFlag.SET), int(FeatureFlag.PROBE)
"""Plain ints: `flags & FeatureFlag.GET` goes through IntFlag's __rand__, a
microsecond or more each."""
_KNOWN_FEATURE_BITS = int(FeatureFlag.INDEX_MASK) | _GET | _SET | _PROBE
_FEATURE_OPS: dict[int, int] = {
    Feature.DMA_LOGGING_START: _SET,
    Feature.DMA_LOGGING_STOP: _SET,
    Feature.DMA_LOGGING_REPORT: _GET,
}
"""The operations muser serves for every device, by feature."""
_MIGRATION_FEATURE_OPS: dict[int, int] = {
    Feature.MIGRATION: _GET,
    Feature.MIG_DEVICE_STATE: _GET | _SET,
}
"""And for a device that declared migration."""
_FEATURE_DATA_SIZES: dict[int, int] = {
    Feature.MIGRATION: MigrationFeature.SIZE,
    Feature.MIG_DEVICE_STATE: MigDeviceState.SIZE,
    Feature.DMA_LOGGING_START: DmaLoggingStart.SIZE,
    Feature.DMA_LOGGING_STOP: 0,
    Feature.DMA_LOGGING_REPORT: DmaLoggingReport.SIZE,
}
"""The least data each feature's structure has: `argsz` must cover it for GET and
SET (Linux's vfio_check_feature `minsz`)."""


def device_feature(
    context: Context, request: DeviceFeature, frame: Frame
) -> Outcome | Awaitable[Outcome]:
    flags, feature = request.flags, request.feature
    probe = bool(flags & _PROBE)
    operations = flags & (_GET | _SET)
    if flags & ~_KNOWN_FEATURE_BITS:
        raise ProtocolError(f"unknown DEVICE_FEATURE flag bits in {flags:#x}")
    if not operations and not probe:
        raise ProtocolError("DEVICE_FEATURE without GET, SET or PROBE")
    if operations == _GET | _SET and not probe:
        raise ProtocolError("DEVICE_FEATURE GET and SET together without PROBE")
    supported = _FEATURE_OPS.get(feature)
    if supported is None and context.device.migration is not None:
        supported = _MIGRATION_FEATURE_OPS.get(feature)
    if supported is None:
        raise ProtocolError(f"feature {feature} is not supported by this device")
    if operations & ~supported:
        raise ProtocolError(f"feature {feature} does not support operations {operations:#x}")
    if request.argsz < len(frame.payload) and not operations & _GET:
        raise ProtocolError("DEVICE_FEATURE argsz is smaller than the request")
    if probe:
        return request
    if request.argsz < DeviceFeature.SIZE + _FEATURE_DATA_SIZES[feature]:
        # Refused before anything is acted on, as Linux's vfio_check_feature does.
        raise ProtocolError(f"DEVICE_FEATURE argsz {request.argsz} is too small for it")
    if feature in _MIGRATION_FEATURE_OPS:
        return migration_feature(context, request)
    dma = context.device.dma
    if feature == Feature.DMA_LOGGING_STOP:
        dma.logging_stop()
        return request
    if feature == Feature.DMA_LOGGING_START:
        start = DmaLoggingStart.parse(request.data)
        dma.logging_start(start.page_size, [(item.iova, item.length) for item in start.ranges])
        return request
    return _logging_report(context, request)


def _logging_report(context: Context, request: DeviceFeature) -> DeviceFeature:
    report = DmaLoggingReport.parse(request.data)
    if report.bitmap:
        raise ProtocolError("a DMA_LOGGING_REPORT request carries no bitmap")
    dma = context.device.dma
    bitmap_size = dma.report_size(report.iova, report.length, report.page_size)
    needed = DeviceFeature.SIZE + DmaLoggingReport.SIZE + bitmap_size
    if bitmap_size > context.max_data_xfer_size:
        raise ProtocolError(
            "a DMA_LOGGING_REPORT bitmap must fit in one message; "
            "ask for a shorter range or larger pages"
        )
    if request.argsz < needed:
        raise ProtocolError(f"DMA_LOGGING_REPORT needs argsz {needed}")
    bitmap = dma.logging_report(report.iova, report.length, report.page_size)
    data = DmaLoggingReport(report.iova, report.length, report.page_size, bitmap).build()
    return DeviceFeature(DeviceFeature.SIZE + len(data), request.flags, data)
