"""Format: conversations -> tokenized SFT examples (input_ids, attention_mask, labels) with the qwen template.

A rerun whose conversations, format parameters, tokenizer and code are unchanged hands back the
last run's tokenized dataset (``sft_dataset_previous``) instead of tokenizing again.
"""

from __future__ import annotations

import logging
from functools import reduce
from typing import Any

import numpy as np
from datasets import DatasetDict

from ...config import FormatConfig, ProcessingConfig, parse_config
from ...data.fingerprint import stage_fingerprint
from ...data.streaming import Staging, map_stage
from ...data.tokenizing import SFT_SCHEMA, ChunkTokenizer, TokenizeResult, split
from ...datasets import BaseModel, StageOutput
from ...datasets.stage import reuse
from ...template import TemplateOptions

logger = logging.getLogger(__name__)

# The params:format keys that decide what the tokenized data is: stored with it as its settings.
DATA_SETTINGS = (
    "template",
    "cutoff_len",
    "train_on_prompt",
    "mask_history",
    "tokenization",
    "overlength",
    "control_tokens",
)
CONTROL_TOKEN_ACTIONS = {
    "keep": "they become real control tokens, as in LLaMA-Factory (a typed <|im_end|> ends the turn for the "
    "model); 'escape' tokenizes them as plain text, 'reject' drops those conversations",
    "reject": "those conversations are dropped (listed in dropped_records)",
    "escape": "tokenized as plain text; no control token comes from the data's own text",
}


def tokenize_conversations(
    conversations: StageOutput,
    previous: StageOutput | None,
    base_model: BaseModel,
    params: dict[str, Any],
    processing: dict[str, Any],
) -> tuple[StageOutput, dict[str, Any], list[dict[str, Any]]]:
    """Apply the template to every conversation, drop or cut over-long ones, split off validation."""
    config = parse_config(FormatConfig, params, "format")
    work = parse_config(ProcessingConfig, processing, "processing")
    fingerprint = stage_fingerprint("format", config, conversations.fingerprint, base_model.tokenizer_fingerprint())
    # no settings: stored by a version that did not record them; made again so train can read them
    if (last := reuse(previous, fingerprint, work.overwrite_cache)) and last.settings:
        logger.info("Format: conversations, parameters and tokenizer unchanged, reusing the tokenized dataset")
        return last, {**last.outputs["report"], "reused": True}, last.outputs["dropped"]
    tokenizer = base_model.load_tokenizer()
    options = TemplateOptions(
        cutoff_len=config.cutoff_len,
        train_on_prompt=config.train_on_prompt,
        mask_history=config.mask_history,
        tokenization=config.tokenization,
    )
    encode = ChunkTokenizer(tokenizer, options, config.overlength, config.compare_tokenizations, config.control_tokens)
    staging = Staging("format")
    examples, results = map_stage(conversations.data, encode, SFT_SCHEMA, work, staging)
    found = reduce(TokenizeResult.add, results, TokenizeResult())
    assert found.stats["examples"] + len(found.dropped) == len(conversations.data)  # nothing vanishes
    held_out = np.array(found.held_out, dtype=bool)
    if held_out.any() and config.val_size:
        logger.warning("format.val_size=%s ignored: ingest.eval_dataset is the validation split", config.val_size)
    splits = split(examples, held_out, config.val_size, config.seed)
    report = _report(len(conversations.data), found, config, splits)
    report["fingerprint"] = fingerprint
    outputs = {"report": report, "dropped": found.dropped}
    output = StageOutput(splits, fingerprint, outputs, settings=data_settings(config), staging=staging)
    return output, {**report, "reused": False}, found.dropped


def data_settings(config: FormatConfig) -> dict[str, Any]:
    """What the tokenized data was made with, stored with it: train reads its cutoff_len and template from
    the data, not from this run's params:format (which may have changed since)."""
    return {name: getattr(config, name) for name in DATA_SETTINGS}


def _report(conversations: int, found: TokenizeResult, config: FormatConfig, splits: DatasetDict) -> dict[str, Any]:
    stats = found.stats
    report = {
        "conversations": conversations,
        **{k: stats[k] for k in ("examples", "truncated", "tokens", "label_tokens", "tokens_cut")},
        "max_length": found.max_length,
        "dropped": len(found.dropped),
        "mean_length": round(stats["tokens"] / stats["examples"], 2) if stats["examples"] else 0.0,
        "cutoff_len": config.cutoff_len,
        "overlength": config.overlength,
        "tokenization": config.tokenization,
        "splits": {name: len(part) for name, part in splits.items()},
        "tokenization_mismatches": found.mismatches if config.compare_tokenizations else None,
        "tokenization_mismatch_examples": [s.describe() for s in found.mismatch_examples],
        "control_tokens": {
            "mode": config.control_tokens,
            "conversations": found.control_tokens,
            "examples": found.control_token_examples,
        },
    }
    logger.info(
        "Tokenized %d conversations (%s): %d kept, %d dropped, %d truncated at cutoff_len=%d; "
        "%d tokens, %d label tokens; train %d / validation %d",
        conversations,
        config.tokenization,
        stats["examples"],
        len(found.dropped),
        stats["truncated"],
        config.cutoff_len,
        stats["tokens"],
        stats["label_tokens"],
        report["splits"]["train"],
        report["splits"].get("validation", 0),
    )
    if found.control_tokens:
        example = found.control_token_examples[0]
        logger.warning(
            "%d conversations hold text the tokenizer reads as control tokens, e.g. %s record %d, %s. "
            "format.control_tokens=%s: %s",
            found.control_tokens,
            example["file"],
            example["index"],
            "; ".join(example["found"]),
            config.control_tokens,
            CONTROL_TOKEN_ACTIONS[config.control_tokens],
        )
    if config.compare_tokenizations:
        logger.info(
            "%d of %d conversations tokenize differently turn by turn (LLaMA-Factory) and as whole text "
            "(apply_chat_template, inference servers)%s",
            found.mismatches,
            conversations,
            f", e.g. {found.mismatch_examples[0].describe()}" if found.mismatch_examples else "",
        )
    return report
