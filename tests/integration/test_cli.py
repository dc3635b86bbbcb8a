"""`python -m muser.run` as a user runs it: a real process, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from muser import Client
from tests.helpers import RawPeer

ROOT = Path(__file__).resolve().parents[2]
one_loop = pytest.mark.asyncio(loop_factories=["asyncio"])
"""The process under test picks its own loop; one loop on our side is enough."""


async def start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "muser.run",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def wait_for_socket(path: str, process: asyncio.subprocess.Process) -> None:
    for _ in range(500):
        if os.path.exists(path):
            return
        if process.returncode is not None:
            break
        await asyncio.sleep(0.01)
    _, stderr = await process.communicate()
    raise AssertionError(f"no socket at {path}: {stderr.decode()}")


async def stop(process: asyncio.subprocess.Process, signum: int) -> str:
    process.send_signal(signum)
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, stderr.decode()
    return stderr.decode()


@one_loop
@pytest.mark.parametrize(
    ("loop", "signum"), [("uvloop", signal.SIGTERM), ("asyncio", signal.SIGINT)]
)
async def test_serves_null_and_exits_cleanly(sock_dir: str, loop: str, signum: int) -> None:
    path = os.path.join(sock_dir, "null.sock")
    process = await start("null", "--socket", path, "--loop", loop)
    await wait_for_socket(path, process)
    async with await Client.connect(path) as client:
        assert await client.region_read(7, 0, 4) == b"\x58\x4e\x00\x00"
        for index in range(6):
            assert (await client.get_region_info(index))[0].size == 0
    stderr = await stop(process, signum)
    assert not os.path.exists(path)
    assert "vfio-user-pci" in stderr
    assert path in stderr
    assert "client connected" in stderr
    assert "\x1b[" not in stderr, "no colour codes when stderr is not a terminal"


@one_loop
async def test_json_logs_and_several_devices(sock_dir: str) -> None:
    first, second = os.path.join(sock_dir, "a.sock"), os.path.join(sock_dir, "b.sock")
    process = await start(
        "null",
        "tests.helpers:RecordingDevice",
        "--socket",
        first,
        "--socket",
        second,
        "--log-format",
        "json",
        "--log-level",
        "debug",
    )
    await wait_for_socket(second, process)
    await wait_for_socket(first, process)
    async with await Client.connect(second) as client:
        assert (await client.get_region_info(2))[0].size == 256
    stderr = await stop(process, signal.SIGTERM)
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert {"serving", "negotiated", "received", "closed"} <= {e["event"] for e in events}
    assert all("level" in event for event in events)


@one_loop
@pytest.mark.parametrize(
    ("args", "socket_name", "vendor"),
    [
        ((), "muser-gpio.sock", 0x494F),
        (("gpio",), "muser-gpio.sock", 0x494F),
        (("null",), "muser-null.sock", 0x4E58),
        (("edu",), "muser-edu.sock", 0x1234),
        (("tests.helpers:RecordingDevice",), "muser-tests-helpers-RecordingDevice.sock", 0x1AF4),
    ],
    ids=["no arguments", "gpio", "null", "edu", "import string"],
)
async def test_every_sample_starts_answers_and_stops(
    sock_dir: str, args: tuple[str, ...], socket_name: str, vendor: int
) -> None:
    """With no --socket, the socket goes to $XDG_RUNTIME_DIR, named after the device."""
    path = os.path.join(sock_dir, socket_name)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "muser.run",
        *args,
        cwd=ROOT,
        env={**os.environ, "XDG_RUNTIME_DIR": sock_dir},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await wait_for_socket(path, process)
    async with await Client.connect(path) as client:
        config = await client.region_read(7, 0, 2)
        assert int.from_bytes(config, "little") == vendor
    stderr = await stop(process, signal.SIGTERM)
    assert not os.path.exists(path)
    assert f"serving on {path}" in stderr


def test_help_lists_samples() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "muser.run", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for sample in ("gpio", "null", "edu"):
        assert sample in result.stdout
    assert "--socket" in result.stdout


def test_unknown_device_is_an_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "muser.run", "nonesuch"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "unknown device 'nonesuch'" in result.stderr


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("muser_samples.null:nope", 'Attribute "nope" not found in module "muser_samples.null"'),
        ("no_such_module:create", 'Could not import module "no_such_module"'),
        ("muser_samples.nowhere:create", 'Could not import module "muser_samples.nowhere"'),
    ],
)
def test_a_device_that_cannot_be_loaded_is_one_line(
    tmp_path: Path, spec: str, message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "muser.run", spec, "--socket", str(tmp_path / "s")],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(message)


def test_a_module_whose_own_import_fails_shows_where(tmp_path: Path) -> None:
    (tmp_path / "broken_device.py").write_text("import not_installed_anywhere\n")
    socket_path = str(tmp_path / "s")
    result = subprocess.run(
        [sys.executable, "-m", "muser.run", "broken_device:create", "--socket", socket_path],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "No module named 'not_installed_anywhere'" in result.stderr


@one_loop
async def test_trace_records_what_a_client_sends_and_receives(sock_dir: str) -> None:
    path, trace = os.path.join(sock_dir, "null.sock"), os.path.join(sock_dir, "wire.jsonl")
    process = await start("null", "--socket", path, "--trace", trace)
    await wait_for_socket(path, process)
    async with await Client.connect(path) as client:
        await client.region_read(7, 0, 4)
    await stop(process, signal.SIGTERM)
    with open(trace) as lines:
        records = [json.loads(line) for line in lines]
    assert [(record["dir"], record["name"]) for record in records] == [
        ("c2s", "VFIO_USER_VERSION"),
        ("s2c", "VFIO_USER_VERSION"),
        ("c2s", "VFIO_USER_REGION_READ"),
        ("s2c", "VFIO_USER_REGION_READ"),
    ]


@one_loop
async def test_access_options(sock_dir: str) -> None:
    """--socket-mode sets the socket file's permissions; --allow-uid and --allow-gid
    refuse other peers (here, us) and let the named ones in."""
    path = os.path.join(sock_dir, "null.sock")
    process = await start(
        "null", "--socket", path, "--socket-mode", "660", "--allow-uid", str(os.getuid() + 1)
    )
    await wait_for_socket(path, process)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    peer = await RawPeer.connect(path)
    assert await peer.expect_closed() == b""
    peer.close()
    stderr = await stop(process, signal.SIGTERM)
    assert "refused a client not on the allow-list" in stderr
    process = await start(
        "null", "--socket", path, "--allow-uid", str(os.getuid()), "--allow-gid", str(os.getgid())
    )
    await wait_for_socket(path, process)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with await Client.connect(path) as client:
        assert (await client.get_device_info()).num_regions == 9
    await stop(process, signal.SIGTERM)


@one_loop
async def test_negotiation_timeout_option(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "null.sock")
    process = await start("null", "--socket", path, "--negotiation-timeout", "0.2")
    await wait_for_socket(path, process)
    silent = await RawPeer.connect(path)
    assert await silent.expect_closed() == b""
    silent.close()
    stderr = await stop(process, signal.SIGTERM)
    assert "client did not negotiate in time" in stderr


@pytest.mark.parametrize(
    "args",
    [("--socket-mode", "999"), ("--negotiation-timeout", "-1"), ("--fd-budget", "0")],
    ids=["mode not octal", "negative timeout", "no fds"],
)
def test_bad_option_values_are_refused(args: tuple[str, ...]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "muser.run", "null", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert args[0] in result.stderr


@one_loop
async def test_workers_spread_the_devices_over_processes(sock_dir: str) -> None:
    paths = [os.path.join(sock_dir, f"{index}.sock") for index in range(3)]
    sockets = [argument for path in paths for argument in ("--socket", path)]
    process = await start("null", "null", "null", *sockets, "--workers", "2")
    for path in paths:
        await wait_for_socket(path, process)
    servers = []
    for path in paths:
        async with await Client.connect(path) as client:
            assert await client.region_read(7, 0, 2) == b"\x58\x4e"
            servers.append(client.transport.peer_pid())
    assert servers[0] == servers[2] != servers[1], "device i in worker i mod 2"
    assert process.pid not in servers
    stderr = await stop(process, signal.SIGTERM)
    assert not any(os.path.exists(path) for path in paths)
    assert "worker=0" in stderr
    assert "worker=1" in stderr


@one_loop
async def test_a_failing_worker_stops_the_others(sock_dir: str) -> None:
    good = os.path.join(sock_dir, "good.sock")
    bad = os.path.join(sock_dir, "missing", "bad.sock")  # no such directory
    process = await start("null", "null", "--socket", good, "--socket", bad, "--workers", "2")
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 1, stderr.decode()
    assert not os.path.exists(good)
