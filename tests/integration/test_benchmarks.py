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


def test_targets_judge_the_rows_they_name() -> None:
    msix = RUNNER.Figure(
        "MSI-X trigger",
        "triggers/s",
        "bare eventfd_write",
        [RUNNER.Row("asyncio", 7.0, 10.0, 0.7), RUNNER.Row("uvloop", 8.0, 10.0, 0.8)],
    )
    scale_title = next(target.figure for target in RUNNER.TARGETS if target.column)
    memory = "RSS KiB per served device"
    scale = RUNNER.Figure(
        scale_title,
        "µs (median)",
        "raw connect",
        [
            RUNNER.Row("uvloop, N = 10", 1.0, 1.0, 1.0, {memory: 500.0}),
            RUNNER.Row("uvloop, N = 1000", 1.0, 1.0, 1.0, {memory: 15.0}),
        ],
    )
    table = "\n".join(RUNNER.target_table([msix, scale]))
    assert "| MSI-X trigger | asyncio | 0.700 | no |" in table
    assert "| MSI-X trigger | uvloop | 0.800 | yes |" in table
    assert "| uvloop, N = 1000 | 15.0 | yes |" in table
    assert "N = 10 |" not in table, "only the rows a target names are judged"
    assert not list(RUNNER.target_table([])), "no figures, no table"
