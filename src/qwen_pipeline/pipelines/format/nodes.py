"""Format: conversations -> tokenized SFT examples (input_ids, attention_mask, labels) with the qwen template."""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset, DatasetDict

from ...config import FormatConfig, ModelConfig, parse_config
from ...conversation import Conversation
from ...models import load_tokenizer
from ...template import IGNORE_INDEX, TemplateOptions, encode_conversations, tokenizer_batch_encoder

logger = logging.getLogger(__name__)


def tokenize_conversations(
    conversations: list[dict[str, Any]], model_params: dict[str, Any], params: dict[str, Any]
) -> tuple[DatasetDict, dict[str, Any]]:
    """Apply the template to every conversation and split off the validation set."""
    model_config = parse_config(ModelConfig, model_params, "model")
    config = parse_config(FormatConfig, params, "format")
    tokenizer = load_tokenizer(
        model_config.model_name_or_path,
        trust_remote_code=model_config.trust_remote_code,
        use_fast=model_config.use_fast_tokenizer,
    )
    options = TemplateOptions(
        cutoff_len=config.cutoff_len, train_on_prompt=config.train_on_prompt, mask_history=config.mask_history
    )
    parsed = [Conversation.from_dict(c) for c in conversations]
    encoded = encode_conversations(parsed, tokenizer_batch_encoder(tokenizer), options)
    columns = {
        "input_ids": [e.input_ids for e in encoded],
        "attention_mask": [[1] * len(e.input_ids) for e in encoded],
        "labels": [e.labels for e in encoded],
    }
    dataset = Dataset.from_dict(columns)
    splits = _split(dataset, config)
    report = _report(encoded, splits, config)
    logger.info(
        "Tokenized %d conversations: %d tokens, %d label tokens, %d truncated at cutoff_len=%d; "
        "train %d / validation %d",
        report["examples"],
        report["tokens"],
        report["label_tokens"],
        report["truncated"],
        config.cutoff_len,
        report["splits"]["train"],
        report["splits"].get("validation", 0),
    )
    return splits, report


def _split(dataset: Dataset, config: FormatConfig) -> DatasetDict:
    size = config.val_size
    if not size:
        return DatasetDict({"train": dataset})
    if isinstance(size, int) and size >= len(dataset):
        raise ValueError(f"format.val_size={size} leaves no training examples out of {len(dataset)}")
    # datasets' own split, seeded, as LLaMA-Factory does it.
    parts = dataset.train_test_split(test_size=size, seed=config.seed)
    return DatasetDict({"train": parts["train"], "validation": parts["test"]})


def _report(encoded, splits: DatasetDict, config: FormatConfig) -> dict[str, Any]:
    lengths = [len(e.input_ids) for e in encoded]
    return {
        "examples": len(encoded),
        "tokens": sum(lengths),
        "label_tokens": sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in encoded),
        "max_length": max(lengths, default=0),
        "mean_length": round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
        "truncated": sum(e.truncated for e in encoded),
        "tokens_cut": sum(e.full_length - len(e.input_ids) for e in encoded),
        "cutoff_len": config.cutoff_len,
        "splits": {name: len(split) for name, split in splits.items()},
    }
