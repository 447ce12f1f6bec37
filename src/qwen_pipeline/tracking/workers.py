"""The MLflow environment a torchrun worker needs to log into the driver's run."""

from __future__ import annotations

from pathlib import Path

RUN_ID_ENV = "QWEN_PIPELINE_MLFLOW_RUN_ID"  # set by the training launcher for torchrun workers


def tracking_environment() -> dict[str, str]:
    """What a torchrun worker needs to log into the driver's MLflow run (nothing without an active run)."""
    try:
        import mlflow
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return {}
    run = mlflow.active_run()
    if run is None:
        return {}
    return {RUN_ID_ENV: run.info.run_id, "MLFLOW_TRACKING_URI": _absolute(mlflow.get_tracking_uri())}


def _absolute(uri: str) -> str:
    """A relative ``sqlite:///mlflow.db`` as an absolute path: workers may start elsewhere."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri
