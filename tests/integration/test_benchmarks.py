"""Every benchmark script runs in its smoke-test form and its report makes a table.

Speed is never asserted: only that each script exits 0 with `--quick --json`, with
positive numbers, and that benchmarks/run.py prints them as a Markdown table.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_runner() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # run.py imports common, as the scripts do
    spec = importlib.util.spec_from_file_location("benchmarks_run", BENCHMARKS / "run.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RUNNER = load_runner()


def test_every_script_is_run() -> None:
    scripts = {path.stem for path in BENCHMARKS.glob("*.py")} - {"run", "common"}
    assert scripts == set(RUNNER.SCRIPTS)


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("script", RUNNER.SCRIPTS)
def test_quick_json_makes_a_table(script: str) -> None:
    if script == "instructions" and shutil.which("valgrind") is None:
        pytest.skip("valgrind is not on PATH")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rows"]
    for row in report["rows"]:
        numbers = [row["muser"]["median"]]
        if row["baseline"] is not None:
            numbers += [row["baseline"]["median"], row["ratio"]]
        assert all(map(positive, numbers)), row
    report["wall_s"] = 1.0
    lines = RUNNER.section(script, report)
    assert "| benchmark | against | loop | unit | muser | baseline | muser/baseline |" in lines[4]
    assert len([line for line in lines if line.startswith("| ")]) == 1 + len(report["rows"])
