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

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, load_from_disk
from datasets.table import InMemoryTable

from ...config import FormatConfig, ModelConfig, parse_config
from ...conversation import Conversation
from ...errors import DataError
from ...models import load_tokenizer
from ...template import IGNORE_INDEX, TemplateOptions, assemble, flat_ids, may_tokenize_differently, tokenize_turns

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


# Conversations tokenized per chunk: big enough for the tokenizer's parallel batch, small enough
# that the Python lists of one chunk are all that is held before it becomes Arrow.
CHUNK = 4096


def _tokenize(conversations, config: FormatConfig, tokenizer):
    options = TemplateOptions(
        cutoff_len=config.cutoff_len,
        train_on_prompt=config.train_on_prompt,
        mask_history=config.mask_history,
        tokenization=config.tokenization,
    )
    tables, dropped, mismatched, held_out = [], [], [], []
    stats = {"examples": 0, "truncated": 0, "tokens": 0, "label_tokens": 0, "tokens_cut": 0, "max_length": 0}
    for start in range(0, len(conversations), CHUNK):
        parsed = [Conversation.from_dict(c) for c in conversations[start : start + CHUNK]]
        turns = tokenize_turns(parsed, tokenizer, config.tokenization)
        kept = []
        chunk = conversations[start : start + CHUNK]
        for record, conversation, e in zip(chunk, parsed, (assemble(t, options) for t in turns)):
            if e.truncated and config.overlength == "drop":
                source = conversation.source
                reason = f"{e.full_length} tokens > format.cutoff_len={config.cutoff_len}"
                dropped.append(
                    {
                        "dataset": source.dataset,
                        "file": source.file,
                        "index": source.index,
                        "reason": reason,
                        "tokens": e.full_length,
                    }
                )
                continue
            kept.append(e)
            held_out.append(record.get("split") == "validation")  # from ingest.eval_dataset
            stats["truncated"] += e.truncated
            stats["tokens"] += len(e.input_ids)
            stats["label_tokens"] += sum(1 for x in e.labels if x != IGNORE_INDEX)
            stats["tokens_cut"] += e.full_length - len(e.input_ids)
            stats["max_length"] = max(stats["max_length"], len(e.input_ids))
        stats["examples"] += len(kept)
        if config.compare_tokenizations:  # only conversations where the two can differ need a second pass
            other = "whole_text" if config.tokenization == "turns" else "turns"
            candidates = [n for n, c in enumerate(parsed) if may_tokenize_differently(c)]
            alternative = tokenize_turns([parsed[n] for n in candidates], tokenizer, other)
            mismatched += [
                parsed[n].source for n, b in zip(candidates, alternative) if flat_ids(turns[n]) != flat_ids(b)
            ]
        tables.append(_to_arrow(kept))
    assert stats["examples"] + len(dropped) == len(conversations)  # nothing vanishes
    dataset = Dataset(InMemoryTable(pa.concat_tables(tables) if tables else _to_arrow([])))
    splits = _split(dataset, config, held_out)
    report = {
        "conversations": len(conversations),
        **stats,
        "dropped": len(dropped),
        "mean_length": round(stats["tokens"] / stats["examples"], 2) if stats["examples"] else 0.0,
        "cutoff_len": config.cutoff_len,
        "overlength": config.overlength,
        "tokenization": config.tokenization,
        "splits": {name: len(split) for name, split in splits.items()},
        "tokenization_mismatches": len(mismatched) if config.compare_tokenizations else None,
        "tokenization_mismatch_examples": [s.describe() for s in mismatched[:10]],
    }
    logger.info(
        "Tokenized %d conversations (%s): %d kept, %d dropped, %d truncated at cutoff_len=%d; "
        "%d tokens, %d label tokens; train %d / validation %d",
        len(conversations),
        config.tokenization,
        stats["examples"],
        len(dropped),
        stats["truncated"],
        config.cutoff_len,
        stats["tokens"],
        stats["label_tokens"],
        report["splits"]["train"],
        report["splits"].get("validation", 0),
    )
    if config.compare_tokenizations:
        logger.info(
            "%d of %d conversations tokenize differently turn by turn (LLaMA-Factory) and as whole text "
            "(apply_chat_template, inference servers)%s",
            len(mismatched),
            len(conversations),
            f", e.g. {mismatched[0].describe()}" if mismatched else "",
        )
    return splits, report, dropped


def _to_arrow(encoded) -> pa.Table:
    """Columns built straight as Arrow list arrays (several times faster than Dataset.from_dict)."""
    lengths = np.fromiter((len(e.input_ids) for e in encoded), dtype=np.int64, count=len(encoded))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), type=pa.int32())

    def column(values, dtype):
        flat = np.fromiter((x for e in encoded for x in values(e)), dtype=dtype, count=int(lengths.sum()))
        return pa.ListArray.from_arrays(offsets, pa.array(flat))

    return pa.table(
        {
            "input_ids": column(lambda e: e.input_ids, np.int32),
            "attention_mask": pa.ListArray.from_arrays(offsets, pa.array(np.ones(int(lengths.sum()), dtype=np.int8))),
            "labels": column(lambda e: e.labels, np.int32),
        }
    )


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


def _split(dataset: Dataset, config: FormatConfig, held_out: list[bool]) -> DatasetDict:
    if any(held_out):  # ingest.eval_dataset names the validation data: no random split (as LLaMA-Factory)
        if config.val_size:
            logger.warning("format.val_size=%s ignored: ingest.eval_dataset is the validation split", config.val_size)
        validation = [i for i, flag in enumerate(held_out) if flag]
        train = [i for i, flag in enumerate(held_out) if not flag]
        return DatasetDict({"train": dataset.select(train), "validation": dataset.select(validation)})
    size = config.val_size
    if not size:
        return DatasetDict({"train": dataset})
    if isinstance(size, int) and size >= len(dataset):
        raise DataError(f"format.val_size={size} leaves no training examples out of {len(dataset)}")
    # datasets' own seeded split, as LLaMA-Factory does it.
    parts = dataset.train_test_split(test_size=size, seed=config.seed)
    return DatasetDict({"train": parts["train"], "validation": parts["test"]})
