"""Bad input through `kedro run`: one clear message naming the file, record or key; no traceback.

A few cases, end to end: that the CLI prints the message as one error and exits 1. Every message, and the
other cases, are unit tests: the run check in tests/project/test_run_check.py, the data stages' errors in
tests/data/test_stage_errors.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import copy_project

pytestmark = pytest.mark.slow
PROJECT_ROOT = Path(__file__).resolve().parents[2]
GOOD = {"instruction": "q", "input": "", "output": "a"}


def project_with(tmp_path: Path, files: dict[str, str]) -> Path:
    root = copy_project(tmp_path / "project", demo_data=False)
    raw = root / "data" / "01_raw"
    raw.mkdir(parents=True)
    for name, text in files.items():
        (raw / name).write_text(text)
    return root


INFO = json.dumps(
    {"alpaca_demo": {"file_name": "a.json"}, "sharegpt_demo": {"file_name": "b.json", "formatting": "sharegpt"}}
)
TOO_MANY_REJECTED = {
    "dataset_info.json": INFO,
    "a.json": json.dumps([GOOD, {"instruction": "x"}, {"output": 3}, {"instruction": "y"}]),
    "b.json": json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]),
}


def test_a_node_error_is_one_clear_error_after_validate_wrote_its_report(tmp_path, model_cache):
    root = project_with(tmp_path, TOO_MANY_REJECTED)
    env = {**os.environ, "QWEN_PIPELINE_CACHE": str(model_cache), "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200"}
    env.pop("QWEN_PIPELINE_TRACEBACK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--pipelines", "ingest,validate"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr and "╭" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("Error: ")] == [
        "Error: 3 of 5 records rejected (60%), more than validate.max_rejected_share=0.5. Top reasons: "
        "2 x missing column 'output'; 1 x column 'output': expected a string, got int. "
        "First rejected: dataset 'alpaca_demo' (a.json record 1, a.json record 2, a.json record 3). "
        "Every record and its reason: the rejected_records dataset (data/08_reporting/rejected_records.json), "
        "counts in the validation report."
    ], proc.stderr[-3000:]
    assert proc.stderr.endswith("\n(set QWEN_PIPELINE_TRACEBACK=1 to see the full traceback)\n")
    reports = root / "data" / "08_reporting"  # the run stopped after validate wrote what the error points to
    rejected = json.loads((reports / "rejected_records.json").read_text())
    assert [(r["file"], r["index"]) for r in rejected] == [("a.json", 1), ("a.json", 2), ("a.json", 3)]
    report = json.loads((reports / "validation_report.json").read_text())
    assert (report["read"], report["kept"], report["rejected"], report["accepted"]) == (5, 2, 3, False)
    assert not (root / "data" / "02_intermediate" / "conversations").exists()  # nothing accepted


DEMO_INFO = {"dataset_info.json": INFO, "a.json": json.dumps([GOOD]), "b.json": json.dumps([{"conversations": []}])}
BEFORE_ANY_NODE = [  # the run check's: one line, nothing runs
    (
        "unknown pipeline",
        ["--pipelines", "sfft"],
        "Error: no pipeline named 'sfft'; pipelines: __default__, evaluate, format, ingest, merge, sft, train, "
        "validate",
    ),
    (
        "misspelt parameter of a later stage",
        ["--pipelines", "sft", "--params", "train.learnig_rate=1e-4"],
        "Error: invalid configuration: train.learnig_rate: unknown parameter (did you mean 'learning_rate'?)",
    ),
]


@pytest.mark.parametrize(("name", "args", "line"), BEFORE_ANY_NODE, ids=[c[0] for c in BEFORE_ANY_NODE])
def test_bad_run_stops_before_any_node_in_one_line(tmp_path, model_cache, name, args, line):
    root = project_with(tmp_path, DEMO_INFO)
    env = {**os.environ, "QWEN_PIPELINE_CACHE": str(model_cache), "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "kedro", "run", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1
    assert (proc.stdout + proc.stderr).splitlines() == [line]
    assert not (root / "data" / "02_intermediate").exists() and not (root / "mlflow.db").exists()  # nothing ran


def test_a_run_stopped_in_validate_leaves_no_earlier_output_looking_current(tmp_path, model_cache):
    """The data stages ran well once; then the data changed and validate stopped the run: the earlier
    conversations and tokenized dataset are marked stale, and a run that would read them says so."""
    good = [GOOD, {**GOOD, "instruction": "q2"}, {**GOOD, "instruction": "q3"}]
    root = project_with(tmp_path, {**DEMO_INFO, "a.json": json.dumps(good)})
    env = {**os.environ, "QWEN_PIPELINE_CACHE": str(model_cache), "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200"}
    env.pop("QWEN_PIPELINE_TRACEBACK", None)

    def kedro_run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "kedro", "run", *args, "--params", "format.val_size=0"]
        return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)

    missing = kedro_run("--pipelines", "format")  # before any validate: one line, no traceback
    conversations = root / "data" / "02_intermediate" / "conversations"
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"Error: {conversations}: no complete stage output here (no stage.json); run the stage first\n" in (
        missing.stderr
    )
    assert kedro_run("--pipelines", "ingest,validate,format").returncode == 0
    stages = {
        "conversations": root / "data" / "02_intermediate" / "conversations",
        "sft_dataset": root / "data" / "03_primary" / "sft_dataset",
    }
    assert all((path / "stage.json").is_file() and not (path / "stale.json").exists() for path in stages.values())

    (root / "data" / "01_raw" / "a.json").write_text(json.dumps([GOOD, {"instruction": "x"}, {"instruction": "y"}]))
    stopped = kedro_run("--pipelines", "ingest,validate,format")
    assert stopped.returncode == 1 and "Error: 3 of 4 records rejected (75%)" in stopped.stderr, stopped.stderr[-2000:]
    reason = (
        "the last run stopped in accept_conversations_node before remaking it "
        "(3 of 4 records rejected (75%), more than validate.max_rejected_share=0.5)"
    )
    for name, path in stages.items():
        assert f"WARNING {name} is an earlier run's output: marked stale" in stopped.stderr
        assert json.loads((path / "stale.json").read_text())["reason"] == reason

    later = kedro_run("--pipelines", "format")  # would read the stale conversations
    assert later.returncode == 1 and "Traceback" not in later.stderr
    assert f"Error: {stages['conversations']} is an earlier run's output, not current: {reason}\n" in (later.stderr), (
        later.stderr[-2000:]
    )

    (root / "data" / "01_raw" / "a.json").write_text(json.dumps(good))  # fixed: the stages remake their outputs
    assert kedro_run("--pipelines", "ingest,validate,format").returncode == 0
    assert not [path for path in stages.values() if (path / "stale.json").exists()]
