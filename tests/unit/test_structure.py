"""The shape of muser/, from its source: no import cycles (every import statement
counts, lazy and TYPE_CHECKING ones too), each layer imports only from itself and
below, the session core does no I/O, and no class or function outgrows a reading."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "muser"

LAYERS = [
    ("wire", ("muser.errors", "muser.log_limit", "muser.wire")),
    ("pci", ("muser.pci",)),
    ("device", ("muser.device",)),
    ("session", ("muser.session",)),
    (
        "adapter",
        (
            "muser.transport",
            "muser.endpoint",
            "muser.connection",
            "muser.client",
            "muser.recording",
        ),
    ),
    (
        "application",
        (
            "muser.server",
            "muser.trace",
            "muser.run",
            "muser.workers",
            "muser.loading",
            "muser.lspci",
            "muser.testing",
        ),
    ),
]
"""Bottom to top: the wire format, PCI's config space and capabilities, the device
model, the sans-IO session, the asyncio adapters, and what serves and runs them. The
package itself (`muser`) sits on top."""
NO_IO_IN_SESSION = {"asyncio", "socket", "selectors", "structlog", "uvloop", "time"}
MAX_CLASS_LINES = 350
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    found = {}
    for path in SOURCE.rglob("*.py"):
        parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module this one names in an import statement, anywhere in it: the
    submodule when `from package import name` names one, else the package."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: None if path.name == "__init__.py" else -1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return names


def graph() -> dict[str, set[str]]:
    known = modules()
    return {
        module: {name for name in imported(module, path, known) if name in known} - {module}
        for module, path in known.items()
    }


def layer_of(module: str) -> int:
    if module == "muser":
        return len(LAYERS)
    for level, (_name, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return level
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def test_every_module_has_a_layer() -> None:
    for module in modules():
        layer_of(module)


def cycle_in(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_no_import_cycles() -> None:
    assert cycle_in(graph()) is None


def test_layers_import_only_downwards() -> None:
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
        f"({LAYERS[layer_of(target)][0] if layer_of(target) < len(LAYERS) else 'muser'})"
        for module, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_the_session_core_does_no_io() -> None:
    known = modules()
    for module, path in known.items():
        if module.startswith("muser.session"):
            roots = {name.split(".")[0] for name in imported(module, path, known)}
            assert not roots & NO_IO_IN_SESSION, f"{module} imports {roots & NO_IO_IN_SESSION}"


def test_classes_and_functions_stay_readable() -> None:
    too_long = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                if lines > limit:
                    too_long.append(f"{path.relative_to(SOURCE.parent)}:{node.lineno} {node.name}")
    assert too_long == []


def test_a_lazy_import_that_closes_a_cycle_is_found(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def late():\n    from c import x\n")
    (tmp_path / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"
    )
    known = {name: tmp_path / f"{name}.py" for name in "abc"}
    edges = {name: imported(name, path, known) & set(known) for name, path in known.items()}
    assert cycle_in(edges) == ["a", "b", "c", "a"]


def test_every_package_is_installed() -> None:
    """`pip install .` ships only the packages pyproject.toml names: one left out
    imports from a checkout and fails everywhere else."""
    pyproject = tomllib.loads((SOURCE.parent / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(path.parent.relative_to(SOURCE.parent).parts)
        for path in SOURCE.rglob("__init__.py")
    }
    samples = {
        "muser_samples" + ".".join(("", *path.parent.relative_to(SOURCE.parent / "samples").parts))
        for path in (SOURCE.parent / "samples").rglob("__init__.py")
    }
    assert on_disk | samples == listed
