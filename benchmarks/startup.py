"""Start-up: seconds from `kedro run` to its first node, per pipeline, on the demo data.

Each pipeline runs once to warm the outputs (and the MLflow store), then --repeat times, each in a new
process; the clock stops when the "Running node:" line reaches the pipe. The reference, measured in the
same run the same way, is `kedro --version` (Kedro and its plugins' CLI alone): the ratio says what the
project's start (settings, hooks, catalog, MLflow run) costs on top of Kedro's.

    .venv/bin/python benchmarks/startup.py                       # ingest, train, merge, evaluate; 3 times each
    .venv/bin/python benchmarks/startup.py --pipelines ingest --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import copy_project  # noqa: E402  (a copy of the project with the demo data)


def environment() -> dict[str, str]:
    return {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def to_first_node(project: Path, args: list[str]) -> tuple[float, float]:
    """Seconds until the first "Running node:" line (or the end, for a command with no node), and in all."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kedro", *args],
        cwd=project,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first, output = None, []
    for line in proc.stdout:
        output.append(line)
        if first is None and "Running node:" in line:
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    if proc.wait() != 0:
        raise SystemExit(f"kedro {' '.join(args)} failed:\n{''.join(output)[-3000:]}")
    return (total if first is None else first), total


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s (range {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", nargs="+", default=["ingest", "train", "merge", "evaluate"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwen-startup-") as tmp:
        project = copy_project(Path(tmp) / "project")
        needed = {"train": ["sft"], "merge": ["sft"], "evaluate": ["sft", "merge"]}
        for name in dict.fromkeys(p for pipeline in args.pipelines for p in (*needed.get(pipeline, []), pipeline)):
            to_first_node(project, ["run", "--pipelines", name])  # outputs for the later stages, a warm store
        reference = [to_first_node(project, ["--version"])[0] for _ in range(args.repeat)]
        print(f"kedro --version (reference): {median_range(reference)}")
        print("| pipeline | to first node s | whole run s | first node / reference |")
        print("|---|---|---|---|")
        for name in args.pipelines:
            runs = [to_first_node(project, ["run", "--pipelines", name]) for _ in range(args.repeat)]
            first = [r[0] for r in runs]
            ratios = [f / r for f, r in zip(first, reference)]
            print(
                f"| {name} | {median_range(first)} | {median_range([r[1] for r in runs])} | "
                f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}) |"
            )


if __name__ == "__main__":
    main()
