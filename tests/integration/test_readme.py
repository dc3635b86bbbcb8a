"""The README's examples work as written."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import muser
from muser.testing import attach
from muser.wire.constants import IrqIndex

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(marker: str) -> str:
    """The README's one python block that contains `marker`."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    (code,) = [block for block in blocks if marker in block]
    return str(code)


def readme_example(marker: str) -> dict[str, Any]:
    """Run the README's python block that contains `marker` (without starting a loop)."""
    code = readme_block(marker).replace("asyncio.run(main())", "")
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


async def test_readme_counter(sock_path: str) -> None:
    counter = readme_example("class Counter")["Counter"]()
    async with (
        muser.Server(counter, sock_path),
        await muser.Client.connect(sock_path) as client,
    ):
        for _ in range(3):
            await client.region_write(0, 0, b"\x01\x00\x00\x00")
        assert await client.region_read(0, 0, 4) == b"\x03\x00\x00\x00"
        await client.reset()
        assert await client.region_read(0, 0, 2) == b"\x00\x00"


def test_readme_capabilities() -> None:
    device = readme_example("capabilities=[")["device"]
    assert device.config.size == 4096
    assert [offset for _, offset in device.config.capabilities] == [
        0x40,
        0x48,
        0x60,
        0x6C,
        0xA8,
        0x100,
    ]
    assert device.region_flags_and_size(6)[1] == 2048


async def run_readme_fragment(marker: str, namespace: dict[str, Any]) -> None:
    """Run the README's python block that contains `marker` in `namespace`, top-level
    awaits included, as the fragments are written inside a device's async code."""
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    result = eval(compile(readme_block(marker), "README.md", "exec", flags=flags), namespace)
    if inspect.iscoroutine(result):
        await result


def interrupting_device() -> tuple[muser.PciDevice, muser.MsiX]:
    msix = muser.MsiX(table_size=4, table_bar=0, table_offset=0x1000, pba_bar=0, pba_offset=0x1800)
    memory = bytearray(0x2000)
    return muser.PciDevice(
        vendor_id=0x1234,
        device_id=0x5678,
        intx=True,
        capabilities=[msix],
        bars={0: muser.Bar(0x2000, read=lambda offset, count: bytes(memory[offset:][:count]))},
    ), msix


async def test_readme_interrupts() -> None:
    """The interrupt lines do what their comments say, on eventfds a client wired."""
    device, msix_capability = interrupting_device()
    async with attach(device) as session:
        control = device.config.offset_of(msix_capability) + muser.MsiX.CONTROL
        await session.client.region_write(7, control, muser.MsiX.ENABLE.to_bytes(2, "little"))
        msix = await session.interrupt(IrqIndex.MSIX, 3)
        intx = await session.interrupt(IrqIndex.INTX)
        err = await session.interrupt(IrqIndex.ERR)
        await run_readme_fragment("device.irqs.msix.trigger(3)", {"device": device})
        assert [await msix.wait(), await intx.wait(), await err.wait()] == [1, 1, 1]
        assert device.irqs.intx.level is False


async def test_readme_dma() -> None:
    """The DMA lines read and write the guest memory a client shared."""
    device, _msix = interrupting_device()
    iova = 0x100000
    async with attach(device) as session:
        ram = await session.guest_memory(iova, 2 << 20)
        ram[:64] = bytes(range(64))
        namespace: dict[str, Any] = {"device": device, "iova": iova, "header": b"HEADER!!"}
        await run_readme_fragment("device.dma.read_direct(iova, 64)", namespace)
        assert bytes(ram[:8]) == b"HEADER!!"
        assert len(namespace["data"]) == 1 << 20
        assert namespace["data"][:8] == b"HEADER!!"
