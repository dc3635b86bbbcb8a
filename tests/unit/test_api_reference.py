"""The public API is documented, and docs/api.md says what the code says."""

from __future__ import annotations

from pathlib import Path

import muser
from tests.api_reference import reference

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_every_public_name_and_member_has_a_docstring() -> None:
    undocumented = [line for line in reference().splitlines() if line.endswith(": ")]
    assert undocumented == []
    assert "\n\n\n" not in reference(), "a public name without a docstring"


def test_all_lists_only_what_muser_exports() -> None:
    assert sorted(set(muser.__all__)) == sorted(muser.__all__)
    assert all(hasattr(muser, name) for name in muser.__all__)


def test_docs_api_md_is_current() -> None:
    assert API_MD.read_text() == reference(), "run: python -m tests.api_reference > docs/api.md"
