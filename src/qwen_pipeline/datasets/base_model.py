"""A Kedro dataset for the model every stage starts from: where it is and how to read it, nothing loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from ..config import ConfigError, ModelConfig, parse_config
from ..errors import QwenPipelineError


class BaseModelMismatchError(QwenPipelineError):
    """A model made from one base model, used with another."""


@dataclass(frozen=True)
class BaseModel:
    """The base model: its id or folder and how to load it. The tokenizer and weights are read only by
    the node that asks (format reads the tokenizer, train and evaluate the weights, merge the files)."""

    settings: ModelConfig  # model_name_or_path, trust_remote_code, use_fast_tokenizer

    @property
    def name(self) -> str:
        return self.settings.model_name_or_path

    def local_dir(self) -> Path:
        """The folder holding it (the embedded model is built there on first use)."""
        from ..models import local_model_dir

        return local_model_dir(self.name)

    def load_tokenizer(self):
        from ..models import load_tokenizer

        return load_tokenizer(
            self.name, trust_remote_code=self.settings.trust_remote_code, use_fast=self.settings.use_fast_tokenizer
        )

    def tokenizer_fingerprint(self) -> str:
        """A hash of the tokenizer's files (what the tokenized data depends on), without loading it."""
        from ..models import tokenizer_fingerprint

        return tokenizer_fingerprint(
            self.name, trust_remote_code=self.settings.trust_remote_code, use_fast=self.settings.use_fast_tokenizer
        )

    def check_made_from(self, recorded: str, what: str) -> None:
        """Raise unless ``recorded`` (the base a model was made from) is this model, by name or by folder."""
        if recorded == self.name or _same_folder(recorded, self.name):
            return
        raise BaseModelMismatchError(
            f"{what} was made from base model {recorded!r}, but base_model is {self.name!r}: run with "
            f"--params model.model_name_or_path={recorded} (or set model.model_name_or_path in "
            "conf/<env>/globals.yml), or train again from this base"
        )


def _same_folder(a: str, b: str) -> bool:
    from ..models import resolve_model_path

    try:
        first, second = Path(resolve_model_path(a)), Path(resolve_model_path(b))
    except ValueError:  # an unknown embedded name
        return False
    return first.is_dir() and second.is_dir() and first.resolve() == second.resolve()


class BaseModelDataset(AbstractDataset[None, BaseModel]):
    """The base model, read-only: a hub id, a local folder, or the embedded CPU default.

    Example catalog entry (the values come from ``globals.yml``, and ``--params model.<key>=...`` overrides
    them for one run)::

        base_model:
          type: qwen_pipeline.datasets.BaseModelDataset
          model_name_or_path: ${runtime_params:model.model_name_or_path, ${globals:model.model_name_or_path}}
          trust_remote_code: false
          use_fast_tokenizer: true

    ``load`` gives a ``BaseModel`` at once: nothing is read until a node asks for the tokenizer or weights.
    In a run tracked by MLflow, the settings are logged as the run's ``model.<key>`` parameters.
    """

    def __init__(
        self,
        *,
        model_name_or_path: str,
        trust_remote_code: bool = False,
        use_fast_tokenizer: bool = True,
        metadata: dict[str, Any] | None = None,
    ):
        given = {
            "model_name_or_path": model_name_or_path,
            "trust_remote_code": trust_remote_code,
            "use_fast_tokenizer": use_fast_tokenizer,
        }
        try:
            self._settings = parse_config(ModelConfig, given, "model")
        except ConfigError as error:
            raise DatasetError(f"base_model: {error}") from None
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {
            "model_name_or_path": self._settings.model_name_or_path,
            "trust_remote_code": self._settings.trust_remote_code,
            "use_fast_tokenizer": self._settings.use_fast_tokenizer,
        }

    def _load(self) -> BaseModel:
        _log_params({f"model.{key}": value for key, value in self._describe().items()})
        return BaseModel(self._settings)

    def _save(self, data: None) -> None:
        raise DatasetError("base_model is read-only: it is the model training starts from")

    def _exists(self) -> bool:
        try:
            self._load().local_dir()
        except (FileNotFoundError, ValueError):
            return False
        return True


def _log_params(params: dict[str, Any]) -> None:
    """Log them on the active MLflow run, if one (kedro-mlflow starts one per kedro run; logging the same
    value again is allowed)."""
    import sys

    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.log_params(params)
