"""Run every benchmark script and write their tables to BENCHMARKS.md.

Each script runs in a subprocess of its own with `--json` (and `--quick`, `--pin
CPU` when given here; `--vs PATH` goes to instructions.py); its rows become one
Markdown table. Nothing in the file is typed by hand.

    python benchmarks/run.py                                # a few minutes
    python benchmarks/run.py --vs /tmp/old-checkout         # instructions.py against it too
    python benchmarks/run.py --quick --output -             # smoke test, to stdout
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import table

HERE = Path(__file__).resolve().parent
SCRIPTS = ("instructions", "regions", "writes", "irqs", "dma", "migration", "scale", "nvme")
END_TO_END = HERE / "end_to_end.md"
"""The end-to-end section: measured by hand with QEMU and libvfio-user, kept as written."""
INTRO = """# Benchmarks

How fast is muser? Every table below was written by one command,

    {command}

which runs each script in benchmarks/ and prints its JSON report as a table;
nothing here is typed by hand. Run one script for its plain table, or
everything as a smoke test (its numbers mean nothing):

    python benchmarks/regions.py [--loops uvloop] [--pin CPU] [--json]
    python benchmarks/run.py --quick --output -

`instructions.py` counts CPU instructions per operation under valgrind's
callgrind, which noise cannot move; with `--vs PATH` it measures another
checkout the same way, e.g. a worktree of an older commit made with `git
worktree add PATH COMMIT`, and its muser/baseline is this checkout's count over
that one's (lower is leaner). Every other figure is a speed held against a
baseline measured in the same process, on the same loop, repetitions
interleaved; muser/baseline is the median of the repetitions' own ratios, so a
slowdown of the machine that outlasts a repetition divides out. The machine is
a shared VM: trust the ratios more than the absolute numbers. Each script's
docstring says exactly what it measures. The last section, a Linux guest in QEMU
against libvfio-user, is measured by hand (QEMU is not part of CI) and copied in
from `benchmarks/end_to_end.md` as it is.

Machine: {machine}.
"""


def run_script(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One script's JSON report, with the wall time it took."""
    command = [sys.executable, str(HERE / f"{name}.py"), "--json"]
    if args.quick:
        command.append("--quick")
    if args.pin is not None:
        command += ["--pin", str(args.pin)]
    if name == "instructions" and args.vs:
        command += ["--vs", args.vs]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{name}.py exited with {done.returncode}:\n{done.stderr}")
    report: dict[str, Any] = json.loads(done.stdout)
    report["wall_s"] = time.perf_counter() - started
    return report


def section(name: str, report: dict[str, Any]) -> list[str]:
    doc = ast.get_docstring(ast.parse((HERE / f"{name}.py").read_text(encoding="utf-8")))
    title = (doc or "").splitlines()[0]
    return [
        f"## {name}.py: {title}",
        "",
        f"Settings: `{json.dumps(report['settings'])}`; {report['wall_s']:.0f} s.",
        "",
        *table(report["rows"], markdown=True),
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--pin", type=int, metavar="CPU", help="pass --pin CPU to every script")
    parser.add_argument("--vs", metavar="PATH", help="pass --vs PATH to instructions.py")
    parser.add_argument("--output", default="BENCHMARKS.md", help="a file, or - for stdout")
    parser.add_argument("--scripts", default=",".join(SCRIPTS), help="comma-separated")
    args = parser.parse_args()
    reports = {}
    for name in args.scripts.split(","):
        print(f"running {name}.py ...", file=sys.stderr, flush=True)
        reports[name] = run_script(name, args)
    machine = next(iter(reports.values()))["machine"]
    facts = f"{machine['cpu_model']}, {machine['cpus_usable']} of {machine['cpus']} CPUs usable"
    facts += (
        f", pinned to CPU {machine['pinned_cpu']}" if machine["pinned_cpu"] is not None else ""
    )
    facts += f"; {machine['python']}, uvloop {machine['uvloop']}; {machine['platform']}"
    command = " ".join(["python", "benchmarks/run.py", *sys.argv[1:]])
    lines = [INTRO.format(command=command, machine=facts)]
    for name, report in reports.items():
        lines += section(name, report)
    lines.append(END_TO_END.read_text(encoding="utf-8"))
    text = "\n".join(lines)
    if args.output == "-":
        print(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
