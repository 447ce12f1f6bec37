"""Validation: which conversations are well formed, and why the others are not."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ..conversation import CONVERSATION_SCHEMA, Conversation

# What validate keeps: a conversation without ingest's error column.
KEPT_SCHEMA = pa.schema([f for f in CONVERSATION_SCHEMA if f.name != "error"])
_DETAIL = re.compile(r"^(message|item) \d+: |line \d+|\(\d+\)")


def problems(record: dict[str, Any]) -> list[str]:
    """Everything wrong with one conversation row, in order (empty if fine)."""
    if record.get("error"):
        return [record["error"]]
    try:
        conversation = Conversation.from_dict(record)
    except (ValueError, TypeError, KeyError) as exc:
        return [str(exc)]
    return conversation.problems()


def reason_kind(reason: str) -> str:
    """A reason without its positions, so alike problems count together."""
    return _DETAIL.sub(lambda m: "line N" if m.group(0).startswith("line") else "", reason).strip()


@dataclass
class CheckResult:
    """What one chunk's check found: rejected records (with reasons) and counts."""

    rejected: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, Counter] = field(default_factory=dict)  # dataset -> read / kept / rejected
    reasons: Counter = field(default_factory=Counter)  # reason kind -> records
    empty_answers: int = 0  # empty answers in kept conversations

    def add(self, other: CheckResult) -> CheckResult:
        self.rejected += other.rejected
        for name, counts in other.counts.items():
            self.counts.setdefault(name, Counter()).update(counts)
        self.reasons.update(other.reasons)
        self.empty_answers += other.empty_answers
        return self


def check_chunk(chunk: pa.Table, offset: int) -> tuple[pa.Table, CheckResult]:
    """The well-formed rows of a chunk of conversation rows, and what was rejected and why."""
    result = CheckResult()
    kept = []
    for record in chunk.to_pylist():
        counts = result.counts.setdefault(record["dataset"], Counter())
        counts["read"] += 1
        if found := problems(record):
            counts["rejected"] += 1
            result.reasons[reason_kind(found[0])] += 1
            result.rejected.append(
                {
                    "dataset": record["dataset"],
                    "file": record["file"],
                    "index": record["index"],
                    "reason": "; ".join(found),
                    "messages": record.get("messages") or [],
                }
            )
            continue
        counts["kept"] += 1
        result.empty_answers += sum(m["role"] == "assistant" and not m["content"].strip() for m in record["messages"])
        kept.append(record)
    columns = {name: [r[name] for r in kept] for name in KEPT_SCHEMA.names}
    return pa.table(columns, schema=KEPT_SCHEMA), result
