"""`python -m muser.run`: serve sample devices or your own from the command line.

This is an application, so unlike the library it configures structlog, picks the
event loop (uvloop unless told otherwise, through a loop factory, never a global
policy) and handles SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import pkgutil
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from muser.device import PciDevice
from muser.device.dma import DmaLayout
from muser.server import Server

SAMPLE_PACKAGE = "muser_samples"
DEFAULT_SAMPLE = "gpio"


def sample_names() -> list[str]:
    package = importlib.import_module(SAMPLE_PACKAGE)
    return sorted(module.name for module in pkgutil.iter_modules(package.__path__))


def load_device_factory(spec: str) -> Callable[[], PciDevice]:
    """A sample name (`null`) or an import string (`package.module:attr`)."""
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
    elif spec in sample_names():
        module_name, attribute = f"{SAMPLE_PACKAGE}.{spec}", "create"
    else:
        raise SystemExit(
            f"unknown device {spec!r}: not a sample ({', '.join(sample_names())}) "
            "and not package.module:attr"
        )
    factory = getattr(importlib.import_module(module_name), attribute)
    if not callable(factory):
        raise SystemExit(f"{spec} is not callable")
    return factory  # type: ignore[no-any-return]


def default_socket_path(name: str) -> str:
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(runtime_dir, f"muser-{name.replace(':', '-').replace('.', '-')}.sock")


def configure_logging(level: str, log_format: str) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop  # noqa: PLC0415 - only the CLI depends on choosing it

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def qemu_hint(path: str) -> str:
    return (
        "attach QEMU with:\n"
        f'  -device \'{{"driver":"vfio-user-pci","socket":{{"type":"unix",'
        f'"path":"{path}"}}}}\'\n'
        "  and share guest RAM so DMA is direct: -object memory-backend-memfd,id=mem,"
        "size=<RAM>,share=on -machine memory-backend=mem\n"
        "  (memory QEMU does not share is reached by messages: run with --dma-layout qemu)"
    )


async def serve(devices: Sequence[tuple[PciDevice, str]], dma_layout: DmaLayout) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    servers = [Server(device, path, dma_layout=dma_layout) for device, path in devices]
    try:
        for server in servers:
            await server.start_serving()
            print(f"{server.device.name}: serving on {server.path}", file=sys.stderr)
            print(qemu_hint(server.path), file=sys.stderr)
        await stop.wait()
    finally:
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    samples = ", ".join(sample_names())
    parser = argparse.ArgumentParser(
        prog="python -m muser.run",
        description=f"Serve vfio-user devices. Samples: {samples}.",
    )
    parser.add_argument(
        "devices",
        nargs="*",
        default=[DEFAULT_SAMPLE],
        metavar="DEVICE",
        help=f"a sample name ({samples}) or package.module:factory (default: {DEFAULT_SAMPLE})",
    )
    parser.add_argument(
        "--socket",
        action="append",
        default=[],
        metavar="PATH",
        help="socket path, once per device in order "
        "(default: $XDG_RUNTIME_DIR or /tmp, muser-NAME.sock)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-format", default="console", choices=["console", "json"])
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    parser.add_argument(
        "--dma-layout",
        default=DmaLayout.SPEC.value,
        choices=[layout.value for layout in DmaLayout],
        help="DMA_READ/DMA_WRITE layout: qemu for QEMU's vfio-user-pci, whose layout "
        "differs from the spec (only used for guest memory that is not shared)",
    )
    args = parser.parse_args(argv)
    if len(args.socket) > len(args.devices):
        parser.error("more --socket options than devices")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    devices = []
    for position, spec in enumerate(args.devices):
        device = load_device_factory(spec)()
        path = args.socket[position] if position < len(args.socket) else default_socket_path(spec)
        devices.append((device, path))
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(serve(devices, DmaLayout(args.dma_layout)))


if __name__ == "__main__":
    main()
