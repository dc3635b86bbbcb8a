"""Capabilities in config space: placement, chaining, and every access rule."""

from __future__ import annotations

import asyncio

import pytest

from muser import (
    Bar,
    BarKind,
    ConfigRegisters,
    DeviceSerialNumber,
    Msi,
    MsiX,
    PciDevice,
    PcieType,
    PciExpress,
    PowerManagement,
    ResetReason,
    VendorSpecific,
    VendorSpecificExtended,
)
from muser.pci import Reg
from muser.pci.capabilities import Capability, ExtendedCapability


def make(
    *capabilities: Capability, extended: tuple[ExtendedCapability, ...] = (), **kwargs: object
) -> PciDevice:
    bars = kwargs.pop("bars", {0: Bar(0x4000, read=lambda o, n: bytes(n))})
    return PciDevice(
        vendor_id=0x1234,
        device_id=0x5678,
        bars=bars,  # type: ignore[arg-type]
        capabilities=capabilities,
        extended_capabilities=extended,
        **kwargs,
    )  # type: ignore[arg-type]


def write(device: PciDevice, offset: int, value: int, size: int) -> None:
    assert device.write_config(offset, value.to_bytes(size, "little")) is None


def reg(device: PciDevice, offset: int, size: int) -> int:
    return device.config.register(offset, size)


def test_no_capabilities() -> None:
    device = make()
    assert reg(device, Reg.STATUS, 2) & 0x10 == 0
    assert reg(device, Reg.CAPABILITIES_POINTER, 1) == 0
    assert device.config.size == 256


def test_chain_follows_declaration_order() -> None:
    pm, msi, vendor = PowerManagement(), Msi(), VendorSpecific(data=b"ab")
    device = make(pm, msi, vendor)
    assert reg(device, Reg.STATUS, 2) & 0x10
    offsets = [device.config.offset_of(c) for c in (pm, msi, vendor)]
    assert offsets == [0x40, 0x48, 0x58]
    assert reg(device, Reg.CAPABILITIES_POINTER, 1) == 0x40
    assert [reg(device, o + 1, 1) for o in offsets] == [0x48, 0x58, 0]
    assert [reg(device, o, 1) for o in offsets] == [0x01, 0x05, 0x09]


def test_pinned_offsets_and_chain_order() -> None:
    msi, pm = Msi(offset=0xC0), PowerManagement()
    device = make(msi, pm)
    assert device.config.offset_of(msi) == 0xC0
    assert device.config.offset_of(pm) == 0xD0, "after the previous one, dword aligned"
    assert reg(device, Reg.CAPABILITIES_POINTER, 1) == 0xC0
    assert reg(device, 0xC1, 1) == 0xD0


@pytest.mark.parametrize(
    ("capabilities", "match"),
    [
        ((Msi(offset=0x42),), "dword"),
        ((Msi(offset=0x3C),), "dword"),
        ((Msi(offset=0xF8),), "dword"),
        ((Msi(offset=0x40), PowerManagement(offset=0x44)), "overlaps"),
        (tuple(VendorSpecific(data=bytes(60)) for _ in range(4)), "no room"),
    ],
)
def test_impossible_placements(capabilities: tuple[Capability, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(*capabilities)


def test_capability_headers_are_read_only() -> None:
    msi = Msi()
    device = make(PowerManagement(), msi)
    before = device.config.read(0x40, 0x20)
    write(device, 0x40, 0xFFFF, 2)
    write(device, 0x48, 0x0000, 2)
    assert device.config.read(0x40, 2) == before[0:2]
    assert device.config.read(0x48, 2) == before[8:10]


def test_interrupt_pin() -> None:
    assert reg(make(intx=True), Reg.INTERRUPT_PIN, 1) == 1
    assert reg(make(), Reg.INTERRUPT_PIN, 1) == 0
    device = make(intx=True)
    write(device, Reg.INTERRUPT_PIN, 4, 1)
    assert reg(device, Reg.INTERRUPT_PIN, 1) == 1


def test_command_register() -> None:
    memory_only = make()
    write(memory_only, Reg.COMMAND, 0xFFFF, 2)
    assert reg(memory_only, Reg.COMMAND, 2) == 0x0546
    with_io = make(bars={2: Bar(16, kind=BarKind.IO, read=lambda o, n: bytes(n))})
    write(with_io, Reg.COMMAND, 0xFFFF, 2)
    assert reg(with_io, Reg.COMMAND, 2) == 0x0547


def test_header_type_bist_and_cardbus_are_read_only() -> None:
    device = make()
    for register, size in (
        (Reg.HEADER_TYPE, 1),
        (Reg.BIST, 1),
        (Reg.CARDBUS_CIS, 4),
        (Reg.MIN_GNT, 2),
        (0x35, 4),
    ):
        write(device, register, (1 << 8 * size) - 1, size)
        assert reg(device, register, size) == 0


def test_latency_timer_is_read_only_on_pci_express() -> None:
    conventional, express = make(), make(PciExpress())
    for device in (conventional, express):
        write(device, Reg.LATENCY_TIMER, 0x40, 1)
    assert reg(conventional, Reg.LATENCY_TIMER, 1) == 0x40
    assert reg(express, Reg.LATENCY_TIMER, 1) == 0


def test_whole_space_and_straddling_accesses() -> None:
    device = make(PowerManagement(), Msi(per_vector_masking=True, vectors=8))
    assert len(device.config.read(0, 256)) == 256
    assert device.write_config(0x3C, b"\xff" * 12) is None
    data = device.config.read(0x3C, 12)
    assert data[:4] == b"\xff\x00\x00\x00", "line written; pin, min_gnt, max_lat read-only"
    assert data[4:8] == b"\x01\x48\x03\x00", "PM header and PMC unchanged"
    assert data[8:10] == b"\x0b\x00", "PowerState took the written D3hot, nothing else"
    device.write_config(0, bytes(256))
    assert reg(device, Reg.VENDOR_ID, 2) == 0x1234


class TestPowerManagement:
    def test_states(self) -> None:
        pm = PowerManagement()
        device = make(pm)
        pmcsr = device.config.offset_of(pm) + PowerManagement.PMCSR
        assert reg(device, pmcsr, 2) == 0x0008, "D0, No_Soft_Reset"
        write(device, pmcsr, 0x0003, 2)
        assert reg(device, pmcsr, 2) == 0x000B
        write(device, pmcsr, 0x0001, 2)
        assert reg(device, pmcsr, 2) == 0x000B, "D1 is not supported: ignored"
        write(device, pmcsr, 0x0000, 2)
        assert reg(device, pmcsr, 2) == 0x0008

    def test_optional_states_and_pme(self) -> None:
        pm = PowerManagement(d1=True, d2=True, pme_support=0b11001)
        device = make(pm)
        base = device.config.offset_of(pm)
        assert reg(device, base + 2, 2) == 0x3 | 1 << 9 | 1 << 10 | 0b11001 << 11
        write(device, base + 4, 0x0102, 2)
        assert reg(device, base + 4, 2) == 0x010A
        device.config.set_register(base + 4, 2, 0x810A)
        write(device, base + 4, 0x8000, 2)
        assert reg(device, base + 4, 2) == 0x0008, "PME_Status cleared by writing 1"

    def test_pme_enable_is_read_only_without_pme(self) -> None:
        pm = PowerManagement()
        device = make(pm)
        write(device, device.config.offset_of(pm) + 4, 0x8100, 2)
        assert reg(device, device.config.offset_of(pm) + 4, 2) == 0x0008


class TestMsi:
    @pytest.mark.parametrize(
        ("address_64", "masking", "size", "data_at", "mask_at"),
        [
            (False, False, 0x0A, 0x08, None),
            (True, False, 0x0E, 0x0C, None),
            (False, True, 0x14, 0x08, 0x0C),
            (True, True, 0x18, 0x0C, 0x10),
        ],
    )
    def test_layouts(
        self, address_64: bool, masking: bool, size: int, data_at: int, mask_at: int | None
    ) -> None:
        msi = Msi(vectors=8, address_64=address_64, per_vector_masking=masking)
        assert (msi.size, msi.data_offset, msi.mask_offset) == (size, data_at, mask_at)
        device = make(msi, PowerManagement())
        base = device.config.offset_of(msi)
        control = reg(device, base + 2, 2)
        assert control == 3 << 1 | address_64 << 7 | masking << 8
        write(device, base + 4, 0xFEE0_0003, 4)
        assert reg(device, base + 4, 4) == 0xFEE0_0000
        write(device, base + data_at, 0x4321, 2)
        assert reg(device, base + data_at, 2) == 0x4321
        if address_64:
            write(device, base + 8, 0xFFFF_FFFF, 4)
            assert reg(device, base + 8, 4) == 0xFFFF_FFFF
        if mask_at is not None:
            write(device, base + mask_at, 0xFFFF_FFFF, 4)
            assert reg(device, base + mask_at, 4) == 0xFF
            write(device, base + mask_at + 4, 0xFFFF_FFFF, 4)
            assert reg(device, base + mask_at + 4, 4) == 0, "pending bits are read-only"
        assert device.config.offset_of(device.config.capabilities[1][0]) == base + (
            -(-size // 4) * 4
        )

    def test_enable_and_multiple_message_enable(self) -> None:
        msi = Msi(vectors=4)
        device = make(msi)
        control = device.config.offset_of(msi) + Msi.CONTROL
        write(device, control, 0x0021, 2)
        assert reg(device, control, 2) == 0x00A5
        write(device, control, 0x0071, 2)
        assert reg(device, control, 2) & 0x70 == 0x20, "MME clamped to MMC"

    def test_extended_message_data(self) -> None:
        msi = Msi(address_64=False, extended_data=True)
        assert msi.size == 0x0C
        device = make(msi)
        base = device.config.offset_of(msi)
        write(device, base + 2, 0x0400, 2)
        write(device, base + 0x0A, 0xBEEF, 2)
        assert reg(device, base + 2, 2) & 0x400
        assert reg(device, base + 0x0A, 2) == 0xBEEF

    @pytest.mark.parametrize("vectors", [0, 3, 64])
    def test_vector_counts(self, vectors: int) -> None:
        with pytest.raises(ValueError, match="MSI vectors"):
            Msi(vectors=vectors)


class TestMsiX:
    def test_registers(self) -> None:
        msix = MsiX(table_size=32, table_bar=0, table_offset=0x2000, pba_bar=0, pba_offset=0x3000)
        device = make(msix)
        base = device.config.offset_of(msix)
        assert reg(device, base + 2, 2) == 31
        assert reg(device, base + 4, 4) == 0x2000
        assert reg(device, base + 8, 4) == 0x3000
        write(device, base + 2, 0xFFFF, 2)
        assert reg(device, base + 2, 2) == 0xC000 | 31
        write(device, base + 4, 0, 4)
        write(device, base + 8, 0, 4)
        assert reg(device, base + 4, 4) == 0x2000
        assert msix.pba_bytes == 8

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"table_bar": 1}, "memory BAR1"),
            ({"table_bar": 2}, "memory BAR2"),
            ({"pba_offset": 0x3FFC}, "8-byte aligned"),
            ({"pba_offset": 0x4000}, "past the end"),
            ({"table_offset": 0x3F08}, "past the end"),
            ({"pba_offset": 0x20F8}, "overlap"),
            ({"table_size": 0}, "1…2048"),
        ],
    )
    def test_checked_against_bars(self, kwargs: dict[str, int], match: str) -> None:
        spec = {
            "table_size": 16,
            "table_bar": 0,
            "table_offset": 0x2000,
            "pba_bar": 0,
            "pba_offset": 0x3000,
        } | kwargs
        bars = {
            0: Bar(0x4000, read=lambda o, n: bytes(n)),
            2: Bar(256, kind=BarKind.IO, read=lambda o, n: bytes(n)),
        }
        with pytest.raises(ValueError, match=match):
            make(MsiX(**spec), bars=bars)


class TestPciExpress:
    def test_config_space_grows_to_4096(self) -> None:
        device = make(PciExpress())
        assert device.config.size == 4096
        assert device.region_flags_and_size(7)[1] == 4096
        assert reg(device, 0x100, 4) == 0, "no extended capabilities"

    def test_device_control(self) -> None:
        express = PciExpress()
        device = make(express)
        control = device.config.offset_of(express) + PciExpress.DEVICE_CONTROL
        assert reg(device, control, 2) == 0x2810
        write(device, control, 0x7FFF, 2)
        assert reg(device, control, 2) == 0x79FF
        status = control + 2
        device.config.set_register(status, 2, 0x000F)
        write(device, status, 0x0005, 2)
        assert reg(device, status, 2) == 0x000A

    def test_initiate_flr_resets_the_function(self) -> None:
        resets: list[ResetReason] = []
        express = PciExpress()
        device = make(express)
        device.reset = resets.append  # type: ignore[assignment, method-assign]
        write(device, Reg.COMMAND, 0x0006, 2)
        control = device.config.offset_of(express) + PciExpress.DEVICE_CONTROL
        write(device, control, 0x8000 | 0x2810, 2)
        assert resets == [ResetReason.FLR]
        assert reg(device, Reg.COMMAND, 2) == 0, "config space back at power-on"
        assert reg(device, control, 2) & 0x8000 == 0, "Initiate FLR reads 0"

    def test_flr_needs_the_capability(self) -> None:
        resets: list[ResetReason] = []
        express = PciExpress(flr=False)
        device = make(express)
        device.reset = resets.append  # type: ignore[assignment, method-assign]
        write(device, device.config.offset_of(express) + PciExpress.DEVICE_CONTROL + 1, 0x80, 1)
        assert resets == []
        assert reg(device, device.config.offset_of(express) + 4, 4) & 1 << 28 == 0

    def test_async_reset_hook_on_flr(self) -> None:
        resets: list[ResetReason] = []

        async def reset(reason: ResetReason) -> None:
            await asyncio.sleep(0)
            resets.append(reason)

        express = PciExpress()
        device = make(express)
        device.reset = reset  # type: ignore[method-assign]
        offset = device.config.offset_of(express) + PciExpress.DEVICE_CONTROL
        pending = device.write_config(offset, (0x8000).to_bytes(2, "little"))
        assert pending is not None
        asyncio.run(pending)  # type: ignore[arg-type]
        assert resets == [ResetReason.FLR]

    def test_link(self) -> None:
        express = PciExpress(link_speed=4, link_width=8)
        device = make(express)
        base = device.config.offset_of(express)
        assert reg(device, base + PciExpress.LINK_CAPABILITIES, 4) == 4 | 8 << 4
        assert reg(device, base + PciExpress.LINK_STATUS, 2) == 4 | 8 << 4 | 1 << 12
        assert reg(device, base + PciExpress.LINK_CAPABILITIES_2, 4) == 0b11110
        write(device, base + PciExpress.LINK_CONTROL, 0xFFFF, 2)
        assert reg(device, base + PciExpress.LINK_CONTROL, 2) == 0x00CB
        write(device, base + PciExpress.LINK_STATUS, 0xFFFF, 2)
        assert reg(device, base + PciExpress.LINK_STATUS, 2) == 4 | 8 << 4 | 1 << 12

    def test_integrated_endpoint_has_no_link(self) -> None:
        express = PciExpress(device_type=PcieType.RC_INTEGRATED_ENDPOINT)
        device = make(express)
        base = device.config.offset_of(express)
        assert reg(device, base + 2, 2) == 0x92
        assert device.config.read(base + 0x0C, 0x30) == bytes(0x30)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"max_payload_size": 100}, "max_payload_size"),
            ({"link_speed": 6}, "link_speed"),
            ({"link_width": 3}, "link_width"),
        ],
    )
    def test_invalid(self, kwargs: dict[str, int], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            PciExpress(**kwargs)  # type: ignore[arg-type]


class TestVendorSpecific:
    def test_read_only_by_default(self) -> None:
        vendor = VendorSpecific(data=b"\x01\x02\x03")
        device = make(vendor)
        base = device.config.offset_of(vendor)
        assert device.config.read(base, 6) == b"\x09\x00\x06\x01\x02\x03"
        device.write_config(base, b"\xff" * 6)
        assert device.config.read(base, 6) == b"\x09\x00\x06\x01\x02\x03"

    def test_writable_data(self) -> None:
        vendor = VendorSpecific(data=bytes(4), writable=True)
        device = make(vendor)
        base = device.config.offset_of(vendor)
        device.write_config(base, b"\xff" * 7)
        assert device.config.read(base, 7) == b"\x09\x00\x07\xff\xff\xff\xff"


class TestExtended:
    def test_chain_from_0x100(self) -> None:
        dsn = DeviceSerialNumber(serial=0x1122334455667788)
        vsec = VendorSpecificExtended(vsec_id=0xABCD, revision=3, data=b"xyzw")
        device = make(PciExpress(), extended=(dsn, vsec))
        assert device.config.offset_of(dsn) == 0x100
        assert device.config.offset_of(vsec) == 0x10C
        assert reg(device, 0x100, 4) == 0x0003 | 1 << 16 | 0x10C << 20
        assert reg(device, 0x104, 8) == 0x1122334455667788
        assert reg(device, 0x10C, 4) == 0x000B | 1 << 16
        assert reg(device, 0x110, 4) == 0xABCD | 3 << 16 | 12 << 20
        device.write_config(0x100, b"\xff" * 24)
        assert reg(device, 0x104, 8) == 0x1122334455667788
        assert device.config.read(0x114, 4) == b"xyzw"

    def test_writable_vsec_data(self) -> None:
        vsec = VendorSpecificExtended(vsec_id=1, data=bytes(4), writable=True)
        device = make(PciExpress(), extended=(vsec,))
        device.write_config(0x100, b"\xee" * 12)
        assert device.config.read(0x100, 12)[8:] == b"\xee" * 4
        assert reg(device, 0x100, 4) == 0x0001000B

    def test_need_pci_express(self) -> None:
        with pytest.raises(ValueError, match="PciExpress"):
            make(extended=(DeviceSerialNumber(serial=1),))

    def test_first_must_sit_at_0x100(self) -> None:
        with pytest.raises(ValueError, match="0x100"):
            make(PciExpress(), extended=(DeviceSerialNumber(serial=1, offset=0x200),))


class TestRom:
    def test_sizing_and_enable(self) -> None:
        device = make(rom=b"\x55\xaa" + bytes(3000))
        assert device.region_flags_and_size(6) == (1, 4096)
        write(device, Reg.ROM_ADDRESS, 0xFFFFF800, 4)
        assert reg(device, Reg.ROM_ADDRESS, 4) == 0xFFFFF000
        write(device, Reg.ROM_ADDRESS, 0xFFFFFFFF, 4)
        assert reg(device, Reg.ROM_ADDRESS, 4) == 0xFFFFF001
        write(device, Reg.ROM_ADDRESS, 0xFEB00001, 4)
        assert reg(device, Reg.ROM_ADDRESS, 4) == 0xFEB00001
        assert device.read_region(6, 0, 4) == b"\x55\xaa\0\0"
        assert device.read_region(6, 4094, 2) == b"\0\0"

    def test_small_rom_is_2k(self) -> None:
        assert make(rom=b"\x55\xaa").region_flags_and_size(6)[1] == 2048

    def test_no_rom_reads_zero(self) -> None:
        device = make()
        write(device, Reg.ROM_ADDRESS, 0xFFFFF800, 4)
        assert reg(device, Reg.ROM_ADDRESS, 4) == 0
        assert device.region_flags_and_size(6) == (0, 0)


def test_64bit_bar_upper_region_is_empty() -> None:
    device = make(bars={0: Bar(1 << 32, kind=BarKind.MEMORY_64, read=lambda o, n: bytes(n))})
    assert device.region_flags_and_size(0)[1] == 1 << 32
    assert device.region_flags_and_size(1) == (0, 0)


class TestConfigRegisters:
    def test_reads_and_writes_reach_the_device(self) -> None:
        store = bytearray(16)
        log: list[tuple[str, int, bytes]] = []

        def read(offset: int, count: int) -> bytes:
            log.append(("read", offset, b""))
            return bytes(store[offset : offset + count])

        def write_registers(offset: int, data: bytes) -> None:
            log.append(("write", offset, data))
            store[offset : offset + len(data)] = data

        pm = PowerManagement()
        device = make(pm, config_registers=[ConfigRegisters(0x40, 16, read, write_registers)])
        assert device.config.offset_of(pm) == 0x50, "capabilities go around claimed ranges"
        device.write_config(0x4E, b"\x01\x02\x03\x04")
        assert log == [("write", 0x0E, b"\x01\x02")]
        assert store[0x0E:] == b"\x01\x02"
        assert device.read_config(0x3C, 8) == b"\0\x00\0\0\0\0\0\0"
        assert device.read_config(0x4C, 8)[:4] == b"\0\0\x01\x02"
        assert reg(device, 0x50, 1) == 0x01, "the PM header after the claimed range"

    def test_async_handlers(self) -> None:
        async def read(offset: int, count: int) -> bytes:
            await asyncio.sleep(0)
            return bytes(range(offset, offset + count))

        async def write_registers(offset: int, data: bytes) -> None:
            await asyncio.sleep(0)

        device = make(config_registers=[ConfigRegisters(0x80, 8, read, write_registers)])
        pending = device.read_config(0x7E, 4)
        assert not isinstance(pending, bytes)
        assert asyncio.run(pending) == b"\0\0\x00\x01"  # type: ignore[arg-type]
        done = device.write_config(0x80, b"x")
        assert done is not None
        asyncio.run(done)  # type: ignore[arg-type]

    @pytest.mark.parametrize(("offset", "size"), [(0x30, 16), (0xF8, 16)])
    def test_must_stay_out_of_the_header_and_in_range(self, offset: int, size: int) -> None:
        with pytest.raises(ValueError, match="config registers"):
            make(
                config_registers=[
                    ConfigRegisters(offset, size, lambda o, n: bytes(n), lambda o, d: None)
                ]
            )

    def test_overlapping_a_pinned_capability(self) -> None:
        with pytest.raises(ValueError, match="overlaps"):
            make(
                Msi(offset=0x40),
                config_registers=[
                    ConfigRegisters(0x40, 8, lambda o, n: bytes(n), lambda o, d: None)
                ],
            )


class TestWatchers:
    def test_called_on_change_only(self) -> None:
        changes: list[tuple[int, int]] = []
        device = make()
        device.watch_config(Reg.COMMAND, 2, lambda old, new: changes.append((old, new)))
        write(device, Reg.COMMAND, 0x0006, 2)
        write(device, Reg.COMMAND + 1, 0x00, 1)
        write(device, Reg.VENDOR_ID, 0xFFFF_FFFF, 4)
        write(device, Reg.COMMAND, 0x0002, 1)
        assert changes == [(0, 6), (6, 2)]

    def test_msi_enable_watcher_sees_the_clamped_value(self) -> None:
        msi = Msi(vectors=2)
        device = make(msi)
        control = device.config.offset_of(msi) + Msi.CONTROL
        seen: list[int] = []
        device.watch_config(control, 2, lambda old, new: seen.append(new))
        write(device, control, 0x0071, 2)
        assert seen == [0x0093]

    def test_async_watcher(self) -> None:
        seen: list[int] = []

        async def watcher(old: int, new: int) -> None:
            await asyncio.sleep(0)
            seen.append(new)

        device = make()
        device.watch_config(Reg.INTERRUPT_LINE, 1, watcher)
        pending = device.write_config(Reg.INTERRUPT_LINE, b"\x0b")
        assert pending is not None
        asyncio.run(pending)  # type: ignore[arg-type]
        assert seen == [0x0B]
