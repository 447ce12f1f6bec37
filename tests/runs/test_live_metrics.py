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


@pytest.mark.parametrize(
    ("zero", "generation"),
    [("zero2", 2), ("zero3", 0)],  # generation eval under ZeRO-3 with several processes is refused (checks.py)
)
def test_two_processes_evaluate_while_training_and_rank_0_logs_once(
    tmp_path, model_cache, monkeypatch, zero, generation
):
    """torchrun with DeepSpeed: every rank evaluates its share, rank 0 logs each evaluation once."""
    from mlflow.tracking import MlflowClient

    root = copy_project(tmp_path / "project")
    env = {**os.environ, "QWEN_PIPELINE_CACHE": str(model_cache), "KEDRO_DISABLE_TELEMETRY": "true"}
    params = (
        f"train.nproc_per_node=2,train.deepspeed=conf/base/deepspeed/{zero}.json,train.max_steps=4,"
        "train.eval_strategy=steps,train.eval_steps=2,train.eval_max_samples=8,"
        f"train.generation_eval.samples={generation},train.generation_eval.max_new_tokens=4"
    )
    command = [sys.executable, "-m", "kedro", "run", "--pipelines", "sft", "--params", params]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "evaluations: 2, the best at step" in done.stderr
    monkeypatch.chdir(root)  # artifact locations are relative to the project
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("qwen_pipeline").experiment_id)
    evals = client.get_metric_history(run.info.run_id, "eval/loss")
    assert [m.step for m in sorted(evals, key=lambda m: m.step)] == [2, 4]  # once each, not once per rank
    assert all(13.0 < m.value < 14.0 for m in evals), evals  # near ln(151,936) = 11.9 + the tiny model's offset
    bleu = sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/bleu-4"))
    tables = [a.path for a in client.list_artifacts(run.info.run_id, "generation_eval")]
    if generation:
        assert bleu == [2, 4]
        assert tables == ["generation_eval/step_000002.json", "generation_eval/step_000004.json"]
    else:
        assert bleu == [] and tables == []
