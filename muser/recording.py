"""Wire traces: every message of a server's sessions, recorded as JSON lines.

`Server(device, path, trace="session.jsonl")` appends one JSON object per message,
in and out, in the shape of the golden transcripts in `tests/vectors` (`dir`,
`hex`, `nfds`, `command`, `name`, `session`, `msg_id`, `flags`, `error`), one
object per line so a trace survives a crash up to its last message. Tracing is
off unless asked for. `python -m muser.trace replay` plays a trace back.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import structlog

from muser.wire import Frame
from muser.wire.constants import command_name
from muser.wire.messages import HEADER_CODEC

CLIENT_TO_SERVER = "c2s"
SERVER_TO_CLIENT = "s2c"
_sessions = itertools.count(1)


def vector_name(command: int) -> str:
    """A command's name as the golden transcripts spell it."""
    name = command_name(command)
    return f"VFIO_USER_{name}" if not name.isdigit() else name


class WireTrace:
    """Records one server connection's messages to a JSON-lines file (appending, so
    several sessions can share a file; each is labelled `session`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.session = f"{uuid.uuid4().hex[:12]}-{next(_sessions)}"
        """Unique across processes, so runs appending to one file stay apart."""
        self._file: IO[str] | None = open(path, "a", encoding="ascii")  # noqa: SIM115

    def received(self, frame: Frame) -> None:
        self._write(CLIENT_TO_SERVER, frame.encode(), len(frame.fds))

    def sent(self, message: bytes, nfds: int) -> None:
        self._write(SERVER_TO_CLIENT, message, nfds)

    def _write(self, direction: str, message: bytes, nfds: int) -> None:
        if self._file is None:
            return
        record = Record(direction, message, nfds, self.session)
        try:
            self._file.write(json.dumps(record.to_json()) + "\n")
            self._file.flush()
        except OSError as exc:
            # A full disk ends the trace, never the session it was recording.
            structlog.get_logger("muser").error("wire trace stopped", error=exc.strerror)
            self.close()

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()


@dataclass(frozen=True)
class Record:
    """One message as it went over the socket."""

    direction: str
    data: bytes
    nfds: int
    session: str

    @property
    def msg_id(self) -> int:
        return int(HEADER_CODEC.unpack_from(self.data)[0])

    @property
    def command(self) -> int:
        return int(HEADER_CODEC.unpack_from(self.data)[1])

    @property
    def flags(self) -> int:
        return int(HEADER_CODEC.unpack_from(self.data)[3])

    @property
    def error(self) -> int:
        return int(HEADER_CODEC.unpack_from(self.data)[4])

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": self.direction,
            "hex": self.data.hex(),
            "nfds": self.nfds,
            "command": self.command,
            "name": vector_name(self.command),
            "session": self.session,
            "msg_id": self.msg_id,
            "flags": self.flags,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Record:
        return cls(raw["dir"], bytes.fromhex(raw["hex"]), raw["nfds"], str(raw["session"]))

    def describe(self) -> str:
        return f"{vector_name(self.command)} msg_id {self.msg_id}"


def load(path: str | os.PathLike[str]) -> list[Record]:
    """A trace's records, from JSON lines (what `WireTrace` writes) or a JSON list
    (the golden transcripts in tests/vectors)."""
    text = Path(path).read_text(encoding="ascii")
    if text.lstrip().startswith("["):
        raws = json.loads(text)
    else:
        raws = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Record.from_json(raw) for raw in raws]


def sessions(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Records grouped by session, sessions in the order they started."""
    grouped: dict[str, list[Record]] = {}
    for record in records:
        grouped.setdefault(record.session, []).append(record)
    return grouped
