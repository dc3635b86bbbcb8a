"""A short lifecycle soak (`python -m tests.soak` runs it long)."""

from __future__ import annotations

import pytest

from tests.soak import soak


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_connect_use_drop_cycles_leak_nothing() -> None:
    report = await soak(200, killed_every=100)
    assert (report.cycles, report.killed) == (200, 2)
    assert report.fds_after == report.fds_before
    assert report.rss_growth_kib < 4 * 1024
