"""Generate docs/api.md from the public API's signatures and docstrings, so the
reference cannot drift from the code (a test compares the two).

    python -m tests.api_reference > docs/api.md
"""

from __future__ import annotations

import enum
import inspect
import re
from collections.abc import Iterator
from typing import Any

import muser
import muser.testing
from muser.device.dma import DmaSpace, DmaView
from muser.device.irq import Interrupts, IntxIrq, Irq
from muser.pci.config import ConfigSpace

_QUALIFIED = re.compile(r"\b(?:[a-z_]+\.)+([A-Z]\w*)")

HEADER = """# API reference

Generated from the code by `python -m tests.api_reference > docs/api.md`; a test
keeps it current. Three parts: what `import muser` exports (`muser.__all__`); the
objects a device's attributes hold (`device.config`, `device.irqs`, `device.dma`),
which device code touches most; and `muser.testing`, the pytest plugin and
helpers for testing a device. The guide (`docs/guide.md`) and its testing chapter
(`docs/testing.md`) show how the pieces fit together.

# `muser`
"""

DEVICE_OBJECTS: list[tuple[str, type, tuple[str, ...]]] = [
    ("device.config", ConfigSpace, ("register", "set_register", "offset_of", "capabilities")),
    ("device.irqs", Interrupts, ()),
    (
        "device.irqs.intx, .msi, .msix, .err, .req",
        Irq,
        ("trigger", "explain", "has_eventfd", "is_masked", "is_pending"),
    ),
    ("device.irqs.intx", IntxIrq, ("set_level",)),
    (
        "device.dma",
        DmaSpace,
        (
            "read",
            "write",
            "view",
            "read_direct",
            "write_direct",
            "translate",
            "windows",
            "quiesce",
        ),
    ),
    ("device.dma.view(...)", DmaView, ()),
]
"""The objects behind a device's attributes, with the members device code uses (the
rest are muser's own)."""


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _signature(obj: Any) -> str:
    """The signature with annotations resolved and module paths dropped."""
    try:
        text = str(inspect.signature(obj, eval_str=True))
    except NameError:  # an annotation only imported for type checking
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return _QUALIFIED.sub(r"\1", text)


def _inherited_summary(cls: type, name: str) -> str:
    """An override without a docstring of its own is described by the one it overrides."""
    for klass in cls.__mro__:
        value = vars(klass).get(name)
        function = value.fget if isinstance(value, property) else value
        if function is not None and inspect.getdoc(function):
            return _summary(function)
    return ""


def _members(cls: type, only: tuple[str, ...] | None = None) -> Iterator[str]:
    for name, value in vars(cls).items():
        if name.startswith("_") or (only is not None and name not in only):
            continue
        if isinstance(value, property):
            yield f"- `{name}` (property): {_inherited_summary(cls, name)}"
        elif isinstance(value, classmethod | staticmethod):
            function = value.__func__
            yield f"- `{name}{_signature(function)}`: {_summary(function)}"
        elif inspect.isfunction(value):
            prefix = "async " if inspect.iscoroutinefunction(value) else ""
            summary = _inherited_summary(cls, name)
            yield f"- `{prefix}{name}{_signature(value)}`: {summary}"


def _section(name: str, obj: Any) -> str:
    if inspect.isclass(obj) and issubclass(obj, enum.Enum):
        members = ", ".join(f"`{member.name}`" for member in obj)
        return f"## `{name}`\n\n{_summary(obj)}\n\nMembers: {members}.\n"
    if inspect.isclass(obj):
        lines = [f"## `{name}{_signature(obj)}`", "", _summary(obj), ""]
        lines.extend(_members(obj))
        return "\n".join(lines).rstrip() + "\n"
    prefix = "async " if inspect.iscoroutinefunction(obj) else ""
    return f"## `{prefix}{name}{_signature(obj)}`\n\n{_summary(obj)}\n"


def _object_section(where: str, cls: type, only: tuple[str, ...]) -> str:
    lines = [f"## `{where}`: `{cls.__name__}`", "", _summary(cls), ""]
    lines.extend(_members(cls, only))
    return "\n".join(lines).rstrip() + "\n"


def reference() -> str:
    sections = [_section(name, getattr(muser, name)) for name in sorted(muser.__all__)]
    objects = [_object_section(where, cls, only) for where, cls, only in DEVICE_OBJECTS]
    testing = [_section(name, getattr(muser.testing, name)) for name in muser.testing.__all__]
    return "\n".join(
        [
            HEADER,
            *sections,
            "# What a device's attributes hold\n",
            *objects,
            "# `muser.testing`\n\n" + _summary(muser.testing) + "\n",
            *testing,
        ]
    )


if __name__ == "__main__":
    print(reference(), end="")
