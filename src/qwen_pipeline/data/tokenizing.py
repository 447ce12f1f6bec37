"""Conversations -> token ids and labels with the qwen template, a chunk at a time; the validation split.

Each chunk's conversations are rendered from its Arrow columns (``template.render``), all their
pieces tokenized in one batched call of the Rust tokenizer (``template.tokenize_pieces``), then
joined, masked and cut to ``cutoff_len`` as whole arrays (``template.assemble_many``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict

from ..control_tokens import control_token_pattern, control_tokens_in, plain_text_tokenizer, tokenize_escaped
from ..conversation import Conversation, ConversationColumns, Source
from ..errors import DataError
from ..template import (
    IGNORE_INDEX,
    EncodedBatch,
    TemplateOptions,
    assemble_many,
    conversation_ids,
    may_tokenize_differently_rows,
    render,
    tokenize_pieces,
)

SFT_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("attention_mask", pa.list_(pa.int8())),
        ("labels", pa.list_(pa.int32())),
    ]
)
MISMATCH_EXAMPLES = 10  # conversations named in the report when the two tokenizations disagree
CONTROL_TOKEN_EXAMPLES = 20  # conversations holding control-token text named in the report


@dataclass
class TokenizeResult:
    """What one chunk's tokenization counted, dropped and held out."""

    stats: Counter = field(default_factory=Counter)  # examples, truncated, tokens, label_tokens, tokens_cut
    max_length: int = 0
    dropped: list[dict[str, Any]] = field(default_factory=list)  # over cutoff_len with overlength: drop
    held_out: list[bool] = field(default_factory=list)  # per kept example: from ingest.eval_dataset
    mismatches: int = 0
    mismatch_examples: list[Source] = field(default_factory=list)
    control_tokens: int = 0  # conversations whose own text holds control-token text
    control_token_examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, other: TokenizeResult) -> TokenizeResult:
        self.stats.update(other.stats)
        self.max_length = max(self.max_length, other.max_length)
        self.dropped += other.dropped
        self.held_out += other.held_out
        self.mismatches += other.mismatches
        self.mismatch_examples += other.mismatch_examples[: MISMATCH_EXAMPLES - len(self.mismatch_examples)]
        self.control_tokens += other.control_tokens
        room = CONTROL_TOKEN_EXAMPLES - len(self.control_token_examples)
        self.control_token_examples += other.control_token_examples[:room]
        return self


@dataclass(frozen=True)
class ChunkTokenizer:
    """Tokenizes chunks of conversation rows into input_ids / attention_mask / labels rows."""

    tokenizer: Any
    options: TemplateOptions
    overlength: str = "truncate"  # or "drop": over-long conversations go to the dropped list
    compare_tokenizations: bool = False  # count conversations the other tokenization encodes differently
    control_tokens: str = "keep"  # control-token text in the data: keep (as LLaMA-Factory), reject or escape

    @cached_property
    def _control(self) -> re.Pattern:
        return control_token_pattern(self.tokenizer)

    @cached_property
    def _plain(self):
        return plain_text_tokenizer(self.tokenizer)

    def __call__(self, chunk: pa.Table, offset: int) -> tuple[pa.Table, TokenizeResult]:
        columns = ConversationColumns.from_table(chunk)
        result, keep = TokenizeResult(), np.ones(len(columns), dtype=bool)
        flagged = self._control_tokens(columns, result)
        if self.control_tokens == "reject":
            for n, found in flagged.items():
                result.dropped.append(_dropped(columns.conversation(n), "control-token text in " + "; ".join(found)))
                keep[n] = False
        pieces = render(columns, self.options.default_system)
        piece_ids = tokenize_pieces(pieces, self.tokenizer, self.options.tokenization)
        if self.control_tokens == "escape" and flagged:
            conversations = [columns.conversation(n) for n in flagged]
            escaped = iter(tokenize_escaped(conversations, self.tokenizer, self._control, self._plain))
            for p in (p for n in flagged for p in pieces.span(n)):
                piece_ids[p] = next(escaped)
        encoded = assemble_many(pieces, piece_ids, self.options)
        if self.overlength == "drop":
            for n in np.flatnonzero(encoded.truncated & keep).tolist():
                tokens = int(encoded.full_lengths[n])
                reason = f"{tokens} tokens > format.cutoff_len={self.options.cutoff_len}"
                result.dropped.append({**_dropped(columns.conversation(n), reason), "tokens": tokens})
            keep &= ~encoded.truncated
        if not keep.all():
            encoded = encoded.select(keep)
        result.held_out = _held_out(chunk)[keep].tolist()
        result.max_length = int(encoded.lengths.max(initial=0))
        result.stats.update(
            examples=len(encoded.lengths),
            truncated=int(encoded.truncated.sum()),
            tokens=len(encoded.labels),
            label_tokens=int((encoded.labels != IGNORE_INDEX).sum()),
            tokens_cut=int((encoded.full_lengths - encoded.lengths).sum()),
        )
        if self.compare_tokenizations:  # only conversations where the two can differ need a second pass
            other = "whole_text" if self.options.tokenization == "turns" else "turns"
            candidates = may_tokenize_differently_rows(columns)
            alternative = conversation_ids(pieces, candidates, self.tokenizer, other)
            differ = [n for n, b in zip(candidates, alternative) if pieces.flat(n, piece_ids) != b]
            result.mismatches = len(differ)
            result.mismatch_examples = [columns.conversation(n).source for n in differ[:MISMATCH_EXAMPLES]]
        return to_arrow(encoded), result

    def _control_tokens(self, columns: ConversationColumns, result: TokenizeResult) -> dict[int, list[str]]:
        """The conversations whose own text holds control-token text, and what (counted into ``result``)."""
        search = self._control.search
        given = (columns.systems, columns.tools)
        rows = {n for texts in given for n, text in enumerate(texts) if text and search(text)}
        rows.update(columns.rows_of([j for j, text in enumerate(columns.contents) if search(text)]))
        flagged = {n: control_tokens_in(columns.conversation(n), self._control) for n in sorted(rows)}
        result.control_tokens = len(flagged)
        for n, found in list(flagged.items())[:CONTROL_TOKEN_EXAMPLES]:
            result.control_token_examples.append({**_located(columns.conversation(n)), "found": found})
        return flagged


def _held_out(chunk: pa.Table) -> np.ndarray:
    """Per row: from ingest.eval_dataset (split "validation")."""
    if "split" not in chunk.column_names:
        return np.zeros(len(chunk), dtype=bool)
    return pc.fill_null(pc.equal(chunk.column("split"), "validation"), False).to_numpy(zero_copy_only=False)


def _located(conversation: Conversation) -> dict[str, Any]:
    source = conversation.source
    return {"dataset": source.dataset, "file": source.file, "index": source.index}


def _dropped(conversation: Conversation, reason: str) -> dict[str, Any]:
    return {**_located(conversation), "reason": reason}


def to_arrow(encoded: EncodedBatch) -> pa.Table:
    """Columns built straight as Arrow list arrays over the batch's arrays (no Python list per row)."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(encoded.lengths)]), type=pa.int32())

    def column(values: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(values))

    return pa.table(
        {
            "input_ids": column(encoded.input_ids),
            "attention_mask": column(np.ones(len(encoded.input_ids), dtype=np.int8)),
            "labels": column(encoded.labels),
        },
        schema=SFT_SCHEMA,
    )


def _row_numbers(part: Dataset) -> np.ndarray:
    """The row numbers a part of the split holds, read straight from its indices mapping (the rows are
    0..n-1). Reading them through datasets' formatting cost 0.8 s and 100 MB per 200k rows."""
    column = part._indices.column(0) if part._indices is not None else part.data.column("row")
    return column.to_numpy()


def split(dataset: Dataset, held_out: np.ndarray, val_size: float | int, seed: int) -> DatasetDict:
    """Train and validation splits as row orders over ``dataset`` (indices mappings: no row is copied).

    Rows from ``ingest.eval_dataset`` are the validation split when there are any (as in
    LLaMA-Factory); otherwise ``val_size`` rows go to it by ``datasets``' own seeded
    ``train_test_split``, as LLaMA-Factory splits.
    """
    if held_out.any():
        return DatasetDict(
            {"train": dataset.select(np.flatnonzero(~held_out)), "validation": dataset.select(np.flatnonzero(held_out))}
        )
    if not val_size:
        return DatasetDict({"train": dataset})
    if isinstance(val_size, int) and val_size >= len(dataset):
        raise DataError(f"format.val_size={val_size} leaves no training examples out of {len(dataset)}")
    # The permutation datasets would draw, computed on the row numbers alone (8 bytes a row).
    rows = Dataset.from_dict({"row": np.arange(len(dataset))}).train_test_split(test_size=val_size, seed=seed)
    train, validation = (_row_numbers(rows[name]) for name in ("train", "test"))
    return DatasetDict({"train": dataset.select(train), "validation": dataset.select(validation)})
