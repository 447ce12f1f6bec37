"""Per-step metrics reach MLflow while training runs, not when the train node ends."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import pytest
from helpers import copy_project

pytestmark = pytest.mark.slow


def logged_steps(db) -> int:
    """train/loss values in the store, read-only (an MLflow client would race the run creating its tables)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as store:
            return store.execute("SELECT COUNT(*) FROM metrics WHERE key = 'train/loss'").fetchone()[0]
    except sqlite3.OperationalError:  # no store or no table yet
        return 0


def test_the_loss_history_grows_in_mlflow_while_training_runs(tmp_path, model_cache):
    from mlflow.tracking import MlflowClient

    root = copy_project(tmp_path / "project")
    env = {**os.environ, "QWEN_PIPELINE_CACHE": str(model_cache), "KEDRO_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, "-m", "kedro", "run", "--pipelines", "sft", "--params", "train.max_steps=40"]
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []  # (steps logged, training still running) at each look
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.25)
        seen.append((logged_steps(root / "mlflow.db"), process.poll() is None))
    assert process.wait(timeout=60) == 0, process.stderr.read()[-3000:]
    during = sorted({steps for steps, running in seen if running and 0 < steps < 40})
    assert len(during) >= 2, seen  # seen part-way, and growing, while the run was still going
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("qwen_pipeline").experiment_id)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 41))
