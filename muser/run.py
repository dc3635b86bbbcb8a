"""`python -m muser.run`: serve sample devices or your own from the command line.

This is an application, so unlike the library it configures structlog, picks the
event loop (uvloop unless told otherwise, through a loop factory, never a global
policy) and handles SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from muser.device import PciDevice
from muser.device.dma import DmaLayout
from muser.loading import (
    DEFAULT_SAMPLE,
    configure_logging,
    device_options,
    load_device_factory,
    loop_factory,
    sample_names,
)
from muser.server import (
    DEFAULT_MESSAGE_TIMEOUT,
    DEFAULT_NEGOTIATION_TIMEOUT,
    Server,
    is_listening,
)
from muser.workers import run_workers, shares


def default_socket_path(name: str) -> str:
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(runtime_dir, f"muser-{name.replace(':', '-').replace('.', '-')}.sock")


def qemu_hint(path: str) -> str:
    return (
        "attach QEMU with:\n"
        f'  -device \'{{"driver":"vfio-user-pci","socket":{{"type":"unix",'
        f'"path":"{path}"}}}}\'\n'
        "  and share guest RAM so DMA is direct: -object memory-backend-memfd,id=mem,"
        "size=<RAM>,share=on -machine memory-backend=mem\n"
        "  (memory QEMU does not share is reached by messages, in QEMU's layout, which\n"
        "  muser finds out by itself; --dma-layout qemu saves it asking)"
    )


def inherited_socket(fd: int) -> socket.socket:
    """The socket a parent passed as fd `fd`, listening or already connected."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise SystemExit(f"--fd {fd}: not a socket: {exc.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.close()
        raise SystemExit(f"--fd {fd}: not a UNIX stream socket")
    sock.set_inheritable(False)
    return sock


def announce(server: Server, listening: bool) -> None:
    if listening:
        print(f"{server.device.name}: serving on {server.path}", file=sys.stderr)
        print(qemu_hint(server.path), file=sys.stderr)
    else:
        print(f"{server.device.name}: serving its connected client", file=sys.stderr)


async def serve(
    devices: Sequence[tuple[PciDevice, str | socket.socket]], options: Mapping[str, Any]
) -> None:
    """Serve until SIGTERM/SIGINT, or until every server is done (the clients of
    inherited connected sockets have left). `options` go to every `Server`."""
    servers = [
        Server(device, where, **options)
        if isinstance(where, str)
        else Server(device, sock=where, **options)
        for device, where in devices
    ]
    listening = [isinstance(where, str) or is_listening(where) for _, where in devices]

    def close_all() -> None:
        for server in servers:
            server.close()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, close_all)
    try:
        for server, accepts in zip(servers, listening, strict=True):
            await server.start_serving()
            announce(server, accepts)
        await asyncio.gather(*(server.serve_forever() for server in servers))
    finally:
        close_all()
        for server in servers:
            await server.wait_closed()


def _seconds(text: str) -> float | None:
    """A timeout in seconds; 0 for none."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value or None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _file_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not an octal file mode") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text} is not a file mode (000-777)")
    return mode


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """What the command line says about serving, as `Server` takes it."""
    return {
        "dma_layout": None if args.dma_layout is None else DmaLayout(args.dma_layout),
        "trace": args.trace,
        "negotiation_timeout": args.negotiation_timeout,
        "message_timeout": args.message_timeout,
        "fd_budget": args.fd_budget,
        "mode": args.socket_mode,
        "allowed_uids": args.allow_uid,
        "allowed_gids": args.allow_gid,
    }


def _add_client_limits(group: argparse._ArgumentGroup) -> None:
    """Who may connect, and how long and how much a client may hold a device."""
    group.add_argument(
        "--negotiation-timeout",
        type=_seconds,
        default=DEFAULT_NEGOTIATION_TIMEOUT,
        metavar="SECONDS",
        help="close a client that has not sent VERSION this long after connecting "
        f"(default {DEFAULT_NEGOTIATION_TIMEOUT:g}; 0 waits forever)",
    )
    group.add_argument(
        "--message-timeout",
        type=_seconds,
        default=DEFAULT_MESSAGE_TIMEOUT,
        metavar="SECONDS",
        help="close a client whose message has begun but not arrived whole this long "
        f"after (default {DEFAULT_MESSAGE_TIMEOUT:g}; 0 waits forever)",
    )
    group.add_argument(
        "--fd-budget",
        type=_positive,
        metavar="N",
        help="descriptors a client's DMA windows may keep open "
        "(default: a quarter of the open-files limit)",
    )
    group.add_argument(
        "--socket-mode",
        type=_file_mode,
        default=0o600,
        metavar="MODE",
        help="permissions of the socket files, in octal (default 600: only this user)",
    )
    group.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        metavar="UID",
        help="only accept clients running as this user id (repeatable)",
    )
    group.add_argument(
        "--allow-gid",
        type=int,
        action="append",
        metavar="GID",
        help="only accept clients running with this group id (repeatable)",
    )


def _add_device_options(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> dict[str, list[str]]:
    """A group of options for each device named in `argv` whose module adds some
    (`add_arguments`); the options' names for each."""
    names: dict[str, list[str]] = {}
    for token in argv:
        adder = None if token.startswith("-") or token in names else device_options(token)
        if adder is not None:
            scratch = argparse.ArgumentParser(add_help=False)
            adder(scratch)
            names[token] = list(vars(scratch.parse_args([])))
            adder(parser.add_argument_group(f"{token} options"))
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; `device_options` maps each device to the options its factory
    takes, as keyword arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
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
        "--fd",
        action="append",
        type=int,
        default=[],
        metavar="N",
        help="an inherited socket fd, once per device in order instead of --socket: "
        "a listening one is accepted from, a connected one served until its client leaves",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-format", default="console", choices=["console", "json"])
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    parser.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="spread the devices over N processes, each device served by one, to use "
        "N cores (default 1: one process)",
    )
    parser.add_argument(
        "--dma-layout",
        choices=[layout.value for layout in DmaLayout],
        help="DMA_READ/DMA_WRITE layout (only used for guest memory that is not shared): "
        "auto asks each client, qemu is QEMU's vfio-user-pci, whose layout differs from "
        "the spec's (default: the device's choice, auto unless it names one)",
    )
    _add_client_limits(parser.add_argument_group("client limits"))
    parser.add_argument(
        "--trace",
        metavar="FILE",
        help="append every message in and out to FILE as JSON lines "
        "(replay with python -m muser.trace replay FILE DEVICE)",
    )
    option_names = _add_device_options(parser, argv)
    args = parser.parse_args(argv)
    args.device_options = {
        spec: {name: getattr(args, name) for name in option_names.get(spec, [])}
        for spec in args.devices
    }
    if args.socket and args.fd:
        parser.error("--socket and --fd do not mix")
    if len(args.socket) > len(args.devices) or len(args.fd) > len(args.devices):
        parser.error("more --socket or --fd options than devices")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    work = shares(len(args.devices), args.workers)
    if len(work) == 1:
        serve_devices(args, work[0])
        return

    def serve_share(worker: int, share: Sequence[int]) -> None:
        for position, fd in enumerate(args.fd):
            if position not in share:
                os.close(fd)
        structlog.contextvars.bind_contextvars(worker=worker)
        serve_devices(args, share)

    def let_go() -> None:
        for fd in args.fd:
            os.close(fd)

    raise SystemExit(run_workers(work, serve_share, forked=let_go))


def serve_devices(args: argparse.Namespace, positions: Sequence[int]) -> None:
    """Build and serve the devices at `positions` of the command line, on one loop."""
    devices: list[tuple[PciDevice, str | socket.socket]] = []
    for position in positions:
        spec = args.devices[position]
        device = load_device_factory(spec)(**args.device_options[spec])
        if position < len(args.fd):
            devices.append((device, inherited_socket(args.fd[position])))
        elif position < len(args.socket):
            devices.append((device, args.socket[position]))
        else:
            devices.append((device, default_socket_path(spec)))
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(serve(devices, server_options(args)))


if __name__ == "__main__":
    main()
