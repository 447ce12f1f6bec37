"""What a training run shows while it runs: a progress bar with a one-line loss now and then, and
per-step metrics in MLflow as they come (not when the train node ends).

- ``QuietProgress``: the Trainer's progress bar without the dict it prints at every logging step;
  about ten "step n/N: loss ..." log lines over the run instead.
- ``LiveMetrics``: rank 0 logs ``train/loss``, ``train/learning_rate``, ``train/grad_norm`` and
  ``train/tokens_per_s`` to the run kedro-mlflow opened, at each logging step, and ``eval/loss`` at each
  evaluation while training (same step axis). A resumed run first logs the history its checkpoint holds,
  and never logs a metric twice at one step.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from transformers import ProgressCallback, TrainerCallback

from ..tracking.workers import RUN_ID_ENV, tracking_environment

logger = logging.getLogger(__name__)

METRICS = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "eval_loss": "eval/loss",
}


class QuietProgress(ProgressCallback):
    """The progress bar, and a log line about every tenth of the run instead of a dict per step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        every = max(1, state.max_steps // 10)
        if state.global_step % every == 0 or state.global_step == state.max_steps:
            parts = [f"loss {logs['loss']:.4f}"]
            parts += [f"{k.replace('_', ' ')} {logs[k]:.3g}" for k in ("learning_rate", "grad_norm") if k in logs]
            logger.info("step %d/%d: %s", state.global_step, state.max_steps, ", ".join(parts))


class LiveMetrics(TrainerCallback):
    """Per-step metrics into an MLflow run while training runs (rank 0 only)."""

    def __init__(self, run_id: str, tracking_uri: str | None = None):
        from mlflow import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.logged: set[tuple[str, int]] = set()  # (metric, step) in the run already
        self.last: tuple[float, int] | None = None  # (time, tokens seen) at the last logging step
        # Non-padding tokens trained on so far, all processes (set by the recipe: the trainer counts them).
        self.tokens_seen: Callable[[], int] = lambda: 0

    @classmethod
    def for_this_process(cls) -> LiveMetrics | None:
        """The callback for the run kedro-mlflow opened (this process's, or the launcher's), or None."""
        run_id = os.environ.get(RUN_ID_ENV)
        if run_id:
            return cls(run_id, os.environ.get("MLFLOW_TRACKING_URI"))
        environment = tracking_environment()
        return cls(environment[RUN_ID_ENV], environment["MLFLOW_TRACKING_URI"]) if environment else None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.logged = {
            (name, m.step) for name in METRICS.values() for m in self.client.get_metric_history(self.run_id, name)
        }
        # A resumed run: the steps before its checkpoint, from the history the checkpoint holds.
        self._log([entry for entry in state.log_history if "loss" in entry or "eval_loss" in entry])
        self.last = (time.perf_counter(), self.tokens_seen())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or not {"loss", "eval_loss"} & logs.keys():
            return
        entry = {**logs, "step": state.global_step}
        if "loss" not in logs:  # an evaluation
            self._log([entry])
            return
        now, tokens = time.perf_counter(), self.tokens_seen()
        if self.last is not None and tokens and now > self.last[0]:
            entry["tokens_per_s"] = (tokens - self.last[1]) / (now - self.last[0])
        self.last = (now, tokens)
        self._log([entry])

    def log_generations(self, step: int, values: dict[str, float], rows: list[dict]) -> None:
        """An evaluation's generation metrics (as ``eval/<name>``) and its answers as a table artifact."""
        import pandas as pd

        self._log([{"step": step, **values}], names={key: f"eval/{key}" for key in values})
        self.client.log_table(
            self.run_id, data=pd.DataFrame(rows), artifact_file=f"generation_eval/step_{step:06d}.json"
        )

    def _log(self, entries: list[dict], names: dict[str, str] = METRICS) -> None:
        """Each entry's values (``names``: entry key -> MLflow metric) at its step, none logged twice."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = []
        for entry in entries:
            step = int(entry["step"])
            new = [(key, name) for key, name in names.items() if key in entry and (name, step) not in self.logged]
            self.logged.update((name, step) for _, name in new)
            metrics += [Metric(name, float(entry[key]), stamp, step) for key, name in new]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a call
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])
