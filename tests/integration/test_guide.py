"""The guide's device and script, copied verbatim into files and run with the
guide's own commands (its `python` being this interpreter, its socket a private
path)."""

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


def guide_commands(socket_path: str) -> tuple[list[str], tuple[list[str], str]]:
    """The guide's command that serves the device, and the one that runs the script
    with the output the guide shows for it."""
    blocks = re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    (serve,) = [block for block in blocks if "muser.run hello_device:create" in block]
    (run,) = [block for block in blocks if "python try_it.py" in block]
    run_line, output = run.split("\n", 1)

    def argv(line: str) -> list[str]:
        words = line.replace("/tmp/hello.sock", socket_path).split()
        assert words[0] == "python"
        return [sys.executable, *words[1:]]

    return argv(serve.strip()), (argv(run_line), output)


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_guide_runs_verbatim(sock_dir: str) -> None:
    files = guide_files()
    assert set(files) == {"hello_device.py", "try_it.py"}
    for name, text in files.items():
        Path(sock_dir, name).write_text(text)
    path = os.path.join(sock_dir, "hello.sock")
    serve, (run, expected) = guide_commands(path)
    server = await asyncio.create_subprocess_exec(
        *serve, cwd=sock_dir, stderr=asyncio.subprocess.PIPE
    )
    for _ in range(500):
        if os.path.exists(path):
            break
        await asyncio.sleep(0.01)
    script = await asyncio.create_subprocess_exec(
        *run,
        cwd=sock_dir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(script.communicate(), 20)
    server.send_signal(signal.SIGTERM)
    _, server_log = await asyncio.wait_for(server.communicate(), 10)
    assert script.returncode == 0, stderr.decode()
    assert stdout.decode() == expected
    assert server.returncode == 0, server_log.decode()
