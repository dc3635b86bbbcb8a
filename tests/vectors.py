"""Loading the golden wire transcripts in tests/vectors (copied from shared/vectors)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

VECTOR_DIR = Path(__file__).parent / "vectors"
VECTOR_FILES = sorted(VECTOR_DIR.glob("*.json"))


@dataclass(frozen=True)
class Record:
    file: str
    index: int
    direction: str
    data: bytes
    nfds: int
    command: int
    msg_id: int
    flags: int
    session: str


def load(path: Path) -> list[Record]:
    return [
        Record(
            path.name,
            index,
            raw["dir"],
            bytes.fromhex(raw["hex"]),
            raw["nfds"],
            raw["command"],
            raw["msg_id"],
            raw["flags"],
            raw["session"],
        )
        for index, raw in enumerate(json.loads(path.read_text()))
    ]


def all_records() -> list[Record]:
    return [record for path in VECTOR_FILES for record in load(path)]
