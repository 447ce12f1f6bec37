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


def problems(record: dict[str, Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """Everything wrong with one conversation row, in order, and its warnings (both empty if fine)."""
    if record.get("error"):
        return [record["error"]], []
    try:
        conversation = Conversation.from_dict(record)
    except (ValueError, TypeError, KeyError) as exc:
        return [str(exc)], []
    return conversation.problems(), conversation.warnings()


def reason_kind(reason: str) -> str:
    """A reason without its positions, so alike problems count together."""
    return _DETAIL.sub(lambda m: "line N" if m.group(0).startswith("line") else "", reason).strip()


WARNING_EXAMPLES = 5  # records named per warning kind in the report


@dataclass
class CheckResult:
    """What one chunk's check found: rejected records (with reasons), warnings and counts."""

    rejected: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, Counter] = field(default_factory=dict)  # dataset -> read / kept / rejected
    reasons: Counter = field(default_factory=Counter)  # reason kind -> records
    warnings: Counter = field(default_factory=Counter)  # warning kind -> kept records
    warning_examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # kind -> first records

    def add(self, other: CheckResult) -> CheckResult:
        self.rejected += other.rejected
        for name, counts in other.counts.items():
            self.counts.setdefault(name, Counter()).update(counts)
        self.reasons.update(other.reasons)
        self.warnings.update(other.warnings)
        for kind, examples in other.warning_examples.items():
            mine = self.warning_examples.setdefault(kind, [])
            mine += examples[: WARNING_EXAMPLES - len(mine)]
        return self


def _rejected(record: dict[str, Any], reasons: list[str]) -> dict[str, Any]:
    return {
        "dataset": record["dataset"],
        "file": record["file"],
        "index": record["index"],
        "reason": "; ".join(reasons),
        "messages": record.get("messages") or [],
    }


@dataclass(frozen=True)
class ChunkChecker:
    """Checks chunks of conversation rows: keeps the well-formed ones, rejects the rest with reasons.

    Shapes LLaMA-Factory trains on but that look like mistakes (``Conversation.warnings``) are kept
    and counted, unless their kind is in ``reject``.
    """

    reject: frozenset[str] = frozenset()

    def __call__(self, chunk: pa.Table, offset: int) -> tuple[pa.Table, CheckResult]:
        result = CheckResult()
        kept = []
        for record in chunk.to_pylist():
            counts = result.counts.setdefault(record["dataset"], Counter())
            counts["read"] += 1
            found, warnings = problems(record)
            found += [f"{detail} (validate.reject: {kind})" for kind, detail in warnings if kind in self.reject]
            if found:
                counts["rejected"] += 1
                result.reasons[reason_kind(found[0])] += 1
                result.rejected.append(_rejected(record, found))
                continue
            counts["kept"] += 1
            for kind in dict.fromkeys(kind for kind, _ in warnings):  # a record counts once per kind
                result.warnings[kind] += 1
                examples = result.warning_examples.setdefault(kind, [])
                if len(examples) < WARNING_EXAMPLES:
                    details = [detail for k, detail in warnings if k == kind]
                    examples.append(
                        {k: record[k] for k in ("dataset", "file", "index")} | {"detail": "; ".join(details)}
                    )
            kept.append(record)
        columns = {name: [r[name] for r in kept] for name in KEPT_SCHEMA.names}
        return pa.table(columns, schema=KEPT_SCHEMA), result
