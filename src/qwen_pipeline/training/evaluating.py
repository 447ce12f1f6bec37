"""Evaluation while training: the Trainer's arguments for it, the validation sample it runs on (seeded,
bounded), early stopping, and what the summary says about it (the best step, why training stopped).

The eval loss is the training loss's (``SFTTrainer.compute_loss``: the output head only on labelled positions)
on unpacked validation examples; only the loss is kept (``prediction_loss_only``, set for every evaluation in
``recipe.training_arguments``), so an evaluation holds one batch at a time whatever the size of the split.
"""

from __future__ import annotations

import random
from typing import Any

from ..config import TrainConfig


def eval_arguments(config: TrainConfig) -> dict[str, Any]:
    """``TrainingArguments`` for evaluating while training (none when ``eval_strategy`` is no)."""
    if config.eval_strategy == "no":
        return {}
    args: dict[str, Any] = {
        "eval_strategy": config.eval_strategy,
        "eval_steps": config.eval_steps or config.logging_steps,
        "metric_for_best_model": config.metric_for_best_model,
        "greater_is_better": False,
        "load_best_model_at_end": config.load_best_model_at_end,
    }
    if config.load_best_model_at_end and not config.save_steps:
        args["save_strategy"] = "best"  # a checkpoint each time the eval loss improves, the best one kept
    return args


def eval_sample(validation, config: TrainConfig):
    """The validation examples evaluated on: all, or a seeded sample of ``eval_max_samples`` in their order."""
    count = config.eval_max_samples
    if count is None or count >= len(validation):
        return validation
    return validation.select(sorted(random.Random(config.seed).sample(range(len(validation)), count)))


def early_stopping(config: TrainConfig):
    """transformers' early stopping callback, or None when ``early_stopping_patience`` is 0."""
    if not config.early_stopping_patience:
        return None
    from transformers import EarlyStoppingCallback

    return EarlyStoppingCallback(config.early_stopping_patience, config.early_stopping_threshold)


def eval_summary(log_history: list[dict[str, Any]], stopping) -> dict[str, Any]:
    """The evaluations while training: how many, the step with the lowest eval loss (the first of equals),
    and whether training ran its schedule or early stopping ended it."""
    evals = [(int(entry["step"]), float(entry["eval_loss"])) for entry in log_history if "eval_loss" in entry]
    if not evals:
        return {}
    best_step, best_loss = min(evals, key=lambda step_loss: step_loss[1])
    stopped = stopping is not None and stopping.early_stopping_patience_counter >= stopping.early_stopping_patience
    return {
        "evaluations": len(evals),
        "best_step": best_step,
        "best_eval_loss": best_loss,
        "stopped_by": "early_stopping" if stopped else "schedule",
    }


def final_eval_loss(trainer, live) -> float:
    """The trained model's eval loss: the last evaluation's when it ran at the last step on the model returned,
    else one more evaluation (kept off the live curve: with load_best_model_at_end it is an earlier step's model)."""
    last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
    if last is not None and last["step"] == trainer.state.global_step and not trainer.args.load_best_model_at_end:
        return float(last["eval_loss"])
    if live is not None:
        trainer.remove_callback(live)
    return float(trainer.evaluate()["eval_loss"])
