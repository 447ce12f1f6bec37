"""Train: LoRA SFT of the base model on the tokenized dataset (the recipe lives in ``training/``)."""

from __future__ import annotations

from typing import Any

from datasets import DatasetDict

from ...config import ConfigError, ModelConfig, TrainConfig, parse_config
from ...datasets import ModelBundle
from ...training.checks import environment_problems
from ...training.recipe import run_sft


def train_model(
    sft_dataset: DatasetDict, model_params: dict[str, Any], params: dict[str, Any]
) -> tuple[ModelBundle, dict[int, float], dict[str, Any], dict[str, Any]]:
    """Returns the trained adapter, the per-step loss, a summary and its metrics for MLflow."""
    model_config = parse_config(ModelConfig, model_params, "model")
    config = parse_config(TrainConfig, params, "train")
    if problems := environment_problems(config):  # before any model is loaded
        raise ConfigError(problems)
    result = run_sft(sft_dataset, model_config, config)
    bundle = ModelBundle(
        model=result.model,
        tokenizer=result.tokenizer,
        base_model=model_config.model_name_or_path,
        info={
            "finetuning_type": config.finetuning_type,
            "quantization_bit": config.quantization_bit,
            "training": result.summary,
        },
    )
    loss_history = {int(entry["step"]): entry["loss"] for entry in result.history}
    metrics = {
        key: {"value": float(value), "step": 0}
        for key, value in result.summary.items()
        if isinstance(value, (int, float))
    }
    return bundle, loss_history, result.summary, metrics
