"""CPU instructions per operation, counted by valgrind's callgrind, which noise cannot move.

A raw client and a `muser.Server` in one process (uvloop; `--loops asyncio` too),
whose device has a 4 KiB BAR0 behind plain read and write handlers, do after 200
warm-up reads either

- read: N REGION_READ round trips of 4 bytes of BAR0, one at a time, or
- write: N posted 1-byte REGION_WRITEs, sent in batches of 100, each batch sent
  at once with one REGION_READ behind it as a fence.

Each runs under `valgrind --tool=callgrind` for N operations and for none, with
PYTHONHASHSEED=0; (Ir(N) - Ir(0)) / N is what one operation costs, start-up and
everything else cancelling out. Runs go in parallel, one per usable CPU.

`--vs PATH` measures another checkout of muser the same way (a git worktree, say:
`git worktree add /tmp/old v1.0`), PATH first on sys.path in the measured process,
and reports this checkout's count, that one's and this/that. Both run this file's
workload, its messages built with struct rather than muser.wire, so that only
muser differs.
With `--quick`: reads only, N = 100. Without valgrind on PATH it says so and
reports no rows.

    python benchmarks/instructions.py [--vs PATH] [--count N] [--loops uvloop,asyncio]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
BATCH = 100
WARM_UP = 200


def message(command: int, payload: bytes, flags: int = 0) -> bytes:
    """A vfio-user message: msg_id, command, size, flags, error, then the payload."""
    return struct.pack("<HHIII", 0, command, 16 + len(payload), flags, 0) + payload


READ = message(9, struct.pack("<QII", 0, 0, 4))
"""REGION_READ of 4 bytes at offset 0 of BAR0."""
POSTED_WRITE = message(10, struct.pack("<QII", 8, 0, 1) + b"x", flags=0x10)
"""REGION_WRITE of 1 byte at offset 8 of BAR0, NO_REPLY."""
REPLY_SIZE = 36
NAMES = {
    "read": "REGION_READ round trip, 4 bytes",
    "write": f"posted 1-byte REGION_WRITE, {BATCH} per fence",
}


async def workload(mode: str, count: int) -> None:
    """The measured process's work; muser comes from whichever checkout is first on sys.path."""
    import muser  # noqa: PLC0415 - only once the checkout to measure is on sys.path

    loop = asyncio.get_running_loop()
    memory = bytearray(4096)

    def read(offset: int, count: int) -> bytes:
        return bytes(memory[offset : offset + count])

    def write(offset: int, data: bytes) -> None:
        memory[offset : offset + len(data)] = data

    bar = muser.Bar(len(memory), read=read, write=write)
    device = muser.PciDevice(vendor_id=0x494F, device_id=0x0DC8, bars={0: bar})
    with tempfile.TemporaryDirectory(prefix="muser-instructions-") as directory:
        path = os.path.join(directory, "device.sock")
        async with muser.Server(device, path):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, path)
            await loop.sock_sendall(sock, message(1, struct.pack("<HH", 0, 2) + b"{}\0"))
            size = struct.unpack("<4xI8x", await loop.sock_recv(sock, 16))[0] - 16
            while size:
                size -= len(await loop.sock_recv(sock, size))
            waiter: list[asyncio.Future[bytes]] = [loop.create_future()]
            loop.add_reader(sock.fileno(), lambda: waiter[0].set_result(sock.recv(REPLY_SIZE)))

            async def round_trip(request: bytes) -> None:
                waiter[0] = loop.create_future()
                sock.send(request)
                await waiter[0]

            for _ in range(WARM_UP):
                await round_trip(READ)
            if mode == "read":
                for _ in range(count):
                    await round_trip(READ)
            else:
                batch = POSTED_WRITE * BATCH + READ
                for _ in range(count // BATCH):
                    await round_trip(batch)
            loop.remove_reader(sock.fileno())
            sock.close()


def run_workload(checkout: str, mode: str, count: int, loop: str) -> None:
    """The measured process: `workload` with muser from `checkout`."""
    sys.path.insert(0, checkout)
    factory = None
    if loop == "uvloop":
        import uvloop  # noqa: PLC0415 - like muser, from the measured process's sys.path

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(workload(mode, count))


def instructions(checkout: str, mode: str, count: int, loop: str) -> int:
    """Ir of one run of the workload under callgrind."""
    with tempfile.TemporaryDirectory(prefix="muser-callgrind-") as scratch:
        out = os.path.join(scratch, "callgrind.out")
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
        command += [__file__, "--workload", checkout, mode, str(count), loop]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"the workload failed under callgrind:\n{done.stderr[-2000:]}")
        with open(out, encoding="utf-8") as profile:
            return next(
                int(line.split()[1])
                for line in profile
                if line.startswith(("summary:", "totals:"))
            )


def commit(checkout: str) -> str:
    """The checkout's commit, `-dirty` if it has uncommitted changes."""
    if shutil.which("git") is None:
        return "unknown commit"
    command = ["git", "-C", checkout, "describe", "--always", "--dirty"]
    return subprocess.run(command, capture_output=True, text=True, check=False).stdout.strip()


def main() -> None:
    # common imports muser, which the measured process must import from its own checkout only
    from common import Result, Row, argument_parser, emit, parse_arguments  # noqa: PLC0415

    parser = argument_parser(__doc__, loops="uvloop")
    parser.add_argument(
        "--count", type=int, default=10000, help="operations N (a multiple of 100)"
    )
    parser.add_argument(
        "--vs", metavar="PATH", help="another checkout to measure, e.g. a worktree"
    )
    args = parse_arguments(parser)
    if args.count < BATCH or args.count % BATCH:
        parser.error(f"--count must be a positive multiple of {BATCH}")
    modes = ["read"] if args.quick else ["read", "write"]
    count = 100 if args.quick else args.count
    checkouts = [str(CHECKOUT)] + ([str(Path(args.vs).resolve())] if args.vs else [])
    commits = {tree: commit(tree) for tree in checkouts}
    settings = {"count": count, "modes": modes, "checkouts": commits}
    started = time.perf_counter()
    if shutil.which("valgrind") is None:
        print("valgrind is not on PATH: nothing measured", file=sys.stderr)
        emit(args, {**settings, "skipped": "valgrind is not on PATH"}, [], started)
        return
    runs = [
        (tree, mode, n, loop)
        for tree in checkouts
        for loop in args.loops
        for mode, n in [("read", 0), *((mode, count) for mode in modes)]
    ]
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        counted = dict(zip(runs, pool.map(lambda run: instructions(*run), runs), strict=True))

    def per_op(tree: str, mode: str, loop: str) -> float:
        return (counted[tree, mode, count, loop] - counted[tree, "read", 0, loop]) / count

    rows = []
    for loop in args.loops:
        for mode in modes:
            this, *other = (per_op(tree, mode, loop) for tree in checkouts)
            rows.append(
                Row(
                    NAMES[mode],
                    f"{checkouts[1]} at {commits[checkouts[1]]}" if other else "-",
                    loop,
                    "instructions/op",
                    Result.of([this]),
                    Result.of(other) if other else None,
                    this / other[0] if other else None,
                )
            )
    emit(args, settings, rows, started)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--workload"]:
        run_workload(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
