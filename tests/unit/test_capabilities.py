"""VERSION capabilities: spec defaults, validation, compact output."""

from __future__ import annotations

import pytest

from muser.errors import ProtocolError
from muser.wire import Capabilities, build_capabilities, parse_capabilities


def test_empty_means_defaults() -> None:
    assert parse_capabilities(b"") == Capabilities()
    assert Capabilities().max_msg_fds == 1
    assert Capabilities().max_data_xfer_size == 1 << 20


def test_qemu_capabilities() -> None:
    caps = parse_capabilities(
        b'{"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576, '
        b'"pgsizes": 4096, "max_dma_maps": 65535, "write_multiple": true, '
        b'"migration": {"pgsize": 4096, "max_bitmap_size": 268435456}}}\0'
    )
    assert caps.max_msg_fds == 16
    assert caps.write_multiple is True
    assert caps.migration_pgsize == 4096
    assert caps.offered == {
        "max_msg_fds",
        "max_data_xfer_size",
        "pgsizes",
        "max_dma_maps",
        "write_multiple",
        "migration",
    }


def test_unknown_members_are_ignored() -> None:
    caps = parse_capabilities(b'{"capabilities": {"future": [1, 2]}, "other": null}\0')
    assert caps.offered == {"future"}


def test_twin_socket() -> None:
    assert parse_capabilities(b'{"capabilities":{"twin_socket":{"supported":true}}}\0').twin_socket


@pytest.mark.parametrize(
    "raw",
    [
        b"{}",
        b"{}\0\0",
        b"\0",
        b'{"capabilities":{"max_msg_fds":true}}\0',
        b'{"capabilities":{"max_msg_fds":1.5}}\0',
        b'{"capabilities":{"max_data_xfer_size":4294967296}}\0',
        b'{"capabilities":{"pgsizes":0}}\0',
        b'{"capabilities":{"pgsizes":2048}}\0',
        b'{"capabilities":{"twin_socket":{"supported":"yes"}}}\0',
        b'{"capabilities":{"migration":{"pgsize":"4096"}}}\0',
        b'{"capabilities":{"migration":[]}}\0',
        b'{"capabilities":{"max_msg_fds":' + b"9" * 5000 + b"}}\0",
    ],
)
def test_invalid(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_capabilities(raw)


def test_build_is_compact_and_nul_terminated() -> None:
    assert build_capabilities({"max_msg_fds": 8}) == b'{"capabilities":{"max_msg_fds":8}}\0'
    assert parse_capabilities(build_capabilities({"pgsizes": 8192})).pgsizes == 8192
