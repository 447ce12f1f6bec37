"""The closing lines of a `kedro run`: where its MLflow run is, what it wrote, its counts, what to run next.

Read from the reports the run saved (never from the data), so writing it costs nothing and it cannot
fail a run that succeeded.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kedro.framework.hooks import hook_impl

from .pipeline_registry import STAGES

logger = logging.getLogger(__name__)

# The pipeline to run after a run whose last stage is the key.
NEXT = {
    "train": "kedro run --pipelines merge",
    "merge": "kedro run --pipelines evaluate",
    "evaluate": "kedro viz run (the lineage); the MLflow UI above (runs, curves, the registered model)",
    "format": "kedro run --pipelines train",
    "validate": "kedro run --pipelines format",
    "ingest": "kedro run --pipelines validate",
}


class RunSummaryHook:
    """Logs the run summary when a run ends well."""

    def __init__(self) -> None:
        self._started = 0.0

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        """Says where to watch the run (kedro-mlflow has just started its MLflow run)."""
        self._started = time.monotonic()
        try:
            for line in _mlflow_lines(started=True):
                logger.info("%s", line)
        except Exception:  # noqa: BLE001 - never stops a run
            logger.debug("no MLflow line", exc_info=True)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], run_result, pipeline, catalog) -> None:
        _readable_runner_tag(run_params)
        try:
            lines = summary_lines(
                pipeline.all_outputs(), catalog, time.monotonic() - self._started, run_params.get("env")
            )
        except Exception:  # noqa: BLE001 - a summary never fails a run that succeeded
            logger.debug("no run summary", exc_info=True)
            return
        logger.info("Run summary\n%s", "\n".join(f"  {line}" for line in lines))


def _path(catalog, name: str) -> str:
    described = catalog.get(name)._describe()
    inner = described.get("dataset") if isinstance(described.get("dataset"), dict) else described
    return str(inner.get("filepath") or inner.get("path") or described.get("filepath") or name)


def summary_lines(outputs: set[str], catalog, seconds: float, env: str | None = None) -> list[str]:
    lines = [f"finished in {seconds:.1f} s"]
    lines += _mlflow_lines()
    stages = []
    if "validation_report" in outputs:
        stages.append("validate")
        report = catalog.load("validation_report")
        warned = sum(w["records"] for w in report.get("warnings", {}).values())
        lines.append(
            f"records: {report['read']} read, {report['kept']} kept, {report['rejected']} rejected "
            f"({_path(catalog, 'rejected_records')}), {warned} kept with warnings "
            f"({_path(catalog, 'validation_report')})"
        )
    if "format_report" in outputs:
        stages.append("format")
        report = catalog.load("format_report")
        splits = ", ".join(f"{name} {count}" for name, count in report["splits"].items())
        lines.append(
            f"examples: {report['examples']} ({report['tokens']} tokens, {report['label_tokens']} learned; {splits}), "
            f"{report['dropped']} dropped, {report['truncated']} truncated -> {_path(catalog, 'sft_dataset')}"
        )
    if "training_summary" in outputs:
        stages.append("train")
        summary = catalog.load("training_summary")
        evaluation = f", eval loss {summary['eval_loss']:.4f}" if "eval_loss" in summary else ""
        lines.append(
            f"training: {summary['global_steps']} steps, loss {summary['first_loss']:.4f} -> "
            f"{summary['last_loss']:.4f}{evaluation} -> {_path(catalog, 'trained_model')}"
        )
        if "best_step" in summary:
            stopped = "early stopping ended it" if summary["stopped_by"] == "early_stopping" else "it ran its schedule"
            lines.append(
                f"evaluations: {summary['evaluations']}, the best at step {summary['best_step']} (eval loss "
                f"{summary['best_eval_loss']:.4f}); {stopped}"
            )
        if "plan.total_gb" in summary:
            peak = summary.get("peak_gpu_memory_gb", summary.get("peak_rss_gb"))
            lines.append(
                f"memory: planned {summary['plan.total_gb']:.2f} GiB per device of {summary['plan.available_gb']:.2f} "
                f"free" + (f", peak seen {peak:.2f} GiB" if peak is not None else "")
            )
    if "merge_report" in outputs:
        stages.append("merge")
        check = catalog.load("merge_report")["check"]
        verdict = "passed" if check["passed"] else "FAILED"
        lines.append(
            f"merge: check {verdict} (max |logit diff| {check['max_abs_logit_diff']:.3g} <= tolerance "
            f"{check['tolerance']:.3g}, top-1 agreement {check['top1_agreement']:.3f}) "
            f"-> {_path(catalog, 'merged_model')}"
        )
        lines += _registration_lines(catalog)
    if "eval_report" in outputs:
        stages.append("evaluate")
        report = catalog.load("eval_report")
        rows = {row["metric"]: row for row in report["comparison"]}
        shown = [
            f"{name} {row['base']:.4g} -> {row['finetuned']:.4g}"
            for name, row in rows.items()
            if row["base"] is not None and row["finetuned"] is not None
        ][:4]
        lines.append(f"evaluation (base -> fine-tuned): {'; '.join(shown)} -> {_path(catalog, 'eval_comparison')}")
        if registered := report["finetuned"].get("registered_model"):
            lines.append(f"evaluated: {registered['model_uri']} (the metrics are on that model version too)")
    if stages:
        last = max(stages, key=STAGES.index)
        same_env = f" --env {env}" if env and env != "local" and NEXT[last].startswith("kedro run") else ""
        lines.append(f"next: {NEXT[last]}{same_env}")  # in the environment this run used
    return lines


def _registration_lines(catalog) -> list[str]:
    """The MLflow model version the merged model was registered as, and the disk it took in the store."""
    registration = catalog.load("merged_model").registration if "merged_model" in catalog else None
    if not registration:
        return []
    alias = f" (@{registration['alias']})" if registration.get("alias") else ""
    return [
        f"registered: {registration['model_uri']}{alias}, {registration['bytes_copied'] / 1e6:.1f} MB copied into "
        f"the MLflow store, {registration['bytes_linked'] / 1e6:.1f} MB hard-linked"
    ]


def _mlflow_lines(started: bool = False) -> list[str]:
    import sys

    if "mlflow" not in sys.modules:  # tracking disabled for this pipeline
        return []
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.active_run() or (None if started else mlflow.last_active_run())
    except MlflowException:  # the last run this process made is in another store: not this run's
        return []
    if run is None:
        return []
    uri = mlflow.get_tracking_uri()
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else uri
    return [
        f"MLflow run {run.info.run_id} ({run.info.run_name}){' started' if started else ''}: {ui}, then "
        f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    ]


def _readable_runner_tag(run_params: dict[str, Any]) -> None:
    """kedro-mlflow tags the run with the runner object's repr ("<kedro.runner... object at 0x7f...>"):
    the class name instead."""
    runner = str(run_params.get("runner") or "")
    if " object at " not in runner:
        return
    try:
        import mlflow

        run = mlflow.active_run() or mlflow.last_active_run()
        if run is not None:
            name = runner.split(" object at ")[0].rsplit(".", 1)[-1]
            mlflow.MlflowClient().set_tag(run.info.run_id, "runner", name)
    except Exception:  # noqa: BLE001 - a tag never fails a run that succeeded
        logger.debug("runner tag not set", exc_info=True)
