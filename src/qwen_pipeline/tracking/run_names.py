"""MLflow runs named after their stages in run order, whatever order Kedro passes them in."""

from __future__ import annotations

from typing import Any

from kedro.framework.hooks import hook_impl

from ..pipeline_registry import STAGES


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
