"""Validate: keep well-formed conversations; every other record goes to rejected records with a reason.

Invariant, checked and logged: records read = kept + rejected.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any

from ...config import ValidateConfig, parse_config
from ...conversation import Conversation
from ...errors import DataError

logger = logging.getLogger(__name__)

KEPT_KEYS = ("dataset", "file", "index", "system", "tools", "messages", "split")  # split: eval_dataset records
_DETAIL = re.compile(r"^(message|item) \d+: |line \d+|\(\d+\)")


def _problems(record: dict[str, Any]) -> list[str]:
    if record.get("error"):
        return [record["error"]]
    try:
        conversation = Conversation.from_dict(record)
    except (ValueError, TypeError, KeyError) as exc:
        return [str(exc)]
    return conversation.problems()


def _reason_kind(reason: str) -> str:
    """A reason without its positions, so alike problems count together."""
    return _DETAIL.sub(lambda m: "line N" if m.group(0).startswith("line") else "", reason).strip()


def validate_conversations(
    raw_conversations: list[dict[str, Any]], params: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Split records into kept conversations and rejected records; report the counts."""
    config = parse_config(ValidateConfig, params, "validate")
    kept, rejected = [], []
    per_dataset: dict[str, Counter] = {}
    reasons: Counter = Counter()
    for record in raw_conversations:
        counts = per_dataset.setdefault(record["dataset"], Counter())
        counts["read"] += 1
        problems = _problems(record)
        if problems:
            counts["rejected"] += 1
            reasons.update(_reason_kind(p) for p in problems[:1])
            rejected.append(
                {
                    "dataset": record["dataset"],
                    "file": record["file"],
                    "index": record["index"],
                    "reason": "; ".join(problems),
                    "messages": record.get("messages", []),
                }
            )
            logger.debug("Rejected %s record %s: %s", record["file"], record["index"], problems)
        else:
            counts["kept"] += 1
            kept.append({key: record[key] for key in KEPT_KEYS if key in record})  # shares the message lists
    read = len(raw_conversations)
    assert read == len(kept) + len(rejected)  # nothing vanishes
    report = {
        "read": read,
        "kept": len(kept),
        "rejected": len(rejected),
        "by_dataset": {name: {k: c[k] for k in ("read", "kept", "rejected")} for name, c in per_dataset.items()},
        "by_reason": dict(reasons.most_common()),
    }
    logger.info("Validated %d records: %d kept, %d rejected", read, len(kept), len(rejected))
    for reason, count in reasons.most_common(5):
        logger.info("  rejected %d x %s", count, reason)
    share = len(rejected) / read if read else 0.0
    if share > config.max_rejected_share:
        top = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3))
        raise DataError(
            f"{len(rejected)} of {read} records rejected ({share:.0%}), more than "
            f"validate.max_rejected_share={config.max_rejected_share}. Top reasons: {top}. "
            "See the rejected_records dataset for each record."
        )
    if not kept:
        raise DataError(f"no valid records among {read}; see the rejected_records dataset")
    empty_answers = sum(1 for r in kept for m in r["messages"] if m["role"] == "assistant" and not m["content"].strip())
    report["empty_answers"] = empty_answers
    if empty_answers:
        logger.warning(
            "%d kept conversations have an empty answer: they train only on <|im_end|> (LLaMA-Factory keeps them "
            "too). Remove them from the data if that is not intended.",
            empty_answers,
        )
    metrics = {key: {"value": float(report[key]), "step": 0} for key in ("read", "kept", "rejected")}
    for name, counts in report["by_dataset"].items():  # e.g. validate.alpaca_demo.rejected
        metrics.update({f"{name}.{key}": {"value": float(v), "step": 0} for key, v in counts.items()})
    return kept, rejected, report, metrics
