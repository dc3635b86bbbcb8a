"""The docs cannot rot: every code block in README.md and docs/ is run by a test or
says why not (and a Python fragment that is not run still compiles); the testing
chapter's files pass in a fresh project of their own."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "<!-- not run by the tests: "

RUN_BY_TESTS = {
    "README.md": {
        "python3 -m venv .venv": ".ci/run runs the two commands",
        "class Counter": "test_readme.py",
        "capabilities=[": "test_readme.py",
        "device.irqs.msix.trigger(3)": "test_readme.py",
        "device.dma.read_direct(iova, 64)": "test_readme.py",
        "async def test_copy": "test_testing_plugin.py",
    },
    "guide.md": {
        "# hello_device.py": "test_guide.py",
        "# try_it.py": "test_guide.py",
        "muser.run hello_device:create": "test_guide.py",
        "python try_it.py": "test_guide.py",
    },
    "testing.md": {
        "# test_hello.py": "the fresh project below",
        "# ticker_device.py": "the fresh project below",
        "# test_ticker.py": "the fresh project below",
        "-m pytest test_hello.py": "the fresh project below",
        "from muser.testing import attach": "the fresh project below",
    },
}
"""For each document, a string that marks each block some test runs, and which."""


@dataclass(frozen=True)
class Block:
    document: str
    line: int
    language: str
    text: str
    note: str | None
    """Why it is not run, if it says so."""


def code_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, start, language = [], None, ""
    for number, line in enumerate(lines):
        if start is None and line.startswith("```") and line != "```":
            start, language = number, line[3:]
        elif start is not None and line == "```":
            before = lines[start - 1] if start else ""
            note = before[len(NOT_RUN) : -4] if before.startswith(NOT_RUN) else None
            text = "\n".join(lines[start + 1 : number]) + "\n"
            blocks.append(Block(path.name, start + 1, language, text, note))
            start = None
    return blocks


def block(document: str, marker: str) -> str:
    (found,) = [b for b in code_blocks(ROOT / document) if marker in b.text]
    return found.text


EVERY_BLOCK = [b for path in DOCS for b in code_blocks(path)]


@pytest.mark.parametrize("found", EVERY_BLOCK, ids=lambda b: f"{b.document}:{b.line}")
def test_every_code_block_is_run_or_says_why_not(found: Block) -> None:
    markers = [m for m in RUN_BY_TESTS.get(found.document, {}) if m in found.text]
    if found.note is not None:
        assert not markers, "a block that is run must not say it is not"
        assert found.note.strip()
        if found.language == "python":
            compile(found.text, found.document, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        return
    assert found.language in ("python", "sh")
    assert len(markers) == 1, f"run by no test (or ambiguous): {found.text[:60]!r}"


def test_every_marker_finds_its_block() -> None:
    for document, markers in RUN_BY_TESTS.items():
        path = ROOT / document if document == "README.md" else ROOT / "docs" / document
        texts = [b.text for b in code_blocks(path)]
        for marker in markers:
            assert sum(marker in text for text in texts) == 1, (document, marker)


@pytest.fixture(scope="module")
def fresh_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project of a device author's own: the guide's device, the testing chapter's
    files, and a pyproject.toml that says nothing about pytest or asyncio."""
    project = tmp_path_factory.mktemp("my-device")
    (project / "pyproject.toml").write_text('[project]\nname = "my-device"\nversion = "0.1"\n')
    for document, name in [
        ("docs/guide.md", "hello_device.py"),
        ("docs/testing.md", "test_hello.py"),
        ("docs/testing.md", "ticker_device.py"),
        ("docs/testing.md", "test_ticker.py"),
    ]:
        (project / name).write_text(block(document, f"# {name}"))
    return project


def test_the_testing_chapter_passes_in_a_fresh_project(fresh_project: Path) -> None:
    (command,) = block("docs/testing.md", "-m pytest test_hello.py").splitlines()
    argv = [sys.executable, *command.split()[1:], "test_ticker.py", "-p", "no:cacheprovider"]
    done = subprocess.run(
        argv, cwd=fresh_project, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b5 passed\b", done.stdout), done.stdout
    assert "warning" not in done.stdout.lower(), done.stdout


def test_attach_works_without_pytest(fresh_project: Path) -> None:
    script = fresh_project / "without_pytest.py"
    script.write_text(block("docs/testing.md", "from muser.testing import attach"))
    done = subprocess.run(
        [sys.executable, script.name],
        cwd=fresh_project, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "41" in done.stdout.splitlines()  # among muser's logs (structlog's default)
