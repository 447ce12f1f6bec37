"""Train: LoRA SFT of the base model on the tokenized dataset (the recipe lives in ``training/``).

The cutoff_len and template come from the tokenized dataset (what format recorded when it made it),
not from params:format, which may have changed since. The model is saved by the process that trained it
(rank 0 under torchrun); the node hands that folder to the ``trained_model`` dataset, which moves it into
place: the weights are never loaded here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from datasets import DatasetDict

from ...config import ConfigError, TrainConfig, pack_length, parse_config
from ...datasets import BaseModel, ModelFiles, StageOutput
from ...errors import DataError
from ...training.checks import environment_problems
from ...training.launcher import train
from ...training.memory import MemoryPlan
from ...training.packing import labelled_tokens, row_lengths

logger = logging.getLogger(__name__)

FORMAT_AGAIN = "run kedro run --pipelines format"


def train_model(
    sft_dataset: StageOutput, base_model: BaseModel, params: dict[str, Any]
) -> tuple[ModelFiles, list[dict[str, float]], dict[str, Any], dict[str, Any], Any]:
    """The trained model's files, the per-step loss, learning rate and grad norm (in MLflow already, live,
    as train/<name>), a summary, its metrics, a loss plot."""
    config = parse_config(TrainConfig, params, "train")
    made_with, packs = sft_dataset.settings, config.packing or config.neat_packing
    if packs and "cutoff_len" in made_with:  # pack_length unless set: the cutoff the data was made with
        config = dataclasses.replace(config, pack_length=pack_length(config, made_with["cutoff_len"]))
    if problems := data_problems(sft_dataset, config):  # before any model is loaded
        raise DataError(
            "sft_dataset cannot be trained on: " + problems[0]
            if len(problems) == 1
            else "sft_dataset cannot be trained on:\n  - " + "\n  - ".join(problems)
        )
    if problems := environment_problems(config):
        raise ConfigError(problems)
    plan = memory_plan(sft_dataset.data, base_model, config)
    data = {"template": made_with["template"], "cutoff_len": made_with["cutoff_len"]}
    logger.info(
        "Training on sft_dataset made with template %s, cutoff_len %d%s",
        data["template"],
        data["cutoff_len"],
        f"; pack_length {config.pack_length}" if packs else "",
    )
    result = train(sft_dataset.data, base_model.settings, config)
    summary = {**result.summary, **{f"data_{key}": value for key, value in data.items()}}
    summary |= plan.metrics() if plan else {}
    if packs:
        summary["pack_length"] = config.pack_length
    model = ModelFiles(
        path=result.path,
        manifest={
            "kind": result.kind,
            "base_model": base_model.name,
            "finetuning_type": config.finetuning_type,
            "quantization_bit": config.quantization_bit,
            "data_fingerprint": result.summary["data_fingerprint"],
            "data": data,  # what the data was made with (format's settings), not this run's params:format
            "train_config": dataclasses.asdict(config),
            "training": summary,
        },
    )
    loss_history = {int(entry["step"]): entry["loss"] for entry in result.history}
    metrics = {
        key: {"value": float(value), "step": 0} for key, value in summary.items() if isinstance(value, (int, float))
    }
    return model, result.history, summary, metrics, plot_loss(loss_history)


def memory_plan(dataset: DatasetDict, base_model: BaseModel, config: TrainConfig) -> MemoryPlan | None:
    """What one training process will hold, from the model's config alone, against the free memory of its device;
    a run that cannot fit stops here (``train.memory_check``), before any weights load. Off: no plan at all."""
    if config.memory_check == "off":
        return None
    import torch

    from ...training.launcher import Topology
    from ...training.memory import Shape, check_memory, placement_for, plan_memory

    topology = Topology.from_config(config)
    placement = placement_for(
        config, world_size=topology.world_size, procs_per_node=topology.nproc_per_node, cuda=torch.cuda.is_available()
    )
    lengths = row_lengths(dataset["train"])
    if config.packing or config.neat_packing:
        shape = Shape(rows=config.per_device_train_batch_size, row_length=config.pack_length)
    else:  # the longest example makes the widest padded batch (padding-free rows are no longer than it either)
        shape = Shape(rows=config.per_device_train_batch_size, row_length=int(lengths.max()) if len(lengths) else 1)
    plan = plan_memory(base_model.name, config, shape, placement)
    logger.info("%s", plan.describe())
    check_memory(plan, config.memory_check)
    return plan


def data_problems(sft_dataset: StageOutput, config: TrainConfig) -> list[str]:
    """What makes the tokenized data untrainable as configured, all of it, from the Arrow offsets and labels
    (no example is read into Python): no recorded settings, examples packing would have to cut, no label."""
    made_with, found = sft_dataset.settings, []
    if not made_with:
        found.append(
            "it does not record the cutoff_len and template it was made with (made by an older version of the "
            f"format stage): {FORMAT_AGAIN}"
        )
    if not isinstance(sft_dataset.data, DatasetDict) or "train" not in sft_dataset.data:
        return found + [f"it has no train split: {FORMAT_AGAIN}"]
    if config.eval_strategy != "no" and "validation" not in sft_dataset.data:
        found.append(
            f"train.eval_strategy={config.eval_strategy} evaluates on the validation split, and it has none: set "
            f"format.val_size (e.g. 0.1) or ingest.eval_dataset, then {FORMAT_AGAIN}"
        )
    train_split = sft_dataset.data["train"]
    lengths = row_lengths(train_split)
    if (config.packing or config.neat_packing) and config.pack_length is not None and len(lengths):
        if (over := int((lengths > config.pack_length).sum())) > 0:
            cutoff = made_with.get("cutoff_len", "unknown")
            found.append(
                f"{over} of {len(lengths)} training examples are longer than train.pack_length="
                f"{config.pack_length} (the longest: {int(lengths.max())} tokens; the data was made with "
                f"cutoff_len={cutoff}): packing would cut them. Raise train.pack_length to at least "
                f"{int(lengths.max())} or leave it unset (it then follows the data's cutoff_len), or make the "
                f"data with format.cutoff_len={config.pack_length} ({FORMAT_AGAIN})"
            )
    if labelled_tokens(train_split) == 0:
        keys = ("cutoff_len", "train_on_prompt", "mask_history")
        settings = ", ".join(f"{k}={made_with[k]}" for k in keys if k in made_with)
        found.append(
            f"its train split holds no labelled token ({len(lengths)} examples, {int(lengths.sum())} tokens, "
            f"every label -100): there is nothing to learn. It was made with {settings or 'unrecorded settings'}: "
            "raise format.cutoff_len if prompts fill it, or set format.train_on_prompt: true, or check the "
            f"answers in the data; then {FORMAT_AGAIN}"
        )
    return found


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
