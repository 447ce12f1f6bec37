"""The SFT recipe, top to bottom: load -> wrap -> train -> return.

One process, in-process. Launch concerns (torchrun, DeepSpeed, ranks) will live in a
thin launcher beside this file, not in here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from datasets import DatasetDict

from ..config import ModelConfig, TrainConfig
from ..models import load_causal_lm, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: Any  # the PEFT-wrapped model, adapter trained
    tokenizer: Any
    history: list[dict[str, float]]  # one entry per logging step: step, loss, learning_rate, grad_norm
    summary: dict[str, Any]


def wrap_lora(model, config: TrainConfig):
    from peft import LoraConfig, TaskType, get_peft_model

    target = "all-linear" if config.lora_target == "all" else config.lora_target  # PEFT skips the head
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_rank,
        lora_dropout=config.lora_dropout,
        target_modules=target,
    )
    return get_peft_model(model, lora)


def run_sft(dataset: DatasetDict, model_config: ModelConfig, config: TrainConfig) -> TrainResult:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    set_seed(config.seed)
    # Load
    tokenizer = load_tokenizer(
        model_config.model_name_or_path,
        trust_remote_code=model_config.trust_remote_code,
        use_fast=model_config.use_fast_tokenizer,
    )
    model = load_causal_lm(model_config.model_name_or_path, trust_remote_code=model_config.trust_remote_code)
    # Wrap
    model = wrap_lora(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %d trainable parameters of %d (%.3f%%)", trainable, total, 100 * trainable / total)
    # Train
    args = TrainingArguments(
        output_dir=config.output_dir,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        # transformers 5 takes the ratio through warmup_steps (a float below 1).
        warmup_steps=config.warmup_steps if config.warmup_steps > 0 else config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        seed=config.seed,
        save_strategy="no",  # checkpoints and resume come with the launcher
        report_to="none",  # the train node hands the history to kedro-mlflow
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning only helps a GPU
    )
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["validation"] if "validation" in dataset else None,
        data_collator=collator,
    )
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    history = [
        {k: float(entry[k]) for k in ("step", "loss", "learning_rate", "grad_norm") if k in entry}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    label_tokens = sum(sum(1 for x in labels if x != -100) for labels in dataset["train"]["labels"])
    epochs = min(args.num_train_epochs, trainer.state.epoch or 0.0)
    summary = {
        "train_runtime_s": round(seconds, 2),
        "global_steps": trainer.state.global_step,
        "train_loss": float(output.training_loss),
        "first_loss": history[0]["loss"] if history else math.nan,
        "last_loss": history[-1]["loss"] if history else math.nan,
        "epochs": float(epochs),
        "label_tokens_per_epoch": label_tokens,
        "trainable_parameters": trainable,
    }
    if "validation" in dataset:
        summary["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    logger.info(
        "Trained %d steps in %.1f s: loss %.4f -> %.4f",
        summary["global_steps"],
        seconds,
        summary["first_loss"],
        summary["last_loss"],
    )
    # Return (the train node hands the model to the catalog, which saves it)
    return TrainResult(model=model, tokenizer=tokenizer, history=history, summary=summary)
