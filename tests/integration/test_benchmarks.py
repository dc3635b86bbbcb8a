"""Every benchmark script runs in its smoke-test form and reports figures.

Speed is never asserted: only that each script exits 0 with `--quick --json`, and
that benchmarks/run.py reads its JSON as figures with positive numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_run", BENCHMARKS / "run.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


RUNNER = load_runner()


def test_every_script_is_run() -> None:
    scripts = {path.stem for path in BENCHMARKS.glob("*.py")} - {"run", "common"}
    assert scripts == set(RUNNER.SCRIPTS) == set(RUNNER.FIGURES)


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("script", RUNNER.SCRIPTS)
def test_quick_json_has_figures(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["machine"]["cpu_count"] >= 1
    figures = RUNNER.FIGURES[script](report)
    assert figures
    for figure in figures:
        assert figure.rows, figure.title
        for row in figure.rows:
            assert positive(row.muser), (figure.title, row)
            assert positive(row.baseline), (figure.title, row)
            assert positive(row.ratio), (figure.title, row)
            for name, value in row.columns.items():
                if value is None:
                    continue
                if "RSS" in name:  # memory growth per device may round to nothing
                    assert value >= 0, (figure.title, row)
                else:
                    assert positive(value), (figure.title, row)
    table = "\n".join(RUNNER.figure_table(figures[0]))
    assert "| loop | muser | baseline | muser/baseline |" in table
