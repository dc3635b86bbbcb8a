"""Run every benchmark and write their figures to one Markdown file.

Each script in benchmarks/ runs in a subprocess of its own with `--json` (and
`--quick` and `--pin CPU` when given here); its JSON report is turned into tables,
one per figure: muser's number, the baseline's, the ratio muser/baseline and,
where the script reports them, p50/p99 latencies (and memory, for scale). Each
section starts with the speed targets of issue 9, judged from those same rows.
Nothing in the tables is typed by hand: every number comes from a script's report.

    python benchmarks/run.py                           # every script, a few minutes
    python benchmarks/run.py --quick                   # smoke test, several seconds
    python benchmarks/run.py --pin 0 --output BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCRIPTS = (
    "region_read",
    "config_read",
    "fast_paths",
    "irq_trigger",
    "dma_copy",
    "migration",
    "scale",
)


# Figure titles the targets below name too: declared once, so a renamed figure
# cannot drop its target silently.
REGION_READ_RAW = "REGION_READ, 4 bytes of BAR0, muser's server (raw client)"
MSIX_TRIGGER = "MSI-X trigger"
INTX_TRIGGER = "INTx trigger + unmask"
MAPPED_READ = "mapped DMA: read_direct -> bytes"
MAPPED_WRITE = "mapped DMA: write_direct(bytes)"
MAPPED_VIEW = "mapped DMA: view(write=True)[:] = src"
DEVICE_SETUP = "device set-up as QEMU realizes it (connect, VERSION, 15 info queries), per device"


@dataclass
class Row:
    """One line of a figure's table: one loop (and size, or N), both numbers, their ratio."""

    label: str
    muser: float
    baseline: float
    ratio: float
    columns: dict[str, float | None] = field(default_factory=dict)
    """Further columns by name: p50/p99 in µs, and memory where a script measures it."""


@dataclass
class Figure:
    """One table: what muser does, what it is held against, and in what unit."""

    title: str
    unit: str
    baseline: str
    rows: list[Row] = field(default_factory=list)
    lower_is_better: bool = False


def latency(result: dict[str, Any], prefix: str) -> dict[str, float | None]:
    return {f"{prefix} p50 µs": result.get("p50_us"), f"{prefix} p99 µs": result.get("p99_us")}


def figure(
    report: dict[str, Any],
    title: str,
    unit: str,
    baseline: str,
    keys: tuple[str, str],
    value: str,
    ratio: Callable[[dict[str, Any]], float] | None = None,
) -> Figure:
    """One row per loop of `report`: result `keys` (muser's, the baseline's) by `value`.

    The ratio is the script's, through `ratio`, or else muser/baseline of `value`;
    p50/p99 come along where the results have them.
    """
    made = Figure(title, unit, baseline)
    for name, loop in report["loops"].items():
        muser, base = loop[keys[0]], loop[keys[1]]
        latencies = {}
        if muser.get("p50_us") is not None:
            latencies = {**latency(muser, "muser"), **latency(base, "baseline")}
        made.rows.append(
            Row(
                name,
                muser[value],
                base[value],
                ratio(loop) if ratio else muser[value] / base[value],
                latencies,
            )
        )
    return made


def ratio_at(*path: str) -> Callable[[dict[str, Any]], float]:
    """A figure's ratio as its script computed it: `loop["ratio"]`, then `path`."""

    def read(loop: dict[str, Any]) -> float:
        value = loop["ratio"]
        for key in path:
            value = value[key]
        return float(value)

    return read


def region_read(report: dict[str, Any]) -> list[Figure]:
    return [
        figure(
            report,
            REGION_READ_RAW,
            "round trips/s",
            "raw socketpair echo",
            ("muser", "baseline"),
            "round_trips_per_s",
            ratio_at(),
        ),
        figure(
            report,
            "REGION_READ, 4 bytes of BAR0, muser.Client to muser's server",
            "round trips/s",
            "raw socketpair echo",
            ("muser_client", "baseline"),
            "round_trips_per_s",
            lambda loop: float(loop["client_ratio"]),
        ),
    ]


def config_read(report: dict[str, Any]) -> list[Figure]:
    shapes = (
        ("config", "baseline", "config/baseline", "config space, 4 bytes"),
        ("bar0", "baseline", "bar0/baseline", "BAR0, 4 bytes"),
        ("config_256", "baseline_256", "config 256/baseline 256", "config space, 256 bytes"),
    )
    return [
        figure(
            report,
            f"REGION_READ of {what}",
            "round trips/s",
            "raw socketpair echo, same byte counts",
            (key, base),
            "round_trips_per_s",
            ratio_at(ratio),
        )
        for key, base, ratio, what in shapes
    ]


def fast_paths(report: dict[str, Any]) -> list[Figure]:
    writes = (
        ("posted_write", "posted REGION_WRITE, 4 bytes, fenced by a read"),
        ("write_multi", "REGION_WRITE_MULTI, batches of 200 4-byte writes"),
    )
    return [
        *(
            figure(
                report,
                title,
                "writes/s",
                "muser REGION_READ round trips (the reference rate)",
                (key, "region_read"),
                "per_s",
                ratio_at(f"{key}/region_read"),
            )
            for key, title in writes
        ),
        figure(
            report,
            "doorbell: ioeventfd wake-up to handler",
            "wake-ups/s",
            "raw eventfd reader",
            ("doorbell", "raw_eventfd"),
            "per_s",
        ),
    ]


def irq_trigger(report: dict[str, Any]) -> list[Figure]:
    return [
        figure(
            report,
            title,
            "triggers/s",
            "bare eventfd_write",
            (key, "baseline"),
            "triggers_per_s",
            ratio_at(key),
        )
        for key, title in (
            ("muser_msix", MSIX_TRIGGER),
            ("muser_intx", INTX_TRIGGER),
        )
    ]


def size_label(size: str) -> str:
    count = int(size)
    return f"{count // 1048576} MiB" if count >= 1048576 else f"{count // 1024} KiB"


def dma_copy(report: dict[str, Any]) -> list[Figure]:
    shapes = (
        ("mapped", "read_direct", "baseline_read", MAPPED_READ),
        ("mapped", "write_direct", "baseline_write", MAPPED_WRITE),
        ("mapped", "view_write", "baseline_write", MAPPED_VIEW),
        ("message", "spec_read", "baseline", "message DMA (SPEC layout): await read"),
        ("message", "spec_write", "baseline", "message DMA (SPEC layout): await write"),
        ("message", "qemu_read", "baseline", "message DMA (QEMU layout): await read"),
        ("message", "qemu_write", "baseline", "message DMA (QEMU layout): await write"),
        ("message", "client_spec_read", "baseline", "message DMA through muser.Client: read"),
        ("message", "client_spec_write", "baseline", "message DMA through muser.Client: write"),
    )
    baselines = {"mapped": "memoryview slicing of a plain mmap", "message": "raw socketpair"}
    figures = []
    for path, key, base, title in shapes:
        made = Figure(title, "GB/s", baselines[path])
        for name, loop in report["loops"].items():
            for size, results in loop[path].items():
                made.rows.append(
                    Row(
                        f"{name}, {size_label(size)}",
                        results[key]["gb_per_s"],
                        results[base]["gb_per_s"],
                        results["ratio"][key],
                    )
                )
        figures.append(made)
    return figures


def migration(report: dict[str, Any]) -> list[Figure]:
    state = report["settings"]["state_bytes"] // 1048576
    kinds = (
        ("device_owned", f"migration of {state} MiB of device-owned state"),
        ("muser_carried", f"migration of a {state} MiB muser-carried BAR (pre-copy + stop-copy)"),
    )
    return [
        figure(
            report,
            title,
            "state MB/s",
            "raw socket relay",
            (key, "baseline"),
            "state_mb_per_s",
            ratio_at(key, "state"),
        )
        for key, title in kinds
    ]


def scale(report: dict[str, Any]) -> list[Figure]:
    setup = Figure(
        DEVICE_SETUP,
        "µs (median)",
        "raw AF_UNIX connect + one ping-pong",
        lower_is_better=True,
    )
    reads = Figure(
        "REGION_READ from every client at once (aggregate) with N devices",
        "round trips/s",
        "one client alone with all N connected",
    )
    for name, by_count in report["results"].items():
        for count, result in by_count.items():
            label = f"{name}, N = {count}"
            muser, baseline = result["setup"], result["baseline"]
            setup.rows.append(
                Row(
                    label,
                    muser["median_us"],
                    baseline["median_us"],
                    result["setup/baseline"],
                    {
                        "muser p99 µs": muser["p99_us"],
                        "baseline p99 µs": baseline["p99_us"],
                        "RSS KiB per served device": result["rss_servers_kib_per_device"][
                            "median"
                        ],
                        "RSS KiB per device + its client": result["rss_kib_per_device"]["median"],
                    },
                )
            )
            reads.rows.append(
                Row(
                    label,
                    result["aggregate_per_s"]["median"],
                    result["single_per_s"]["median"],
                    result["aggregate/single"],
                )
            )
    return [setup, reads]


FIGURES: dict[str, Callable[[dict[str, Any]], list[Figure]]] = {
    "region_read": region_read,
    "config_read": config_read,
    "fast_paths": fast_paths,
    "irq_trigger": irq_trigger,
    "dma_copy": dma_copy,
    "migration": migration,
    "scale": scale,
}
"""How to read each script's JSON report as figures."""


@dataclass(frozen=True)
class Target:
    """One of the speed targets of issue 9, read off one figure's rows."""

    goal: str
    figure: str
    """The title of the figure whose rows it judges."""
    rows: str
    """What the judged rows' labels contain ("" for every row)."""
    limit: float
    column: str | None = None
    """None: the row's muser/baseline must reach `limit`; else this column must stay
    at or under it."""


TARGETS = (
    Target(
        "REGION_READ >= 0.8x raw echo on uvloop",
        REGION_READ_RAW,
        "uvloop",
        0.8,
    ),
    Target("IRQ trigger >= 0.8x eventfd_write", MSIX_TRIGGER, "", 0.8),
    Target("IRQ trigger >= 0.8x eventfd_write", INTX_TRIGGER, "", 0.8),
    *(
        Target("DMA copies >= 0.9x memoryview copy, 64 KiB and up", title, size, 0.9)
        for title in (
            MAPPED_READ,
            MAPPED_WRITE,
            MAPPED_VIEW,
        )
        for size in ("64 KiB", "1 MiB")
    ),
    Target(
        "<= 100 KiB RSS per idle device, 1000 devices",
        DEVICE_SETUP,
        "N = 1000",
        100,
        "RSS KiB per served device",
    ),
)
"""Stated for client and server pinned to one CPU; shown for every run."""


def target_table(figures: list[Figure]) -> Iterator[str]:
    """Each target, the rows it judges, and whether each row meets it."""
    by_title = {figure.title: figure for figure in figures}
    lines = []
    for target in TARGETS:
        made = by_title.get(target.figure)
        for row in made.rows if made else ():
            if target.rows not in row.label:
                continue
            if target.column is None:
                value, met = row.ratio, row.ratio >= target.limit
            else:
                measured = row.columns.get(target.column)
                if measured is None:
                    continue
                value, met = measured, measured <= target.limit
            shown = f"{value:.3f}" if target.column is None else number(value)
            lines.append(
                f"| {target.goal} | {target.figure} | {row.label} | {shown} "
                f"| {'yes' if met else 'no'} |"
            )
    if not lines:
        return
    yield "### Targets"
    yield ""
    yield "Issue 9's targets, stated for client and server pinned to one CPU."
    yield ""
    yield "| target | figure | row | result | met |"
    yield "|---|---|---|---:|---|"
    yield from lines
    yield ""


def run_script(name: str, quick: bool, pin: int | None) -> tuple[dict[str, Any], float]:
    """One script's JSON report, and the wall time it took."""
    command = [sys.executable, str(HERE / f"{name}.py"), "--json"]
    if quick:
        command.append("--quick")
    if pin is not None:
        command += ["--pin", str(pin)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"{name}.py exited with {done.returncode}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report, elapsed


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def number(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}" if value >= 0.01 else f"{value:.2e}"


def figure_table(figure: Figure) -> Iterator[str]:
    better = "lower" if figure.lower_is_better else "higher"
    yield f"#### {figure.title}"
    yield ""
    yield f"Unit: {figure.unit} ({better} is better). Baseline: {figure.baseline}."
    yield ""
    extra = list(dict.fromkeys(key for row in figure.rows for key in row.columns))
    header = ["loop", "muser", "baseline", "muser/baseline", *extra]
    yield "| " + " | ".join(header) + " |"
    yield "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"
    for row in figure.rows:
        cells = [row.label, number(row.muser), number(row.baseline), f"{row.ratio:.3f}"]
        cells += [number(row.columns.get(key)) for key in extra]
        yield "| " + " | ".join(cells) + " |"
    yield ""


def section(
    title: str, reports: dict[str, dict[str, Any]], times: dict[str, float], command: str
) -> Iterator[str]:
    machine = next(iter(reports.values()))["machine"]
    pinned = machine["pinned_cpu"]
    loops: dict[str, str] = {}
    for report in reports.values():
        if "loop_classes" in report:
            loops.update(report["loop_classes"])
        for name, loop in report.get("loops", {}).items():
            loops[name] = loop["loop"]
    yield f"## {title}"
    yield ""
    yield f"Command: `{command}`"
    yield ""
    yield f"- CPUs: {machine['cpu_count']} ({machine['cpus_usable']} usable)"
    yield f"- CPU model: {cpu_model() or 'unknown'}"
    yield f"- pinned: {'to CPU ' + str(pinned) if pinned is not None else 'no'}"
    yield f"- Python: {machine['implementation']} {machine['python']}"
    yield f"- platform: {machine['platform']}"
    yield f"- uvloop: {machine['uvloop']}"
    yield "- loops: " + ", ".join(f"{name} = `{cls}`" for name, cls in loops.items())
    total = sum(times.values())
    yield "- wall time: " + ", ".join(f"{name} {times[name]:.1f} s" for name in reports)
    yield f"  (total {total:.0f} s)"
    yield ""
    figures = {name: FIGURES[name](report) for name, report in reports.items()}
    yield from target_table([figure for made in figures.values() for figure in made])
    for name, report in reports.items():
        yield f"### {name}.py"
        yield ""
        yield f"Settings: `{json.dumps(report['settings'])}`"
        yield ""
        for figure in figures[name]:
            yield from figure_table(figure)


def render(title: str, quick: bool, pin: int | None, scripts: list[str]) -> str:
    reports: dict[str, dict[str, Any]] = {}
    times: dict[str, float] = {}
    for name in scripts:
        print(f"running {name}.py ...", file=sys.stderr, flush=True)
        reports[name], times[name] = run_script(name, quick, pin)
    command = "python benchmarks/run.py" + (" --quick" if quick else "")
    if pin is not None:
        command += f" --pin {pin}"
    return "\n".join(section(title, reports, times, command))


HEADER = """# Benchmarks

Reproduce every table below with one command from the repository root:

    python benchmarks/run.py --output BENCHMARKS.md             # unpinned
    python benchmarks/run.py --pin 0 --output BENCHMARKS.md     # every process on CPU 0

Each command rewrites only its own section (unpinned, or pinned to that CPU).

(`--quick` gives a smoke run of a few seconds per script; its numbers mean nothing.)
The runner starts each script in benchmarks/ with `--json`, and every number here
comes from those reports: muser next to a baseline measured in the same process,
on the same loop, repetitions interleaved. Ratios are muser/baseline; where the
two ran in the same repetitions (region_read, config_read, irq_trigger, dma_copy)
the ratio is the median of each repetition's own ratio, so a slowdown of the
machine that outlasts a repetition divides out. Read each script's docstring for
exactly what it measures.

The figures below come from a shared, noisy 2-core VM, with other work (test
suites) possibly running at the same time: trust the ratios, measured side by side,
more than the absolute numbers, and expect them to move from run to run (compare
the unpinned and pinned sections, and each row's spread in the script's own output).
"""


def merge(old: str, title: str, body: str) -> str:
    """The file with a fresh header and this section, other sections (other titles) kept."""
    sections = [part for part in old.split("\n## ")[1:] if not part.startswith(title + "\n")]
    kept = ["## " + part.rstrip("\n") for part in sections]
    order = sorted([*kept, body.rstrip("\n")], key=lambda part: not part.startswith("## Unpinned"))
    return HEADER + "\n" + "\n\n".join(order) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--pin", type=int, metavar="CPU", help="pass --pin CPU to every script")
    parser.add_argument(
        "--output", default="BENCHMARKS.md", help="the Markdown file to write (- for stdout)"
    )
    parser.add_argument(
        "--scripts", default=",".join(SCRIPTS), help="comma-separated, from: " + ", ".join(SCRIPTS)
    )
    args = parser.parse_args()
    args.scripts = args.scripts.split(",")
    unknown = set(args.scripts) - set(SCRIPTS)
    if unknown:
        parser.error(f"unknown scripts: {', '.join(sorted(unknown))}")
    if args.pin is not None and args.pin not in os.sched_getaffinity(0):
        parser.error(f"CPU {args.pin} is not one this process may run on")
    return args


def main() -> None:
    args = parse_args()
    title = "Pinned to CPU " + str(args.pin) if args.pin is not None else "Unpinned"
    if args.quick:
        title += ", quick (smoke test only)"
    body = render(title, args.quick, args.pin, args.scripts)
    if args.output == "-":
        print(HEADER + "\n" + body)
        return
    output = Path(args.output)
    old = output.read_text(encoding="utf-8") if output.exists() else ""
    output.write_text(merge(old, title, body), encoding="utf-8")
    print(f"wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
