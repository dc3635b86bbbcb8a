"""status_http: an asyncio service you already run, now also serving a muser device.

A small HTTP/1.0 status endpoint (standard library only) and the gpio sample device
share one event loop; GET /status answers the device's live state as JSON:

    python -m muser_samples.status_http --port 8080 --socket /tmp/gpio.sock
    curl http://127.0.0.1:8080/status

`StatusService` only adds itself to whatever loop runs it: logging setup, signal
handling and the choice of loop belong to the application, here `main`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self

import muser
from muser.loading import configure_logging

from .gpio import Gpio

REQUEST_TIMEOUT = 5.0
"""Seconds a client may take to send its request before it is dropped."""


class CountingGpio(Gpio):
    """The gpio sample, counting the change-of-state interrupts it raises and
    knowing its client through the lifecycle hooks."""

    def __init__(self) -> None:
        self.interrupts = 0
        self.client: muser.ClientInfo | None = None
        self.last_disconnect: muser.DisconnectReason | None = None
        super().__init__()

    def connected(self, client: muser.ClientInfo) -> None:
        self.client = client

    def disconnected(self, reason: muser.DisconnectReason) -> None:
        self.client, self.last_disconnect = None, reason

    def write_register(self, register: int, value: int) -> None:
        was_pending = self.irq_pending
        super().write_register(register, value)
        if self.irq_pending and not was_pending:
            self.interrupts += 1


def http_response(status: HTTPStatus, body: dict[str, Any]) -> bytes:
    content = json.dumps(body).encode()
    head = (
        f"HTTP/1.0 {status.value} {status.phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(content)}\r\n"
        "\r\n"
    )
    return head.encode() + content


class StatusService:
    """A gpio device at `socket_path` and its status at http://host:port/status."""

    def __init__(self, socket_path: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.device = CountingGpio()
        self.server = muser.Server(self.device, socket_path)
        self.host = host
        self.port = port
        """The HTTP port; with 0, the one the system picked once started."""
        self._http: asyncio.Server | None = None

    def status(self) -> dict[str, Any]:
        device = self.device
        return {
            "device": device.name,
            "socket": self.server.path,
            "client": None
            if device.client is None
            else {"pid": device.client.pid, "version": device.client.version},
            "last_disconnect": None
            if device.last_disconnect is None
            else device.last_disconnect.value,
            "outputs": device.outputs,
            "inputs": device.inputs,
            "irq_enabled": device.irq_enabled,
            "irq_pending": device.irq_pending,
            "interrupts": device.interrupts,
        }

    async def start(self) -> None:
        await self.server.start_serving()
        try:
            self._http = await asyncio.start_server(self._answer, self.host, self.port)
        except BaseException:
            await self.close()  # the port is taken: don't leave the device serving
            raise
        self.port = self._http.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._http is not None:
            self._http.close()
        self.server.close()
        if self._http is not None:
            await self._http.wait_closed()
        await self.server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                method, target = await read_request(reader)
            if target != "/status":
                writer.write(http_response(HTTPStatus.NOT_FOUND, {"error": "try /status"}))
            elif method != "GET":
                writer.write(http_response(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "GET only"}))
            else:
                writer.write(http_response(HTTPStatus.OK, self.status()))
            await writer.drain()
        except (ConnectionError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The method and target of a request; its headers are read and ignored."""
    method, target, _version = (await reader.readline()).decode("latin-1").split()
    while (await reader.readline()).strip():
        pass
    return method, target


async def serve(socket_path: str, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with StatusService(socket_path, host, port) as service:
        print(f"gpio on {service.server.path}", file=sys.stderr)
        print(f"status at http://{host}:{service.port}/status", file=sys.stderr)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m muser_samples.status_http")
    parser.add_argument("--socket", default="/tmp/muser-status-http.sock", metavar="PATH")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    configure_logging("info", "console")
    asyncio.run(serve(args.socket, args.host, args.port))


if __name__ == "__main__":
    main()
