"""A Kedro dataset for a ``save_pretrained`` model directory (full model or PEFT adapter)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kedro.io import AbstractDataset, DatasetError

from ..errors import DataSourceError
from ._files import swap_into_place

logger = logging.getLogger(__name__)

# Written last into every directory this dataset saves: its presence means "complete".
MANIFEST = "qwen_pipeline.json"


@dataclass
class ModelBundle:
    """A model with its tokenizer, and where it came from."""

    model: Any
    tokenizer: Any
    base_model: str  # the model_name_or_path the weights started from
    info: dict[str, Any] = field(default_factory=dict)  # anything else worth recording


@dataclass
class ModelFiles:
    """A model directory and its manifest, weights not read: a node loads them when, and as far as, it needs
    (as Kedro's lazy partitions). Saving one moves its (staged) directory into the dataset's place."""

    path: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:  # "adapter" or "causal_lm"
        return self.manifest["kind"]

    @property
    def base_model(self) -> str:
        return self.manifest["base_model"]

    @property
    def registration(self) -> dict[str, Any] | None:
        """The MLflow model version this directory was registered as (name, version, model_id), if any."""
        return self.manifest.get("mlflow_model")

    def load_tokenizer(self):
        from ..models import load_tokenizer

        return load_tokenizer(str(self.path))


class ModelDataset(AbstractDataset[ModelBundle | ModelFiles, ModelBundle | ModelFiles]):
    """Saves and loads a model directory written with ``save_pretrained``.

    Example catalog entry::

        trained_model:
          type: qwen_pipeline.datasets.ModelDataset
          filepath: data/06_models/trained
          kind: auto               # adapter (PEFT) or causal_lm (full weights), from the model
          save_args:
            max_shard_size: 2GB

        merged_model:
          type: qwen_pipeline.datasets.ModelDataset
          filepath: data/06_models/merged
          lazy: true               # load() gives ModelFiles (directory + manifest), no weights read
          mlflow_model:            # log it as an MLflow model, registered, with an alias
            name: merged_model
            registered_model_name: qwen_pipeline_merged
            alias: candidate
            weights: hardlink      # hard links into a local store (no disk used); copy: copy the files

    Saving writes into a temporary sibling and renames it into place, with the
    manifest written last, so an interrupted save never leaves a directory that
    looks complete. ``kind: adapter`` loads the base model named in the manifest and
    puts the adapter on top of it. A registered model's version is added to the manifest
    (``mlflow_model``), so whoever loads the directory knows which version it is.
    """

    DEFAULT_SAVE_ARGS: dict[str, Any] = {"safe_serialization": True, "max_shard_size": "2GB"}
    DEFAULT_LOAD_ARGS: dict[str, Any] = {"dtype": "float32"}

    def __init__(
        self,
        *,
        filepath: str,
        kind: Literal["auto", "adapter", "causal_lm"] = "auto",
        save_args: dict[str, Any] | None = None,
        load_args: dict[str, Any] | None = None,
        mlflow_model: dict[str, str] | None = None,
        lazy: bool = False,
        metadata: dict[str, Any] | None = None,
    ):
        if kind not in ("auto", "adapter", "causal_lm"):
            raise DatasetError(f"ModelDataset {filepath}: kind must be 'auto', 'adapter' or 'causal_lm', got {kind!r}")
        self._path = Path(filepath)  # not _filepath: kedro-viz would show a folder's size as 4KB
        self._kind = kind
        self._save_args = {**self.DEFAULT_SAVE_ARGS, **(save_args or {})}
        self._load_args = {**self.DEFAULT_LOAD_ARGS, **(load_args or {})}
        if mlflow_model is not None and not {"name", "registered_model_name"} <= set(mlflow_model):
            raise DatasetError(f"ModelDataset {filepath}: mlflow_model needs name and registered_model_name")
        self._mlflow_model = mlflow_model
        self._lazy = lazy
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path), "kind": self._kind, "lazy": self._lazy, "save_args": self._save_args}

    def _exists(self) -> bool:
        return (self._path / MANIFEST).is_file()

    def _save(self, data: ModelBundle | ModelFiles) -> None:
        target = self._path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            if isinstance(data, ModelFiles):  # already written (staged): take it over
                tmp.rmdir()
                shutil.move(str(data.path), tmp)
                manifest = dict(data.manifest)
            else:
                data.model.save_pretrained(tmp, **self._save_args)
                data.tokenizer.save_pretrained(tmp)
                manifest = {"kind": self._kind_of(data.model), "base_model": data.base_model, **data.info}
            manifest.setdefault("mlflow_run_id", _active_run_id())
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
            swap_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("Saved %s to %s", manifest["kind"], target)
        self._log_to_mlflow(manifest)

    def _kind_of(self, model) -> str:
        if self._kind != "auto":
            return self._kind
        from peft import PeftModel

        return "adapter" if isinstance(model, PeftModel) else "causal_lm"

    def _log_to_mlflow(self, manifest: dict[str, Any]) -> None:
        if not self._mlflow_model:
            return
        import mlflow

        if mlflow.active_run() is None:
            logger.warning("No active MLflow run: %s not logged", self._path)
            return
        from ..tracking.registry import log_model_directory

        manifest["mlflow_model"] = log_model_directory(self._path, manifest, **self._mlflow_model)
        partial = self._path / f".{MANIFEST}.partial"
        partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        partial.replace(self._path / MANIFEST)

    def _load(self) -> ModelBundle | ModelFiles:
        from ..models import load_causal_lm, load_tokenizer

        if not self._exists():
            raise DataSourceError(f"{self._path}: no complete model here (no {MANIFEST}); run the stage that makes it")
        manifest = json.loads((self._path / MANIFEST).read_text())
        if self._lazy:
            return ModelFiles(path=self._path, manifest=manifest)
        tokenizer = load_tokenizer(str(self._path))
        if manifest["kind"] == "causal_lm":
            model = load_causal_lm(str(self._path), **self._load_args)
        else:
            from peft import PeftModel

            base = load_causal_lm(manifest["base_model"], **self._load_args)
            model = PeftModel.from_pretrained(base, str(self._path), is_trainable=False)
        info = {k: v for k, v in manifest.items() if k not in ("kind", "base_model")}
        return ModelBundle(model=model, tokenizer=tokenizer, base_model=manifest["base_model"], info=info)


def _active_run_id() -> str | None:
    """The MLflow run this model is saved in, when one is active (kedro-mlflow starts one per kedro run)."""
    import sys

    if "mlflow" not in sys.modules:
        return None
    run = sys.modules["mlflow"].active_run()
    return run.info.run_id if run else None
