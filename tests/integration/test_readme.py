"""The README's device example works as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import muser

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example(marker: str) -> dict[str, Any]:
    """Run the README's python block that contains `marker` (without starting a loop)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    (code,) = [block for block in blocks if marker in block]
    code = code.replace("asyncio.run(main())", "")
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
