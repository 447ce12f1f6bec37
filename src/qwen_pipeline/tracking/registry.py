"""A model directory logged to MLflow as a registered pyfunc model (weights hard-linked into a local store, else
copied), tagged with where the model came from."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

logger = logging.getLogger(__name__)

SERVING_CODE = Path(__file__).parents[1] / "serving.py"


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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def log_model_directory(
    path: Path,
    manifest: dict[str, Any],
    *,
    name: str,
    registered_model_name: str,
    alias: str | None = None,
    weights: str = "hardlink",
) -> dict[str, Any]:
    """Log ``path`` as an MLflow pyfunc model (weights as they are, nothing loaded), register it, give the
    new version ``alias``, and tag run and version with the model's lineage.

    ``weights: hardlink`` (the default) stores the weight files as hard links to the exported ones when the
    artifact store is a local folder on the same file system: registering costs no disk, and a later export
    that replaces the folder leaves this version's files as they were. Elsewhere, and with ``weights: copy``,
    they are copied. Returns the registration: name, version, model id and URI, and the bytes copied and
    linked into the store (also logged as ``model_store.*`` metrics)."""
    import mlflow
    from mlflow import MlflowClient

    from ..serving import signature as chat_signature

    if weights not in ("hardlink", "copy"):
        raise ValueError(f"mlflow_model.weights must be 'hardlink' or 'copy', got {weights!r}")
    tags = lineage_tags(manifest)
    mlflow.set_tags(tags)
    mlflow.log_dict(manifest, f"{name}_manifest.json")
    link = weights == "hardlink" and _local_folder(mlflow.get_artifact_uri()) is not None
    if weights == "hardlink" and not link:
        logger.warning("The MLflow artifact store is not a local folder: the weights are copied into it")
    heavy = [f for f in sorted(path.iterdir()) if link and f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    # Public versions only: a local build tag (torch's "+cpu", "+cu124") is installable nowhere else.
    requirements = [
        f"{pkg}=={_version(pkg).split('+')[0]}" for pkg in ("mlflow", "torch", "transformers", "tokenizers")
    ]
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.mlflow-", dir=path.parent) as light:
        artifact = path
        if heavy:  # everything but the weights goes through MLflow; the weights are linked in afterwards
            artifact = Path(light) / path.name
            shutil.copytree(path, artifact, ignore=lambda at, names: [n for n in names if Path(at) / n in heavy])
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(SERVING_CODE),
            artifacts={"model": str(artifact)},
            pip_requirements=requirements,
            signature=chat_signature(),  # MLflow's chat schemas; the generation options as params
            model_config={"name": registered_model_name, "batch_size": 8},  # load_model(model_config=...) overrides
            metadata={"qwen_pipeline": json.loads(json.dumps(manifest, default=str))},
        )
    linked = 0
    if heavy:  # into the folder the logged model keeps its "model" artifact in (artifacts/<folder name>)
        store = _local_folder(MlflowClient().get_logged_model(info.model_id).artifact_location)
        saved = mlflow.models.Model.load(str(store / "MLmodel")).flavors["python_function"]["artifacts"]
        linked = _link_into(heavy, store / saved["model"]["path"])
    files = [f for f in path.rglob("*") if f.is_file()]
    copied = sum(f.stat().st_size for f in files) - linked
    # Registered only now, with every weight file in place: a failure above leaves no version without weights.
    version = str(mlflow.register_model(info.model_uri, registered_model_name).version)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(registered_model_name, version, key, value)
    if alias:
        client.set_registered_model_alias(registered_model_name, alias, version)
    mlflow.log_metrics({"model_store.bytes_copied": copied, "model_store.bytes_linked": linked})
    logger.info(
        "Registered %s version %s%s: %s copied into the MLflow store, %s hard-linked",
        registered_model_name, version, f" as @{alias}" if alias else "", _size(copied), _size(linked),
    )  # fmt: skip
    return {
        "registered_model_name": registered_model_name,
        "version": version,
        "alias": alias,
        "model_id": info.model_id,
        "model_uri": f"models:/{registered_model_name}/{version}",
        "run_id": info.run_id,
        "bytes_copied": copied,
        "bytes_linked": linked,
    }


def _local_folder(uri: str) -> Path | None:
    """The folder behind a local artifact URI (a path, relative to the project, or file:), else None."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(uri) if parsed.scheme == "" else None


def _link_into(files: list[Path], folder: Path) -> int:
    """Hard-links ``files`` into ``folder`` (copies them where a link is refused). Returns the bytes linked."""
    linked = 0
    for source in files:
        target = folder / source.name
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
            linked += source.stat().st_size
        except OSError as error:  # another file system, or links not allowed
            logger.warning("Could not hard-link %s into the MLflow store (%s): copied instead", source.name, error)
            shutil.copy2(source, target)
    return linked


def _size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
