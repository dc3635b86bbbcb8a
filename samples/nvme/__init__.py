"""nvme: an NVM Express 1.4 controller that Linux's in-kernel `nvme` driver binds to,
its namespaces backed by a file (sparse, made if absent) or by memory.

    python -m muser.run nvme --socket /tmp/nvme.sock --backing disk.img --size 1G

BAR0 (64-bit memory, 16 KiB) holds the controller registers, the doorbells at
0x1000 (4 bytes apart, CAP.DSTRD 0; also ioeventfds, read through the Doorbell
Buffer Config command's shadow doorbells), and the MSI-X table (65 vectors: the
admin queue's and one per I/O queue) and PBA at 0x2000 and 0x3000; INTx when
MSI-X is off. Up to 64 I/O queue pairs of up to 1024 entries; transfers of up to
128 KiB by PRPs (no SGLs); Read, Write, Flush, Write Zeroes and Dataset
Management, whose deallocation punches holes in the file. Commands of a queue
run concurrently and complete in any order; file I/O runs in worker threads and
goes straight to and from guest memory where the client shares it.
"""

from __future__ import annotations

import argparse

from .controller import NvmeController
from .storage import Storage

__all__ = ["NvmeController", "Storage", "add_arguments", "create"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size(text: str) -> int:
    """`512M`, `1G`, `4096`: bytes, a whole number of 512-byte blocks."""
    number, unit = text[:-1] if text[-1:].isalpha() else text, text[-1:].upper()
    if not unit.isalpha():
        unit = ""
    try:
        value = int(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512M or 1G") from None
    if value <= 0 or value % 512:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 512-byte blocks")
    return value


def add_arguments(parser: argparse._ActionsContainer) -> None:
    """The options `python -m muser.run nvme` takes (into its argument group)."""
    parser.add_argument(
        "--backing", metavar="FILE", help="the namespaces' file (made, sparse, if absent); "
        "without it they live in memory",
    )  # fmt: skip
    parser.add_argument(
        "--size", type=size, default=1 << 30, help="each namespace's size (default 1G)"
    )
    parser.add_argument("--namespaces", type=int, default=1, help="how many (default 1)")


def create(backing: str | None = None, size: int = 1 << 30, namespaces: int = 1) -> NvmeController:
    return NvmeController(Storage(backing, size, namespaces))
