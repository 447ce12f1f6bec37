"""A training run killed with SIGKILL after its first checkpoint resumes when the same command runs again, its
loss and eval-loss curves in MLflow without a gap or a point twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import copy_project

pytestmark = pytest.mark.slow
PROJECT_ROOT = Path(__file__).resolve().parents[2]
COMMAND = [
    sys.executable,
    "-m",
    "kedro",
    "run",
    "--pipelines",
    "sft",
    "--params",
    "train.save_steps=4,train.max_steps=16,train.per_device_train_batch_size=4,"
    "train.eval_strategy=steps,train.eval_steps=2,train.eval_max_samples=16",
]


def test_killed_run_resumes_without_a_gap(tmp_path, model_cache):
    root = copy_project(tmp_path / "project")
    env = {**os.environ, "QWEN_PIPELINE_CACHE": str(model_cache), "KEDRO_DISABLE_TELEMETRY": "true"}
    first = subprocess.Popen(COMMAND, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list(root.glob("data/06_models/checkpoints/*/checkpoint-4/trainer_state.json")):
        assert first.poll() is None, "the first run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (root / "data/06_models/trained").exists()  # nothing that looks finished

    second = subprocess.run(COMMAND, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((root / "data/08_reporting/training_summary.json").read_text())
    assert summary["global_steps"] == 16
    assert summary["resumed_from_step"] >= 4
    assert summary["resumed_from_step"] + summary["steps_this_run"] == 16

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("qwen_pipeline").experiment_id], order_by=["attributes.start_time DESC"]
    )
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 17))  # no gap, no step twice
    killed = client.get_metric_history(runs[1].info.run_id, "train/loss")  # logged live before the kill
    assert killed and sorted(m.step for m in killed) == list(range(1, len(killed) + 1))
    evals = client.get_metric_history(runs[0].info.run_id, "eval/loss")
    assert sorted(m.step for m in evals) == list(range(2, 17, 2))  # the checkpoint's evaluations, then this run's
    killed_evals = sorted(m.step for m in client.get_metric_history(runs[1].info.run_id, "eval/loss"))
    assert killed_evals and killed_evals == list(range(2, 2 * len(killed_evals) + 1, 2))
    assert summary["evaluations"] == 8 and summary["stopped_by"] == "schedule"
    assert (root / "data/06_models/trained/qwen_pipeline.json").exists()
