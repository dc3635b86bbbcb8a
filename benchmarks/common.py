"""What every benchmark script shares: its loops, machine facts, percentiles, arguments.

The scripts run as `python benchmarks/<name>.py`, so this directory is first on
sys.path and they import it as `common`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

import uvloop

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}

QUICK_HELP = "tiny counts, for a smoke test (overrides counts)"


def machine_facts(pinned: int | None) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "pinned_cpu": pinned,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "uvloop": importlib.metadata.version("uvloop"),
    }


def percentile(ordered: Sequence[int], percent: float) -> int:
    """Nearest-rank percentile of sorted samples."""
    return ordered[max(1, math.ceil(len(ordered) * percent / 100)) - 1]


def add_common_arguments(
    parser: argparse.ArgumentParser,
    quick_help: str = QUICK_HELP,
    pin_help: str = "run the process on this CPU only",
) -> None:
    """--loops, --json, --quick and --pin, the same in every script."""
    parser.add_argument(
        "--loops", default="asyncio,uvloop", help="comma-separated: asyncio, uvloop"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--pin", type=int, metavar="CPU", help=pin_help)


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Splits --loops into names and checks them and --pin, or exits with a usage error."""
    args.loops = args.loops.split(",")
    unknown = set(args.loops) - LOOP_FACTORIES.keys()
    if unknown:
        parser.error(f"unknown loops: {', '.join(sorted(unknown))}")
    if args.pin is not None and args.pin not in os.sched_getaffinity(0):
        parser.error(f"CPU {args.pin} is not one this process may run on")
