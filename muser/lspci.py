"""`python -m muser.lspci SOCKET`: a device's config space, as pciutils reads it.

It connects to a vfio-user server, reads the whole config space and prints it in
the `lspci -xxxx` dump format, which pciutils decodes:

    python -m muser.lspci /tmp/dev.sock > dev.txt && lspci -vvv -F dev.txt

With `-v` it prints its own decoded summary instead, including what a dump
cannot carry (region sizes). The config space comes from another program, so
the decoder checks every pointer it follows.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
from collections.abc import Sequence

from muser.client import Client
from muser.pci.capabilities import CapId, ExtCapId, MsiX
from muser.pci.config import FIRST_EXTENDED_CAPABILITY, HEADER_SIZE, Reg, Status
from muser.wire import close_fds
from muser.wire.constants import PciRegion

BYTES_PER_LINE = 16
PCI_EXPRESS_TYPES = {0: "Endpoint", 1: "Legacy Endpoint", 9: "Root Complex Integrated Endpoint"}
_PINS = {0: "none", 1: "A", 2: "B", 3: "C", 4: "D"}
LINK_SPEEDS = {1: "2.5GT/s", 2: "5GT/s", 3: "8GT/s", 4: "16GT/s", 5: "32GT/s"}


def dump(config: bytes, slot: str = "00:00.0") -> str:
    """The config space in the `lspci -xxxx` format that `lspci -F` reads."""
    vendor, device = struct.unpack_from("<HH", config, 0)
    lines = [f"{slot} Device {vendor:04x}:{device:04x}"]
    width = 3 if len(config) > 256 else 2
    for offset in range(0, len(config), BYTES_PER_LINE):
        chunk = config[offset : offset + BYTES_PER_LINE]
        lines.append(f"{offset:0{width}x}: " + " ".join(f"{byte:02x}" for byte in chunk))
    return "\n".join(lines) + "\n"


def _u16(config: bytes, offset: int) -> int:
    return int.from_bytes(config[offset : offset + 2], "little")


def _u32(config: bytes, offset: int) -> int:
    return int.from_bytes(config[offset : offset + 4], "little")


def capability_chain(config: bytes) -> list[tuple[int, int]]:
    """(offset, ID) of each standard capability, stopping at a bad or looping pointer."""
    if not _u16(config, Reg.STATUS) & Status.CAPABILITIES_LIST:
        return []
    chain: list[tuple[int, int]] = []
    offset = config[Reg.CAPABILITIES_POINTER] & ~0x3
    while offset and HEADER_SIZE <= offset <= len(config[:256]) - 2:
        if any(seen == offset for seen, _ in chain):
            break
        chain.append((offset, config[offset]))
        offset = config[offset + 1] & ~0x3
    return chain


def extended_chain(config: bytes) -> list[tuple[int, int, int]]:
    """(offset, ID, version) of each extended capability."""
    chain: list[tuple[int, int, int]] = []
    offset = FIRST_EXTENDED_CAPABILITY
    while FIRST_EXTENDED_CAPABILITY <= offset <= len(config) - 4:
        header = _u32(config, offset)
        if header == 0 or any(seen == offset for seen, _, _ in chain):
            break
        chain.append((offset, header & 0xFFFF, header >> 16 & 0xF))
        offset = header >> 20 & ~0x3
    return chain


def _describe_bars(config: bytes, sizes: dict[int, int]) -> list[str]:
    lines = []
    index = 0
    while index < 6:
        value = _u32(config, Reg.BAR0 + 4 * index)
        size = sizes.get(index, 0)
        if value & 0x1:
            lines.append(f"Region {index}: I/O ports at {value & ~0x3:#x} [size={size}]")
        elif size or value:
            wide = value & 0x6 == 0x4
            address = value & ~0xF
            if wide and index < 5:
                address |= _u32(config, Reg.BAR0 + 4 * (index + 1)) << 32
            kind = ("64-bit" if wide else "32-bit") + (
                ", prefetchable" if value & 0x8 else ", non-prefetchable"
            )
            lines.append(f"Region {index}: Memory at {address:#x} ({kind}) [size={size}]")
            index += wide
        index += 1
    rom = sizes.get(PciRegion.ROM, 0)
    if rom:
        value = _u32(config, Reg.ROM_ADDRESS)
        state = "enabled" if value & 0x1 else "disabled"
        lines.append(f"Expansion ROM at {value & ~0x7FF:#x} [{state}] [size={rom}]")
    return lines


def _describe_capability(config: bytes, offset: int, cap_id: int) -> str:
    control = _u16(config, offset + 2)
    if cap_id == CapId.POWER_MANAGEMENT:
        pmcsr = _u16(config, offset + 4)
        return (
            f"Power Management version {control & 0x7}: D{pmcsr & 0x3} "
            f"NoSoftRst{'+' if pmcsr & 0x8 else '-'}"
        )
    if cap_id == CapId.MSI:
        return (
            f"MSI: Enable{'+' if control & 1 else '-'} "
            f"Count={1 << (control >> 4 & 7)}/{1 << (control >> 1 & 7)} "
            f"Maskable{'+' if control & 0x100 else '-'} 64bit{'+' if control & 0x80 else '-'}"
        )
    if cap_id == CapId.MSIX:
        table, pba = _u32(config, offset + MsiX.TABLE), _u32(config, offset + MsiX.PBA)
        return (
            f"MSI-X: Enable{'+' if control & MsiX.ENABLE else '-'} "
            f"Count={(control & MsiX.TABLE_SIZE_MASK) + 1} "
            f"Masked{'+' if control & MsiX.FUNCTION_MASK else '-'} "
            f"Table: BAR={table & MsiX.BIR_MASK} offset={table & ~MsiX.BIR_MASK:#x} "
            f"PBA: BAR={pba & MsiX.BIR_MASK} offset={pba & ~MsiX.BIR_MASK:#x}"
        )
    if cap_id == CapId.PCI_EXPRESS:
        kind = PCI_EXPRESS_TYPES.get(control >> 4 & 0xF, f"type {control >> 4 & 0xF}")
        flr = "+" if _u32(config, offset + 4) & (1 << 28) else "-"
        link = _u32(config, offset + 0x0C)
        speed = LINK_SPEEDS.get(link & 0xF, "none")
        return f"Express v{control & 0xF} {kind}: FLReset{flr} Link {speed} x{link >> 4 & 0x3F}"
    if cap_id == CapId.VENDOR_SPECIFIC:
        return f"Vendor Specific: Len={config[offset + 2]}"
    return f"ID {cap_id:#04x}"


def _describe_extended(config: bytes, offset: int, cap_id: int, version: int) -> str:
    if cap_id == ExtCapId.DEVICE_SERIAL_NUMBER:
        serial = int.from_bytes(config[offset + 4 : offset + 12], "little")
        return f"Device Serial Number {'-'.join(f'{b:02x}' for b in serial.to_bytes(8, 'big'))}"
    if cap_id == ExtCapId.VENDOR_SPECIFIC:
        header = _u32(config, offset + 4)
        return (
            f"Vendor Specific: ID={header & 0xFFFF:04x} Rev={header >> 16 & 0xF} "
            f"Len={header >> 20:#x}"
        )
    return f"ID {cap_id:#06x} v{version}"


def describe(config: bytes, sizes: dict[int, int]) -> str:
    """muser's own decoded summary of a config space and its region sizes."""
    vendor, device, command, status = struct.unpack_from("<4H", config, 0)
    class_code = int.from_bytes(config[Reg.CLASS_CODE : Reg.CLASS_CODE + 3], "little")
    lines = [
        f"Device {vendor:04x}:{device:04x} rev {config[Reg.REVISION_ID]:02x} "
        f"class {class_code:06x}",
        f"Subsystem {_u16(config, Reg.SUBSYSTEM_VENDOR_ID):04x}:"
        f"{_u16(config, Reg.SUBSYSTEM_ID):04x}",
        f"Command {command:04x} Status {status:04x}",
        f"Interrupt pin {_PINS.get(config[Reg.INTERRUPT_PIN], '?')}",
        *_describe_bars(config, sizes),
        f"Config space {len(config)} bytes",
    ]
    for offset, cap_id in capability_chain(config):
        lines.append(
            f"Capabilities: [{offset:02x}] {_describe_capability(config, offset, cap_id)}"
        )
    for offset, cap_id, version in extended_chain(config):
        description = _describe_extended(config, offset, cap_id, version)
        lines.append(f"Capabilities: [{offset:03x}] {description}")
    return "\n".join(lines) + "\n"


async def read_device(path: str) -> tuple[bytes, dict[int, int]]:
    """The whole config space of the device at `path`, and its region sizes."""
    async with await Client.connect(path) as client:
        info = await client.get_device_info()
        sizes = {}
        for index in range(min(info.num_regions, PciRegion.VGA + 1)):
            region, fds = await client.get_region_info(index)
            close_fds(fds)
            sizes[index] = region.size
        config = await client.region_read(PciRegion.CONFIG, 0, sizes[PciRegion.CONFIG])
    return config, sizes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m muser.lspci",
        description="Print a vfio-user device's config space for `lspci -F`.",
    )
    parser.add_argument("socket", help="the device's vfio-user socket")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print muser's decoded summary instead of the dump",
    )
    parser.add_argument("--slot", default="00:00.0", help="bus:device.function to show")
    args = parser.parse_args(argv)
    config, sizes = asyncio.run(read_device(args.socket))
    sys.stdout.write(describe(config, sizes) if args.verbose else dump(config, args.slot))


if __name__ == "__main__":
    main()
