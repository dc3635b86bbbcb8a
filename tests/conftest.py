"""Every async test runs twice: on asyncio's default loop and on uvloop."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import pytest
import structlog
import uvloop
from hypothesis import settings

from muser import Client, Server
from tests.helpers import RecordingDevice

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
settings.register_profile("muser", deadline=None, print_blob=True)
settings.load_profile("muser")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A short private directory: UNIX socket paths must stay under 108 bytes."""
    path = tempfile.mkdtemp(prefix="mu-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "dev.sock")


@pytest.fixture
def device() -> RecordingDevice:
    return RecordingDevice()


@pytest.fixture
async def server(device: RecordingDevice, sock_path: str) -> AsyncIterator[Server]:
    async with Server(device, sock_path) as running:
        yield running


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    async with await Client.connect(server.path) as connected:
        yield connected
