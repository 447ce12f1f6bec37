"""MLflow records that kedro-mlflow's datasets do not make: a model directory logged as a registered model,
and a local store whose artifact locations stay relative to the project, so a moved project keeps working."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from kedro.framework.hooks import hook_impl

from .pipeline_registry import STAGES

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


# Where a SQL store keeps artifact locations (MLflow makes each one absolute when it creates it).
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
)


class PortableArtifactsHook:
    """After kedro-mlflow has opened the store (and created the experiment), rewrites the artifact locations a
    local SQLite store holds under the project folder as paths relative to it, before this run creates its own:
    MLflow then reads and writes them relative to the working directory (the project folder, where
    ``kedro run`` is started), so a project moved or copied elsewhere keeps its runs' artifacts and registered
    models. Started from another folder, the run leaves the store as it is and says so."""

    @hook_impl(trylast=True)  # after kedro-mlflow's after_context_created
    def after_context_created(self, context) -> None:
        config = getattr(context, "mlflow", None)
        project = Path(context.project_path)
        database = sqlite_database(config.server.mlflow_tracking_uri if config else None, project)
        if database is None or not database.is_file():
            return
        if Path.cwd().resolve() != project.resolve():
            logger.warning(
                "Running from %s, not the project folder %s: MLflow reads the store's artifact locations "
                "relative to the working directory; run kedro from the project folder", Path.cwd(), project,
            )  # fmt: skip
            return
        changed = relative_artifact_locations(database, project)
        if changed:
            logger.info("MLflow store %s: %d artifact locations made relative to the project", database, changed)


class RunNameHook:
    """kedro-mlflow names a run after its pipelines joined by "+", in the order Kedro passes them, and
    `kedro run --pipelines a,b` passes them through a set: the same command was named
    "format+validate+ingest" once and "ingest+format+validate" the next time. Before kedro-mlflow reads them,
    the stages are put in run order (other pipelines after them, by name)."""

    @hook_impl(tryfirst=True)  # before kedro-mlflow's before_pipeline_run, which starts the MLflow run
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        names = run_params.get("pipeline_names")
        if isinstance(names, list):
            names.sort(key=lambda name: (STAGES.index(name) if name in STAGES else len(STAGES), name))


def sqlite_database(uri: str | None, project: Path) -> Path | None:
    """The file behind a ``sqlite:///`` tracking URI (a relative one is relative to the project); else None."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    path = Path(unquote(uri[len("sqlite:///") :].split("?", 1)[0]))  # sqlite:////abs.db is /abs.db
    return path if path.is_absolute() else project / path


def relative_artifact_locations(database: Path, project: Path) -> int:
    """Strips the project folder (as a path or a file: URI) from every stored artifact location under it.
    Returns the number of locations changed."""
    roots = {str(project.absolute()), str(project.resolve())}
    prefixes = sorted({f"{root}/" for root in roots} | {f"{Path(root).as_uri()}/" for root in roots}, key=len)
    changed = 0
    with closing(sqlite3.connect(database, timeout=60)) as connection, connection:
        for table, column in LOCATION_COLUMNS:
            for prefix in reversed(prefixes):  # longest first: file:///a/ before /a/
                try:
                    cursor = connection.execute(
                        f"UPDATE {table} SET {column} = substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                        (len(prefix) + 1, len(prefix), prefix),
                    )
                except sqlite3.OperationalError:  # a store from an MLflow without this table
                    break
                changed += max(cursor.rowcount, 0)
    return changed


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
            model_config={"max_new_tokens": 256},  # load_model(..., model_config=...) overrides it
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
