"""Evaluation library: eval loss over labelled tokens (chunked output head, no full logits), batched greedy
or sampled generation, and the metrics of a model on a validation split; the evaluate stage's nodes call it."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import EvaluateConfig
from .metrics import METRICS, similarity_scores
from .template import IGNORE_INDEX

PREDICTION_COLUMNS = ["prompt", "predict", "label"]
LOWER_IS_BETTER = {"eval_loss", "perplexity"}


def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows])


@torch.no_grad()
def eval_loss(model, examples, batch_size: int, label: str = "") -> tuple[float, int]:
    """Mean next-token loss over labelled positions, weighted per token (not per batch).

    The decoder runs without the output head, and the head is applied only to the labelled positions,
    ``HEAD_CHUNK_ROWS`` at a time (the training loss): full logits of a batch of 8 x 2048 over Qwen2.5's
    151,936 tokens, with their float32 copies, would be ~25 GB.
    """
    from .training.loss import token_mean_loss  # imports transformers' Trainer: only when evaluating

    total, count = 0.0, 0
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    for start in tqdm(range(0, len(examples), batch_size), desc=f"Eval loss {label}".strip(), unit="batch"):
        batch = examples[start : start + batch_size]
        input_ids = _pad(batch["input_ids"], 0).to(device)
        attention = _pad(batch["attention_mask"], 0).to(device)
        labels = _pad(batch["labels"], IGNORE_INDEX).to(device)
        hidden = decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
        total += float(token_mean_loss(head, hidden, labels, num_items_in_batch=1))  # divided by 1: the sum
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / max(count, 1), count


def split_prompt_answer(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Prompt = everything before the last labelled span; answer = that span."""
    end = max(i for i, x in enumerate(labels) if x != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return input_ids[:start], input_ids[start:end]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], config: EvaluateConfig) -> list[list[int]]:
    """Batched decoding of left-padded prompts (greedy unless do_sample); only the new tokens."""
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    input_ids = _pad(prompts, pad, left=True).to(device)
    attention = _pad([[1] * len(p) for p in prompts], 0, left=True).to(device)
    sampling = {"temperature": config.temperature, "top_p": config.top_p} if config.do_sample else {}
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        max_new_tokens=config.max_new_tokens,
        pad_token_id=pad,
        do_sample=config.do_sample,
        **sampling,
    )
    return [row[input_ids.shape[1] :].tolist() for row in out.cpu()]


def evaluate(
    model, tokenizer, validation, config: EvaluateConfig, label: str = ""
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Eval loss / perplexity over the whole split, generation metrics over its first max_samples."""
    model.eval()
    loss, tokens = eval_loss(model, validation, config.batch_size, label)
    count = len(validation) if config.max_samples is None else min(config.max_samples, len(validation))
    sample = validation.select(range(count))
    pairs = [split_prompt_answer(ids, labels) for ids, labels in zip(sample["input_ids"], sample["labels"])]
    if config.do_sample:
        torch.manual_seed(config.seed)
    rows = []
    batches = range(0, len(pairs), config.batch_size)
    for start in tqdm(batches, desc=f"Generating {label}".strip(), unit="batch"):
        chunk = pairs[start : start + config.batch_size]
        for (prompt, answer), output in zip(chunk, generate(model, tokenizer, [p for p, _ in chunk], config)):
            rows.append(
                {
                    "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                    "predict": tokenizer.decode(output, skip_special_tokens=True),
                    "label": tokenizer.decode(answer, skip_special_tokens=True),
                }
            )
    predictions = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
    scores = similarity_scores(list(predictions["predict"]), list(predictions["label"]))
    result = {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        **scores,
        "eval_tokens": tokens,
        "examples": len(validation),
        "generated": len(rows),
    }
    return result, predictions


def compare(base: dict[str, Any], tuned: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: base, fine-tuned, the change, and which is better (None where either is missing)."""
    rows = []
    for metric in ("eval_loss", "perplexity", *METRICS):
        after, before = tuned.get(metric), base.get(metric)
        change = None if after is None or before is None else after - before
        better = None
        if change is not None:
            improved = change < 0 if metric in LOWER_IS_BETTER else change > 0
            better = "finetuned" if improved else ("same" if change == 0 else "base")
        rows.append({"metric": metric, "base": before, "finetuned": after, "change": change, "better": better})
    return rows
