"""The guide's device and script, copied verbatim into files and run as it says."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "guide.md"


def guide_files() -> dict[str, str]:
    """The guide's python blocks that start with a `# name.py` line, by name."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    return {block.split("\n", 1)[0][2:]: block for block in blocks if block.startswith("# ")}


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_guide_runs_verbatim(sock_dir: str) -> None:
    files = guide_files()
    assert set(files) == {"hello_device.py", "try_it.py"}
    for name, text in files.items():
        Path(sock_dir, name).write_text(text)
    path = os.path.join(sock_dir, "hello.sock")
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "muser.run",
        "hello_device:create",
        "--socket",
        path,
        cwd=sock_dir,
        stderr=asyncio.subprocess.PIPE,
    )
    for _ in range(500):
        if os.path.exists(path):
            break
        await asyncio.sleep(0.01)
    script = await asyncio.create_subprocess_exec(
        sys.executable,
        "try_it.py",
        path,
        cwd=sock_dir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(script.communicate(), 20)
    server.send_signal(signal.SIGTERM)
    _, server_log = await asyncio.wait_for(server.communicate(), 10)
    assert script.returncode == 0, stderr.decode()
    assert stdout.decode() == "count in guest memory: 12\n"
    assert server.returncode == 0, server_log.decode()
