"""The minimal type-0 config space: masks, BAR sizing and reset."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from muser import Bar, BarKind, PciDevice, VfioUserError
from muser.pci.config import Reg


def make(**bars: Bar) -> PciDevice:
    return PciDevice(
        vendor_id=0x1234,
        device_id=0x5678,
        class_code=0x020000,
        bars={int(name[3:]): bar for name, bar in bars.items()},
    )


def size_bar(device: PciDevice, index: int) -> int:
    register = Reg.BAR0 + 4 * index
    device.config.write(register, b"\xff\xff\xff\xff")
    return device.config.register(register, 4)


@pytest.mark.parametrize(
    ("bar", "readback"),
    [
        (Bar(0x1000), 0xFFFFF000),
        (Bar(16), 0xFFFFFFF0),
        (Bar(1 << 31), 0x80000000),
        (Bar(0x100, kind=BarKind.IO), 0xFFFFFF01),
        (Bar(4, kind=BarKind.IO), 0xFFFFFFFD),
        (Bar(0x4000, kind=BarKind.PREFETCHABLE), 0xFFFFC008),
    ],
)
def test_bar_sizing(bar: Bar, readback: int) -> None:
    assert size_bar(make(bar0=bar), 0) == readback


def test_64bit_bar_sizing() -> None:
    device = make(bar2=Bar(1 << 33, kind=BarKind.PREFETCHABLE_64))
    assert device.config.register(Reg.BAR0 + 8, 4) == 0xC
    assert size_bar(device, 2) == 0x0000000C
    assert size_bar(device, 3) == 0xFFFFFFFE


def test_unimplemented_bar_reads_zero() -> None:
    assert size_bar(make(), 1) == 0


def test_bar_programming_is_readable_by_device_code() -> None:
    device = make(bar0=Bar(0x1000))
    device.config.write(Reg.BAR0, (0xFEBF1234).to_bytes(4, "little"))
    assert device.config.register(Reg.BAR0, 4) == 0xFEBF1000


def test_status_error_bits_are_write_one_to_clear() -> None:
    device = make()
    device.config._data[Reg.STATUS + 1] = 0xF9
    device.config.write(Reg.STATUS, b"\x00\x08")
    assert device.config.register(Reg.STATUS, 2) == 0xF100
    device.config.write(Reg.STATUS, b"\xff\xff")
    assert device.config.register(Reg.STATUS, 2) == 0


def test_straddling_write() -> None:
    device = make()
    device.config.write(Reg.CACHE_LINE_SIZE - 1, b"\xaa\x10\x20\xff")
    config = device.config.read(0, 16)
    assert config[Reg.CACHE_LINE_SIZE : Reg.CACHE_LINE_SIZE + 3] == b"\x10\x20\x00"
    assert config[Reg.CLASS_CODE + 2] == 0x02


def test_reset_restores_power_on_values() -> None:
    device = make(bar0=Bar(0x1000))
    original = device.config.read(0, 256)
    device.config.write(0, b"\xff" * 256)
    assert device.config.read(0, 256) != original
    device.config.reset()
    assert device.config.read(0, 256) == original


def test_out_of_range_access() -> None:
    with pytest.raises(VfioUserError) as caught:
        make().config.read(250, 8)
    assert caught.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, "power of two"),
        ({"size": 0x1800}, "power of two"),
        ({"size": 8}, "at least 16"),
        ({"size": 512, "kind": BarKind.IO}, "I/O BAR size"),
        ({"size": 2, "kind": BarKind.IO}, "power of two|I/O BAR size"),
        ({"size": 1 << 32}, "2 GiB"),
        ({"size": 1 << 32, "kind": BarKind.PREFETCHABLE}, "2 GiB"),
    ],
)
def test_impossible_bars_fail_at_declaration(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Bar(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bars", "match"),
    [
        ({6: Bar(16)}, "not 0…5"),
        ({5: Bar(16, kind=BarKind.MEMORY_64)}, "needs BAR6"),
        ({0: Bar(16, kind=BarKind.MEMORY_64), 1: Bar(16)}, "needs BAR1"),
    ],
)
def test_impossible_bar_layouts(bars: dict[int, Bar], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PciDevice(vendor_id=1, device_id=1, bars=bars)


@pytest.mark.parametrize(
    ("identity", "match"),
    [
        ({"vendor_id": 0x10000}, "vendor_id 0x10000 does not fit in 16 bits"),
        ({"device_id": -1}, "device_id -0x1 does not fit in 16 bits"),
        ({"revision": 0x100}, "revision 0x100 does not fit in 8 bits"),
        ({"class_code": 1 << 24}, "class_code 0x1000000 does not fit in 24 bits"),
        ({"subsystem_id": 0x12345}, "subsystem_id"),
    ],
)
def test_identity_out_of_range_names_the_field(identity: dict[str, int], match: str) -> None:
    fields = {"vendor_id": 1, "device_id": 1} | identity
    with pytest.raises(ValueError, match=match):
        PciDevice(**fields)
