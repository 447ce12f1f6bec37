"""Train: LoRA SFT of the base model on the tokenized dataset (the recipe lives in ``training/``).

The model is saved by the process that trained it (rank 0 under torchrun); the node hands that folder
to the ``trained_model`` dataset, which moves it into place: the weights are never loaded here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from datasets import DatasetDict

from ...config import ConfigError, FormatConfig, ModelConfig, TrainConfig, pack_length, parse_config
from ...datasets import ModelFiles
from ...training.checks import environment_problems
from ...training.launcher import train


def train_model(
    sft_dataset: DatasetDict, model_params: dict[str, Any], params: dict[str, Any], format_params: dict[str, Any]
) -> tuple[ModelFiles, list[dict[str, float]], dict[str, Any], dict[str, Any], Any]:
    """The trained model's files, the per-step loss, learning rate and grad norm (in MLflow already, live,
    as train/<name>), a summary, its metrics, a loss plot."""
    model_config = parse_config(ModelConfig, model_params, "model")
    config = parse_config(TrainConfig, params, "train")
    if config.packing or config.neat_packing:  # pack_length follows format.cutoff_len unless set
        config = dataclasses.replace(
            config, pack_length=pack_length(config, parse_config(FormatConfig, format_params, "format"))
        )
    if problems := environment_problems(config):  # before any model is loaded
        raise ConfigError(problems)
    result = train(sft_dataset, model_config, config)
    model = ModelFiles(
        path=result.path,
        manifest={
            "kind": result.kind,
            "base_model": model_config.model_name_or_path,
            "finetuning_type": config.finetuning_type,
            "quantization_bit": config.quantization_bit,
            "data_fingerprint": result.summary["data_fingerprint"],
            "train_config": dataclasses.asdict(config),
            "training": result.summary,
        },
    )
    loss_history = {int(entry["step"]): entry["loss"] for entry in result.history}
    metrics = {
        key: {"value": float(value), "step": 0}
        for key, value in result.summary.items()
        if isinstance(value, (int, float))
    }
    return model, result.history, result.summary, metrics, plot_loss(loss_history)


def smooth(values: list[float]) -> list[float]:
    """Exponential moving average whose weight grows with the number of points (LLaMA-Factory's plot_loss)."""
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    smoothed, last = [], values[0]
    for value in values:
        last = last * weight + (1 - weight) * value
        smoothed.append(last)
    return smoothed


def plot_loss(loss_history: dict[int, float]):
    """Training loss per step, raw and smoothed, as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps, losses = list(loss_history), list(loss_history.values())
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(steps, losses, color="#1f77b4", alpha=0.4, label="original")
    axes.plot(steps, smooth(losses), color="#1f77b4", label="smoothed")
    axes.set(title="training loss", xlabel="step", ylabel="loss")
    axes.legend()
    figure.tight_layout()
    plt.close(figure)
    return figure
