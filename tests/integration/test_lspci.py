"""pciutils judges our config space: `python -m muser.lspci SOCKET` dumps it, and
`lspci -vvv -F` decodes what a guest's PCI core would see."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import muser
from muser import Bar, BarKind, Client, Msi, MsiX, PciExpress, PowerManagement, Server
from muser.pci import PcieType
from muser_samples import edu, gpio, null

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.asyncio(loop_factories=["asyncio"])
"""The process under test picks its own loop; one loop on our side is enough."""
LSPCI = shutil.which("lspci")

if LSPCI is None and not os.environ.get("MUSER_REQUIRE_LSPCI"):
    pytest.skip(
        "pciutils' lspci is not installed (apt-get install pciutils)", allow_module_level=True
    )


def nothing(offset: int, count: int) -> bytes:
    return bytes(count)


def capable_device() -> muser.PciDevice:
    return muser.PciDevice(
        vendor_id=0x1AF4,
        device_id=0x1041,
        subsystem_vendor_id=0x1AF4,
        subsystem_id=0x1100,
        revision=0x01,
        class_code=0x020000,
        intx=True,
        rom=b"\x55\xaa" + bytes(3000),
        bars={
            0: Bar(0x4000, kind=BarKind.MEMORY_64, read=nothing),
            2: Bar(32, kind=BarKind.IO, read=nothing),
            3: Bar(0x1000, kind=BarKind.PREFETCHABLE, read=nothing),
        },
        capabilities=[
            PowerManagement(d1=True, pme_support=0b11001),
            Msi(vectors=4, per_vector_masking=True),
            MsiX(table_size=8, table_bar=0, table_offset=0x2000, pba_bar=0, pba_offset=0x3000),
            PciExpress(link_speed=3, link_width=4),
            muser.VendorSpecific(data=b"muser!"),
        ],
        extended_capabilities=[
            muser.DeviceSerialNumber(serial=0x0123456789ABCDEF),
            muser.VendorSpecificExtended(vsec_id=0x1234, revision=2, data=bytes(8)),
        ],
    )


async def muser_lspci(path: str, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "muser.lspci",
        path,
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


def pciutils(dump: str, directory: str) -> str:
    assert LSPCI is not None, "MUSER_REQUIRE_LSPCI is set but lspci is missing"
    path = os.path.join(directory, "config.txt")
    with open(path, "w") as file:
        file.write(dump)
    result = subprocess.run(
        [LSPCI, "-vvv", "-nn", "-F", path], capture_output=True, text=True, check=True
    )
    return result.stdout


async def decoded(
    device: muser.PciDevice, sock_dir: str, program: list[tuple[int, bytes]] | None = None
) -> tuple[str, str]:
    """What pciutils and muser's own decoder say about the served device."""
    path = os.path.join(sock_dir, "dev.sock")
    async with Server(device, path):
        if program:
            async with await Client.connect(path) as client:
                for offset, data in program:
                    await client.region_write(7, offset, data)
        dump = await muser_lspci(path)
        summary = await muser_lspci(path, "-v")
    return pciutils(dump, sock_dir), summary


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


async def test_every_capability(sock_dir: str) -> None:
    program = [
        (0x10, (0xFE000000).to_bytes(4, "little")),
        (0x14, (0x00000001).to_bytes(4, "little")),
        (0x18, (0xC000).to_bytes(4, "little")),
        (0x1C, (0xFD000000).to_bytes(4, "little")),
        (0x30, (0xFEB00000).to_bytes(4, "little")),
        (0x04, (0x0007).to_bytes(2, "little")),
    ]
    text, summary = await decoded(capable_device(), sock_dir, program)
    found = lines(text)
    expected = [
        "00:00.0 Ethernet controller [0200]: Red Hat, Inc. Virtio 1.0 network device "
        "[1af4:1041] (rev 01)",
        "Subsystem: Red Hat, Inc. Device [1af4:1100]",
        "Control: I/O+ Mem+ BusMaster+ SpecCycle- MemWINV- VGASnoop- ParErr- Stepping- "
        "SERR- FastB2B- DisINTx-",
        "Interrupt: pin A routed to IRQ 0",
        "Region 0: Memory at 1fe000000 (64-bit, non-prefetchable)",
        "Region 2: I/O ports at c000",
        "Region 3: Memory at fd000000 (32-bit, prefetchable)",
        "Expansion ROM at feb00000 [disabled]",
        "Capabilities: [40] Power Management version 3",
        "Flags: PMEClk- DSI- D1+ D2- AuxCurrent=0mA PME(D0+,D1-,D2-,D3hot+,D3cold+)",
        "Status: D0 NoSoftRst+ PME-Enable- DSel=0 DScale=0 PME-",
        "Capabilities: [48] MSI: Enable- Count=1/4 Maskable+ 64bit+",
        "Capabilities: [60] MSI-X: Enable- Count=8 Masked-",
        "Vector table: BAR=0 offset=00002000",
        "PBA: BAR=0 offset=00003000",
        "Capabilities: [6c] Express (v2) Endpoint, MSI 00",
        "LnkCap:\tPort #0, Speed 8GT/s, Width x4, ASPM not supported",
        "LnkSta:\tSpeed 8GT/s, Width x4",
        "Capabilities: [a8] Vendor Specific Information: Len=09 <?>",
        "Capabilities: [100 v1] Device Serial Number 01-23-45-67-89-ab-cd-ef",
        "Capabilities: [10c v1] Vendor Specific Information: ID=1234 Rev=2 Len=010 <?>",
    ]
    for line in expected:
        assert line in found, f"{line!r} missing from:\n{text}"
    assert any("RBE+ FLReset+" in line for line in found)
    assert "Region 0: Memory at 0x1fe000000 (64-bit, non-prefetchable) [size=16384]" in summary
    assert "Region 2: I/O ports at 0xc000 [size=32]" in summary
    assert "Expansion ROM at 0xfeb00000 [disabled] [size=4096]" in summary
    assert "Capabilities: [100] Device Serial Number 01-23-45-67-89-ab-cd-ef" in summary


@pytest.mark.parametrize(
    ("address_64", "masking"), [(False, False), (True, False), (False, True), (True, True)]
)
async def test_msi_layouts(sock_dir: str, address_64: bool, masking: bool) -> None:
    msi = Msi(vectors=8, address_64=address_64, per_vector_masking=masking)
    device = muser.PciDevice(vendor_id=0x1234, device_id=0x11E8, capabilities=[msi])
    program = [
        (0x42, (0x0031).to_bytes(2, "little")),
        (0x44, (0xFEE01004).to_bytes(4, "little")),
        (0x40 + msi.data_offset, (0x4041).to_bytes(2, "little")),
    ]
    if masking:
        program.append((0x40 + (msi.mask_offset or 0), (0xA5).to_bytes(4, "little")))
    text, _ = await decoded(device, sock_dir, program)
    flags = f"Maskable{'+' if masking else '-'} 64bit{'+' if address_64 else '-'}"
    found = lines(text)
    assert f"Capabilities: [40] MSI: Enable+ Count=8/8 {flags}" in found, text
    address = "0000000000000000"[: 16 - 8] + "fee01004" if address_64 else "fee01004"
    assert f"Address: {address}  Data: 4041" in found, text
    if masking:
        assert "Masking: 000000a5  Pending: 00000000" in found, text


async def test_pm_state_and_express_integrated(sock_dir: str) -> None:
    device = muser.PciDevice(
        vendor_id=0x1234,
        device_id=0x11E8,
        capabilities=[
            PowerManagement(),
            PciExpress(device_type=PcieType.RC_INTEGRATED_ENDPOINT, flr=False),
        ],
    )
    text, _ = await decoded(device, sock_dir, [(0x44, b"\x03\x00")])
    found = lines(text)
    assert "Status: D3 NoSoftRst+ PME-Enable- DSel=0 DScale=0 PME-" in found, text
    assert "Capabilities: [48] Express (v2) Root Complex Integrated Endpoint, MSI 00" in found
    assert not any("LnkCap:" in line for line in found)
    assert any("FLReset-" in line for line in found)


async def test_null_sample_decodes_cleanly(sock_dir: str) -> None:
    text, summary = await decoded(null.create(), sock_dir)
    found = lines(text)
    assert found[0].startswith("00:00.0 Unassigned class [ff00]:")
    assert found[0].endswith("[4e58:0000]")
    assert (
        "Status: Cap- 66MHz- UDF- FastB2B- ParErr- DEVSEL=fast >TAbort- <TAbort- <MAbort- "
        ">SERR- <PERR- INTx-" in found
    )
    assert not any(line.startswith(("Region", "Capabilities")) for line in found)
    assert "Config space 256 bytes" in summary


async def test_gpio_sample_decodes_cleanly(sock_dir: str) -> None:
    program = [(0x18, (0xC100).to_bytes(4, "little")), (0x04, b"\x01\x00")]
    text, summary = await decoded(gpio.create(), sock_dir, program)
    found = lines(text)
    assert found[0] == (
        "00:00.0 Signal processing controller [1180]: ACCES I/O Products, Inc. PCI-IDIO-16 "
        "Isolated Digital Input / FET Output Card [494f:0dc8]"
    )
    assert "Interrupt: pin A routed to IRQ 0" in found
    assert "Region 2: I/O ports at c100" in found
    assert "Region 2: I/O ports at 0xc100 [size=256]" in summary


async def test_edu_sample_decodes_cleanly(sock_dir: str) -> None:
    program = [(0x10, (0xFEA00000).to_bytes(4, "little")), (0x04, b"\x02\x00")]
    text, summary = await decoded(edu.create(), sock_dir, program)
    found = lines(text)
    assert found[0].startswith("00:00.0 Unassigned class [ff00]:")
    assert found[0].endswith("[1234:11e8] (rev 10)")
    assert "Region 0: Memory at fea00000 (32-bit, non-prefetchable)" in found
    assert "Capabilities: [40] MSI: Enable- Count=1/1 Maskable- 64bit+" in found
    assert "Region 0: Memory at 0xfea00000 (32-bit, non-prefetchable) [size=1048576]" in summary
