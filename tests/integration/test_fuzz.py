"""A short run of the live-server fuzzer (`python -m tests.fuzz` runs it long), on
both loops: its clients read, never read, or close abruptly mid-message."""

from __future__ import annotations

from tests.fuzz import fuzz


async def test_live_server_survives_mutated_frames() -> None:
    report = await fuzz(3000, seed=1)
    assert report.frames == 3000
    assert report.fds_after == report.fds_before
    assert report.rss_growth_kib < 64 * 1024
