"""Commands whose capability lands later are refused cleanly: ENOTSUP, the fds that
came with them closed, and the connection goes on. The client's methods for them
already build well-formed requests."""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from muser import Client, VfioUserError
from muser.wire.constants import Command
from tests.helpers import open_fds

Call = Callable[[Client, list[int]], Awaitable[Any]]


def calls() -> list[tuple[Command, Call]]:
    return [
        (Command.MIG_DATA_READ, lambda c, _: c.mig_data_read(4096)),
        (Command.MIG_DATA_WRITE, lambda c, _: c.mig_data_write(b"state")),
    ]


@pytest.mark.parametrize(
    ("command", "call"), calls(), ids=lambda value: getattr(value, "name", "")
)
async def test_refused_with_enotsup(client: Client, command: Command, call: Call) -> None:
    before = open_fds()
    fds = [os.memfd_create("guest-ram"), os.eventfd(0)]
    with pytest.raises(VfioUserError) as caught:
        await call(client, fds)
    for fd in fds:
        os.close(fd)
    assert caught.value.errno == errno.ENOTSUP
    assert str(caught.value).startswith(f"{command.name} failed")
    assert await client.region_read(7, 0, 2) == b"\xf4\x1a"
    assert open_fds() == before
