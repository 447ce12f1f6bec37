"""MLflow records that kedro-mlflow's datasets do not make: a model directory logged as a registered model."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SERVING_CODE = Path(__file__).with_name("serving.py")
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


def lineage_tags(manifest: dict[str, Any]) -> dict[str, str]:
    """Where a merged model came from, as flat MLflow tags."""
    merge = manifest.get("merge", {})
    training = manifest.get("training_source", {})
    tags = {
        "base_model": manifest.get("base_model"),
        "adapter": merge.get("adapter"),
        "finetuning_type": training.get("finetuning_type"),
        "data_fingerprint": training.get("data_fingerprint"),
        "train_run_id": training.get("mlflow_run_id"),
        "export_dtype": merge.get("export_dtype"),
    }
    return {key: str(value) for key, value in tags.items() if value is not None}


def log_model_directory(
    path: Path, manifest: dict[str, Any], *, name: str, registered_model_name: str, alias: str | None = None
) -> str:
    """Log ``path`` as an MLflow pyfunc model (weights as they are, nothing loaded), register it, give the
    new version ``alias``, and tag run and version with the model's lineage. Returns the version."""
    import mlflow
    from mlflow import MlflowClient

    tags = lineage_tags(manifest)
    mlflow.set_tags(tags)
    mlflow.log_dict(manifest, f"{name}_manifest.json")
    # Public versions only: a local build tag (torch's "+cpu", "+cu124") is installable nowhere else.
    requirements = [
        f"{pkg}=={_version(pkg).split('+')[0]}" for pkg in ("mlflow", "torch", "transformers", "tokenizers")
    ]
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(SERVING_CODE),
        artifacts={"model": str(path)},
        pip_requirements=requirements,
        registered_model_name=registered_model_name,
        model_config={"max_new_tokens": 256},  # load_model(..., model_config=...) overrides it
        metadata={"qwen_pipeline": json.loads(json.dumps(manifest, default=str))},
    )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(registered_model_name, version, key, value)
    if alias:
        client.set_registered_model_alias(registered_model_name, alias, version)
    logger.info("Registered %s version %s%s", registered_model_name, version, f" as @{alias}" if alias else "")
    return version


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
