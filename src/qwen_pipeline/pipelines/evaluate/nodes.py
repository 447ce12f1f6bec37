"""Evaluate: eval loss / perplexity on the validation split and a few greedy generations."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from datasets import DatasetDict

from ...config import EvaluateConfig, parse_config
from ...datasets import ModelBundle
from ...errors import DataError
from ...template import IGNORE_INDEX

logger = logging.getLogger(__name__)


def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows])


@torch.no_grad()
def eval_loss(model, examples, batch_size: int) -> tuple[float, int]:
    """Mean next-token loss over labelled positions, weighted per token (not per batch)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        input_ids = _pad(batch["input_ids"], 0)
        attention = _pad(batch["attention_mask"], 0)
        labels = _pad(batch["labels"], IGNORE_INDEX)
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
        target = labels[:, 1:]
        total += float(
            F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        )
        count += int((target != IGNORE_INDEX).sum())
    return total / max(count, 1), count


def split_prompt_answer(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Prompt = everything before the last labelled span; answer = that span."""
    end = max(i for i, x in enumerate(labels) if x != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return input_ids[:start], input_ids[start:end]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding of left-padded prompts; returns only the new tokens, up to eos."""
    pad = tokenizer.pad_token_id
    input_ids = _pad(prompts, pad, left=True)
    attention = _pad([[1] * len(p) for p in prompts], 0, left=True)
    out = model.generate(
        input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
    )
    return [row[input_ids.shape[1] :].tolist() for row in out]


def evaluate_model(
    merged_model: ModelBundle, sft_dataset: DatasetDict, params: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, str]]]:
    config = parse_config(EvaluateConfig, params, "evaluate")
    if "validation" not in sft_dataset:
        raise DataError("sft_dataset has no validation split: set format.val_size above 0 to evaluate")
    model, tokenizer = merged_model.model, merged_model.tokenizer
    model.eval()
    validation = sft_dataset["validation"]
    loss, tokens = eval_loss(model, validation, config.batch_size)
    sample = validation.select(range(min(config.num_generations, len(validation))))
    pairs = [split_prompt_answer(ids, labels) for ids, labels in zip(sample["input_ids"], sample["labels"])]
    predictions = []
    for start in range(0, len(pairs), config.batch_size):
        chunk = pairs[start : start + config.batch_size]
        outputs = generate(model, tokenizer, [p for p, _ in chunk], config.max_new_tokens)
        for (prompt, answer), output in zip(chunk, outputs):
            predictions.append(
                {
                    "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                    "predict": tokenizer.decode(output, skip_special_tokens=True),
                    "label": tokenizer.decode(answer, skip_special_tokens=True),
                }
            )
    report = {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "eval_tokens": tokens,
        "examples": len(validation),
        "generated": len(predictions),
    }
    logger.info("Eval loss %.4f (perplexity %.2f) over %d tokens", loss, report["perplexity"], tokens)
    metrics = {k: {"value": float(report[k]), "step": 0} for k in ("eval_loss", "perplexity")}
    return metrics, report, predictions
