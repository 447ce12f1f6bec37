"""A Kedro dataset for metrics about a registered model: logged to the run and attached to the model version."""

from __future__ import annotations

import logging
from typing import Any

from kedro.io import AbstractDataset, DatasetError

logger = logging.getLogger(__name__)


class ModelMetricsDataset(AbstractDataset[dict[str, Any], dict[str, Any]]):
    """Saves ``{"model": registration or None, "metrics": {name: value}}``: each metric is logged to the active
    MLflow run as ``<prefix>.<name>`` and, when the model was registered (``registration`` as the merged
    model's manifest records it: registered_model_name, version, model_id), to that MLflow model too, so the
    version's page shows what it scored. The run is tagged with the model version it measured, and the
    version with the run and its metrics.

    Example catalog entry::

        eval_metrics:
          type: qwen_pipeline.datasets.ModelMetricsDataset
          prefix: eval

    Write-only: the metrics are read back from MLflow.
    """

    def __init__(self, *, prefix: str, metadata: dict[str, Any] | None = None):
        self._prefix = prefix
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"prefix": self._prefix}

    def _load(self) -> dict[str, Any]:
        raise DatasetError(f"ModelMetricsDataset {self._prefix}: write-only (read the metrics from MLflow)")

    def _save(self, data: dict[str, Any]) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException

        run = mlflow.active_run()
        if run is None:
            logger.warning("No active MLflow run: %s metrics not logged", self._prefix)
            return
        metrics = {f"{self._prefix}.{name}": float(value) for name, value in data["metrics"].items()}
        model = data.get("model")
        model_id = model.get("model_id") if model else None
        if model_id and not _logged_model_exists(model_id):
            logger.warning("MLflow model %s is not in this tracking store: metrics logged to the run only", model_id)
            model, model_id = None, None
        mlflow.log_metrics(metrics, step=0, model_id=model_id)
        if not model:
            return
        name, version = model["registered_model_name"], str(model["version"])
        mlflow.set_tags({"model_name": name, "model_version": version, "model_uri": f"models:/{name}/{version}"})
        client = mlflow.MlflowClient()
        try:
            client.set_model_version_tag(name, version, f"{self._prefix}_run_id", run.info.run_id)
            for key, value in metrics.items():
                client.set_model_version_tag(name, version, key, f"{value:.6g}")
        except MlflowException as error:  # the version was deleted since
            logger.warning("%s version %s not tagged with the %s metrics: %s", name, version, self._prefix, error)
            return
        logger.info("%s metrics attached to %s version %s", self._prefix, name, version)


def _logged_model_exists(model_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_logged_model(model_id)
    except MlflowException:
        return False
    return True
