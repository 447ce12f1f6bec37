"""The local MLflow store keeps artifact locations relative to the project (PortableArtifactsHook)."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwen_pipeline.tracking.store import PortableArtifactsHook, sqlite_database


def store(project: Path) -> Path:
    """A store holding the shapes MLflow writes: absolute paths and file: URIs, inside the project and out."""
    database = project / "mlflow.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE experiments (experiment_id INTEGER, artifact_location TEXT)")
        connection.execute("CREATE TABLE runs (run_uuid TEXT, artifact_uri TEXT)")  # no logged_models table
        connection.executemany(
            "INSERT INTO experiments VALUES (?, ?)",
            [(0, f"{project}/mlruns/0"), (1, f"{project.as_uri()}/mlruns/1"), (2, f"{project}2/mlruns/2")],
        )
        connection.execute("INSERT INTO runs VALUES ('r', ?)", (f"{project}/mlruns/1/r/artifacts",))
    return database


def locations(database: Path) -> list[str]:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT artifact_location FROM experiments UNION ALL SELECT artifact_uri FROM runs")
        return [row[0] for row in rows]


def context(project: Path, uri: str = "sqlite:///mlflow.db") -> SimpleNamespace:
    server = SimpleNamespace(mlflow_tracking_uri=uri)
    return SimpleNamespace(project_path=project, mlflow=SimpleNamespace(server=server))


def test_locations_under_the_project_become_relative(tmp_path, monkeypatch):
    project = tmp_path / "my project"
    project.mkdir()
    database = store(project)
    monkeypatch.chdir(project)
    PortableArtifactsHook().after_context_created(context(project))
    assert locations(database) == ["mlruns/0", "mlruns/1", f"{project}2/mlruns/2", "mlruns/1/r/artifacts"]
    PortableArtifactsHook().after_context_created(context(project))  # nothing left to change
    assert locations(database)[0] == "mlruns/0"


def test_started_elsewhere_the_store_is_left_as_it_is(tmp_path, monkeypatch, caplog):
    project = tmp_path / "project"
    project.mkdir()
    database = store(project)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="qwen_pipeline.tracking.store"):
        PortableArtifactsHook().after_context_created(context(project, f"sqlite:///{database}"))
    assert locations(database)[0] == f"{project}/mlruns/0"
    assert f"Running from {tmp_path}, not the project folder {project}" in caplog.text


def test_sqlite_database_names_the_file_behind_the_uri(tmp_path):
    assert sqlite_database("sqlite:///mlflow.db", tmp_path) == tmp_path / "mlflow.db"
    assert sqlite_database("sqlite:////abs/store.db?timeout=5", tmp_path) == Path("/abs/store.db")
    assert sqlite_database("http://mlflow:5000", tmp_path) is None and sqlite_database(None, tmp_path) is None


@pytest.mark.slow  # kedro run in a subprocess, after up to 99 `python -c` to find a hash seed
def test_an_mlflow_run_is_named_after_its_stages_in_run_order(tmp_path, model_cache):
    """Kedro passes `--pipelines` through a set, so the order of the names kedro-mlflow joins into the run name
    followed the hash seed. With a seed that orders the set validate-first, the run is still "ingest+validate"."""
    import os
    import subprocess
    import sys

    from helpers import copy_project
    from mlflow.tracking import MlflowClient

    def set_order(seed: int) -> str:
        code = "print(list(set(['ingest', 'validate'])))"
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout

    seed = next(seed for seed in range(1, 100) if set_order(seed).startswith("['validate'"))
    root = copy_project(tmp_path / "project")
    env = {
        **os.environ, "PYTHONHASHSEED": str(seed), "QWEN_PIPELINE_CACHE": str(model_cache),
        "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200",
    }  # fmt: skip
    command = [sys.executable, "-m", "kedro", "run", "--pipelines", "ingest,validate"]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("qwen_pipeline").experiment_id])
    assert [run.info.run_name for run in runs] == ["ingest+validate"]
