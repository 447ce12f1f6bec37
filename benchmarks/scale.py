"""Scale: `kedro run --pipelines ingest,validate,format` on N generated records, cold and warm.

For each N (half alpaca records, half sharegpt conversations, ~1 KB of JSON each) it runs the data stages
in a copy of the project, first with no earlier output (cold), then again with nothing changed (warm),
and prints per-stage seconds (from Kedro's node log), records/s, the peak memory of the run (PSS summed
over the kedro process and its forked workers, sampled every 0.1 s: summing RSS would count the pages
the workers share with their parent once per process) and the peak RSS of its largest process, and the
ratios the issue asks for: records/s at the largest N vs the smallest, 2 processes vs 1, warm vs cold,
peak memory at the largest N vs 100k. With --llamafactory-python it also times LLaMA-Factory 0.9.5's own
preprocessing (`get_dataset`) of the same 200k-record files, with 1 and 2 `preprocessing_num_workers`.

    .venv/bin/python benchmarks/scale.py                       # 20k, 100k, 200k, 1M; num_proc 2 (and 1 at 200k)
    .venv/bin/python benchmarks/scale.py --records 20000 --repeat 3
    .venv/bin/python benchmarks/scale.py --llamafactory-python /tmp/lfvenv/bin/python   (PYTHONPATH=/tmp/lfstub)

Generated files are kept in --data-dir (default /tmp/qwen_scale_data) and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from format_throughput import _text  # noqa: E402  (the same generated text as the format benchmark)

STAGES = ("ingest_datasets_node", "validate_conversations_node", "tokenize_conversations_node")
LOGGING = """
version: 1
disable_existing_loggers: false
formatters:
  timed: {format: "%(asctime)s|%(name)s|%(message)s"}
handlers:
  console: {class: logging.StreamHandler, formatter: timed, stream: ext://sys.stdout}
loggers:
  kedro: {level: INFO}
  qwen_pipeline: {level: INFO}
root: {handlers: [console], level: WARNING}
"""


def write_records(folder: Path, n: int, seed: int = 0) -> None:
    """n records, half alpaca and half sharegpt, written one at a time (as JSON arrays)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(folder / "alpaca.json", "w") as alpaca, open(folder / "sharegpt.json", "w") as sharegpt:
        alpaca.write("[")
        sharegpt.write("[")
        for i in range(n):
            if i % 2 == 0:
                record = {
                    "instruction": _text(rng, rng.randint(20, 60)),
                    "input": _text(rng, rng.randint(0, 40)),
                    "output": _text(rng, rng.randint(40, 140)),
                }
                alpaca.write(("," if i else "") + json.dumps(record, ensure_ascii=False))
            else:
                turns = []
                for _ in range(rng.randint(1, 3)):
                    turns += [
                        {"from": "human", "value": _text(rng, rng.randint(10, 40))},
                        {"from": "gpt", "value": _text(rng, rng.randint(20, 70))},
                    ]
                sharegpt.write(("," if i > 1 else "") + json.dumps({"conversations": turns}, ensure_ascii=False))
        alpaca.write("]")
        sharegpt.write("]")
    info = {
        "alpaca_scale": {"file_name": "alpaca.json"},
        "sharegpt_scale": {"file_name": "sharegpt.json", "formatting": "sharegpt"},
    }
    (folder / "dataset_info.json").write_text(json.dumps(info))


def data_for(n: int, data_dir: Path) -> Path:
    folder = data_dir / f"records-{n}"
    if not (folder / "dataset_info.json").is_file():
        started = time.perf_counter()
        write_records(folder, n)
        size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        print(f"  generated {n:,} records ({size:,.0f} MB) in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def project_for(data: Path, work: Path, num_proc: int) -> Path:
    """A copy of the project whose data/01_raw is ``data`` (linked), with its own outputs and MLflow store."""
    project = work / "project"
    for name in ("pyproject.toml", ".telemetry", "conf", "src"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__", "local"))
        else:
            project.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, project / name)
    (project / "conf" / "local").mkdir(exist_ok=True)
    (project / "conf" / "local" / "parameters.yml").write_text(
        "ingest:\n  dataset: [alpaca_scale, sharegpt_scale]\n"
        f"processing:\n  num_proc: {num_proc}\n"
        "format:\n  cutoff_len: 1024\n"
    )
    (project / "conf" / "logging.yml").write_text(LOGGING)
    (project / "data").mkdir()
    (project / "data" / "01_raw").symlink_to(data, target_is_directory=True)
    return project


def rollup(pid: int) -> dict[str, int]:
    """Pss and Pss_Anon of one process, in bytes (/proc/PID/smaps_rollup)."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("Pss", "Pss_Anon"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def sample_rss(pid: int, peak: dict, stop: threading.Event) -> None:
    """Peak PSS of the process tree, and of its anonymous memory alone, sampled every 0.1 s.

    PSS: forked workers share their parent's pages; summing RSS would count those once per process.
    Anonymous PSS leaves out file-backed pages (the memory-mapped Arrow files the stages read and write),
    which are page cache the kernel drops under pressure, not memory the data path holds.
    """
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        try:
            tree = [rollup(p.pid) for p in [root, *root.children(recursive=True)]]
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            if not root.is_running():
                break
            continue
        peak["tree"] = max(peak.get("tree", 0), sum(t.get("Pss", 0) for t in tree))
        peak["anon"] = max(peak.get("anon", 0), sum(t.get("Pss_Anon", 0) for t in tree))
        stop.wait(0.1)


def kedro_run(project: Path, threads: bool = True) -> dict:
    """One `kedro run` of the data stages: stage seconds, wall seconds, peak RSS (tree and largest process).
    ``threads=False``: the Rust tokenizer runs on one thread (by default it uses every core)."""
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "true" if threads else "false",
        "KEDRO_LOGGING_CONFIG": str(project / "conf" / "logging.yml"),
        "KEDRO_DISABLE_TELEMETRY": "true",
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "kedro", "run", "--pipelines", "ingest,validate,format"]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, stop = {}, threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(proc.pid, peak, stop), daemon=True)
    sampler.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    sampler.join()
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"kedro run failed in {project}:\n{output[-5000:]}")
    return {"stages": stage_seconds(output), "wall": wall, "tree_mb": peak.get("tree", 0) / 2**20,
            "anon_mb": peak.get("anon", 0) / 2**20, "process_mb": usage.ru_maxrss / 1024,
            "reused": "reusing" in output}  # fmt: skip


def stage_seconds(log: str) -> dict[str, float]:
    """Seconds from each data node's "Running node" line to its "Completed node" line."""
    started, seconds = {}, {}
    for line in log.splitlines():
        parts = line.split("|", 2)
        if len(parts) != 3 or not re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+", parts[0]):
            continue  # not a log record (a progress bar has "|" too)
        when = datetime.strptime(parts[0], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if match := re.match(r"Running node: (\w+)", parts[2]):
            started[match.group(1)] = when
        elif (match := re.match(r"Completed node: (\w+)", parts[2])) and match.group(1) in started:
            seconds[match.group(1)] = when - started[match.group(1)]
    return {name.split("_")[0]: seconds.get(name, float("nan")) for name in STAGES}


def measure(n: int, num_proc: int, data_dir: Path, threads: bool = True) -> dict:
    data = data_for(n, data_dir)
    with tempfile.TemporaryDirectory(prefix="qwen-scale-") as tmp:
        project = project_for(data, Path(tmp), num_proc)
        cold = kedro_run(project, threads)
        warm = kedro_run(project, threads)
    label = str(num_proc) if threads else f"{num_proc}, 1 tokenizer thread"
    return {"n": n, "num_proc": num_proc if threads else -num_proc, "label": label, "cold": cold, "warm": warm}


def llamafactory(python: str, n: int, workers: int, data_dir: Path) -> dict:
    from qwen_pipeline.embedded import ensure_embedded_model

    data = data_for(n, data_dir)
    script = ROOT / "benchmarks" / "llamafactory_reference" / "lf_preprocess.py"
    with tempfile.TemporaryDirectory() as tmp:
        command = [python, str(script), "--tokenizer", str(ensure_embedded_model()), "--dataset-dir", str(data),
                   "--datasets", "alpaca_scale,sharegpt_scale", "--cutoff-len", "1024", "--workers", str(workers),
                   "--out", f"{tmp}/lf.jsonl", "--no-dump"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.environ.get("LLAMAFACTORY_PYTHONPATH", "/tmp/lfstub")}
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak, stop = {}, threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, peak, stop), daemon=True)
        sampler.start()
        out, err = proc.communicate()
        stop.set()
        sampler.join()
        if proc.returncode:
            raise SystemExit(f"LLaMA-Factory failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {"n": n, "workers": workers, "seconds": result["seconds"], "wall": time.perf_counter() - started,
            "tree_mb": peak.get("tree", 0) / 2**20}  # fmt: skip


def median_range(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} (range {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[20_000, 100_000, 200_000, 1_000_000])
    parser.add_argument("--num-proc", type=int, default=2, help="processing.num_proc for every size (default 2)")
    parser.add_argument("--one-process-at", type=int, default=200_000, help="also run this size with num_proc 1")
    parser.add_argument("--repeat", type=int, default=1, help="measure each size this many times, back to back")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/qwen_scale_data"))
    parser.add_argument("--llamafactory-python", help="python of a venv with llamafactory==0.9.5")
    parser.add_argument("--llamafactory-records", type=int, default=200_000)
    args = parser.parse_args()

    runs = []
    plan = [(n, args.num_proc, True) for n in args.records]
    if args.one_process_at in args.records and args.num_proc != 1:
        # One process as it runs by default (the Rust tokenizer on every core), and on one core.
        plan += [(args.one_process_at, 1, True), (args.one_process_at, 1, False)]

    def rows(r):
        for kind in ("cold", "warm"):
            m = r[kind]
            total = sum(m["stages"].values())
            stages = m["stages"]
            yield (f"| {r['n']:,} | {r['label']} | {kind} | {stages['ingest']:.1f} | {stages['validate']:.1f} | "
                   f"{stages['tokenize']:.1f} | {total:.1f} | {r['n'] / total:,.0f} | {m['tree_mb']:,.0f} | "
                   f"{m['anon_mb']:,.0f} | {m['process_mb']:,.0f} | {m['wall']:.1f} |")  # fmt: skip

    for repeat in range(args.repeat):
        for n, num_proc, threads in plan:
            print(f"run {repeat + 1}/{args.repeat}: {n:,} records, num_proc {num_proc}", flush=True)
            runs.append(measure(n, num_proc, args.data_dir, threads))
            for row in rows(runs[-1]):  # as it comes, so an interrupted benchmark keeps what it measured
                print("  " + row, flush=True)
    print("\n| records | num_proc | run | ingest s | validate s | format s | data stages s | records/s | "
          "peak PSS tree MB | peak anonymous PSS tree MB | peak RSS largest process MB | kedro wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        for row in rows(r):
            print(row)

    def pick(n, num_proc):
        return [r for r in runs if r["n"] == n and r["num_proc"] == num_proc]

    def rate(r):
        return r["n"] / sum(r["cold"]["stages"].values())

    print()
    small, large = min(args.records), max(args.records)
    if small != large:
        ratios = [rate(b) / rate(a) for a, b in zip(pick(small, args.num_proc), pick(large, args.num_proc))]
        print(f"records/s at {large:,} / at {small:,}: {median_range(ratios)}")
        if 100_000 in args.records:
            base, top = pick(100_000, args.num_proc), pick(large, args.num_proc)
            for key, what in (("tree_mb", "peak PSS (tree)"), ("anon_mb", "peak anonymous PSS (tree)"),
                              ("process_mb", "peak RSS of the largest process")):  # fmt: skip
                ratio = [b["cold"][key] / a["cold"][key] for a, b in zip(base, top)]
                print(f"{what} at {large:,} / at 100,000: {median_range(ratio)}")
    for one, how in ((1, "1 process (tokenizer threads on every core)"), (-1, "1 process on one core")):
        if pick(args.one_process_at, one) and args.num_proc != 1:
            pairs = zip(pick(args.one_process_at, one), pick(args.one_process_at, args.num_proc))
            speedup = [rate(b) / rate(a) for a, b in pairs]
            print(f"records/s with {args.num_proc} processes / {how} at {args.one_process_at:,}: "
                  f"{median_range(speedup)}")  # fmt: skip
    for n in args.records:
        warm = [sum(r["warm"]["stages"].values()) / sum(r["cold"]["stages"].values()) for r in pick(n, args.num_proc)]
        print(f"warm / cold data-stage time at {n:,}: {median_range(warm)}")
    if args.llamafactory_python:
        n = args.llamafactory_records
        ours = pick(n, args.num_proc) or pick(n, 1)
        for workers in (1, 2):
            lf = llamafactory(args.llamafactory_python, n, workers, args.data_dir)
            print(
                f"LLaMA-Factory 0.9.5 get_dataset, {n:,} records, preprocessing_num_workers={workers}: "
                f"{lf['seconds']:.0f} s ({n / lf['seconds']:,.0f} records/s), peak PSS tree {lf['tree_mb']:,.0f} MB"
            )
            if ours:
                ratio = [lf["seconds"] / sum(r["cold"]["stages"].values()) for r in ours]
                memory = [r["cold"]["tree_mb"] / lf["tree_mb"] for r in ours]
                print(f"  ours (num_proc {ours[0]['num_proc']}) records/s / LLaMA-Factory's: {median_range(ratio)}; "
                      f"peak PSS ours / LLaMA-Factory's: {median_range(memory)}")  # fmt: skip


if __name__ == "__main__":
    main()
