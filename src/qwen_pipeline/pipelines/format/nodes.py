"""Format: conversations -> tokenized SFT examples (input_ids, attention_mask, labels) with the qwen template.

Tokenized splits are cached by a fingerprint of the conversations, the format parameters and the
tokenizer: rerunning with the same inputs reuses them instead of tokenizing again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_from_disk

from ...config import FormatConfig, ModelConfig, parse_config
from ...conversation import Conversation
from ...models import load_tokenizer
from ...template import IGNORE_INDEX, TemplateOptions, assemble, flat_ids, tokenize_turns

logger = logging.getLogger(__name__)

# Bump when the way conversations become tokens changes, so stale caches are not reused.
FORMAT_VERSION = "1"


def tokenize_conversations(
    conversations: list[dict[str, Any]], model_params: dict[str, Any], params: dict[str, Any]
) -> tuple[DatasetDict, dict[str, Any], list[dict[str, Any]]]:
    """Apply the template to every conversation, drop or cut over-long ones, split off validation."""
    model_config = parse_config(ModelConfig, model_params, "model")
    config = parse_config(FormatConfig, params, "format")
    tokenizer = load_tokenizer(
        model_config.model_name_or_path,
        trust_remote_code=model_config.trust_remote_code,
        use_fast=model_config.use_fast_tokenizer,
    )
    key = fingerprint(conversations, config, tokenizer)
    cache = Path(config.cache_dir) / key
    if not config.overwrite_cache and (cache / "report.json").is_file():
        report = json.loads((cache / "report.json").read_text())
        dropped = json.loads((cache / "dropped.json").read_text())
        logger.info("Reusing the tokenized dataset in %s (same conversations, parameters, tokenizer)", cache)
        return load_from_disk(str(cache / "dataset")), {**report, "cache": "hit"}, dropped
    splits, report, dropped = _tokenize(conversations, config, tokenizer)
    report = {**report, "fingerprint": key}
    _write_cache(cache, splits, report, dropped)
    return splits, {**report, "cache": "miss"}, dropped


def _tokenize(conversations, config: FormatConfig, tokenizer):
    options = TemplateOptions(
        cutoff_len=config.cutoff_len,
        train_on_prompt=config.train_on_prompt,
        mask_history=config.mask_history,
        tokenization=config.tokenization,
    )
    parsed = [Conversation.from_dict(c) for c in conversations]
    turns = tokenize_turns(parsed, tokenizer, config.tokenization)
    encoded = [assemble(t, options) for t in turns]
    mismatched = []
    if config.compare_tokenizations:
        other = "whole_text" if config.tokenization == "turns" else "turns"
        alternative = tokenize_turns(parsed, tokenizer, other)
        mismatched = [c.source for c, a, b in zip(parsed, turns, alternative) if flat_ids(a) != flat_ids(b)]
    kept, dropped = [], []
    for conversation, e in zip(parsed, encoded):
        if e.truncated and config.overlength == "drop":
            dropped.append(
                {
                    "dataset": conversation.source.dataset,
                    "file": conversation.source.file,
                    "index": conversation.source.index,
                    "reason": f"{e.full_length} tokens > format.cutoff_len={config.cutoff_len}",
                    "tokens": e.full_length,
                }
            )
        else:
            kept.append(e)
    assert len(kept) + len(dropped) == len(parsed)  # nothing vanishes
    dataset = Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in kept],
            "attention_mask": [[1] * len(e.input_ids) for e in kept],
            "labels": [e.labels for e in kept],
        }
    )
    splits = _split(dataset, config)
    report = _report(encoded, kept, dropped, splits, config)
    report["tokenization_mismatches"] = len(mismatched)
    report["tokenization_mismatch_examples"] = [s.describe() for s in mismatched[:10]]
    logger.info(
        "Tokenized %d conversations (%s): %d kept, %d dropped, %d truncated at cutoff_len=%d; "
        "%d tokens, %d label tokens; train %d / validation %d",
        len(parsed),
        config.tokenization,
        len(kept),
        len(dropped),
        report["truncated"],
        config.cutoff_len,
        report["tokens"],
        report["label_tokens"],
        report["splits"]["train"],
        report["splits"].get("validation", 0),
    )
    if config.compare_tokenizations:
        logger.info(
            "%d of %d conversations tokenize differently turn by turn (LLaMA-Factory) and as whole text "
            "(apply_chat_template, inference servers)%s",
            len(mismatched),
            len(parsed),
            f", e.g. {mismatched[0].describe()}" if mismatched else "",
        )
    return splits, report, dropped


def fingerprint(conversations: list[dict[str, Any]], config: FormatConfig, tokenizer) -> str:
    """Hash of everything the tokenized dataset depends on."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("overwrite_cache", "cache_dir")}
    digest.update(json.dumps([FORMAT_VERSION, settings], sort_keys=True).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps(conversations, ensure_ascii=False).encode())
    return digest.hexdigest()[:20]


def _write_cache(cache: Path, splits: DatasetDict, report: dict, dropped: list) -> None:
    """Write into a temporary sibling, then rename: a killed run leaves no cache entry that looks complete."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    splits.save_to_disk(str(tmp / "dataset"))
    (tmp / "dropped.json").write_text(json.dumps(dropped, ensure_ascii=False))
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)


def _split(dataset: Dataset, config: FormatConfig) -> DatasetDict:
    size = config.val_size
    if not size:
        return DatasetDict({"train": dataset})
    if isinstance(size, int) and size >= len(dataset):
        raise ValueError(f"format.val_size={size} leaves no training examples out of {len(dataset)}")
    # datasets' own seeded split, as LLaMA-Factory does it.
    parts = dataset.train_test_split(test_size=size, seed=config.seed)
    return DatasetDict({"train": parts["train"], "validation": parts["test"]})


def _report(encoded, kept, dropped, splits: DatasetDict, config: FormatConfig) -> dict[str, Any]:
    lengths = [len(e.input_ids) for e in kept]
    return {
        "conversations": len(encoded),
        "examples": len(kept),
        "dropped": len(dropped),
        "truncated": sum(e.truncated for e in kept),
        "tokens": sum(lengths),
        "label_tokens": sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in kept),
        "tokens_cut": sum(e.full_length - len(e.input_ids) for e in kept),
        "max_length": max(lengths, default=0),
        "mean_length": round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
        "cutoff_len": config.cutoff_len,
        "overlength": config.overlength,
        "tokenization": config.tokenization,
        "splits": {name: len(split) for name, split in splits.items()},
    }
