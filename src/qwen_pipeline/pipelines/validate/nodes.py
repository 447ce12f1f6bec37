"""Validate: keep well-formed conversations; every other record goes to rejected records with a reason.

Shapes LLaMA-Factory trains on but that look like mistakes in the data (an empty prompt, a function
call with no tool result, ...) are kept, so the default training set is LLaMA-Factory's, and counted
per kind in the report's ``warnings`` with examples; ``validate.reject`` lists kinds to reject instead.
Invariant, checked and logged: records read = kept + rejected.
"""

from __future__ import annotations

import logging
from functools import reduce
from typing import Any

from datasets import Dataset

from ...config import ProcessingConfig, ValidateConfig, parse_config
from ...data.checks import KEPT_SCHEMA, CheckResult, ChunkChecker
from ...data.fingerprint import stage_fingerprint
from ...data.streaming import map_stage
from ...datasets import StageOutput
from ...errors import DataError

logger = logging.getLogger(__name__)

WARNING_TEXT = {
    "empty_prompt": "a user or observation message is empty",
    "empty_answer": "an assistant message is empty (that turn trains only on <|im_end|>)",
    "call_without_observation": "a function call is followed by a user message, not by the tool's result",
    "observation_without_call": "a tool result (observation) follows no function call",
}


def validate_conversations(
    raw_conversations: Dataset, previous: StageOutput | None, params: dict[str, Any], processing: dict[str, Any]
) -> tuple[StageOutput, list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Split records into kept conversations and rejected records; report the counts."""
    config = parse_config(ValidateConfig, params, "validate")
    work = parse_config(ProcessingConfig, processing, "processing")
    fingerprint = stage_fingerprint("validate", config, raw_conversations._fingerprint)
    if previous is not None and previous.fingerprint == fingerprint and not work.overwrite_cache:
        logger.info("Validate: records and parameters unchanged, reusing %d conversations", len(previous.data))
        rejected, report, metrics = previous.outputs
        return previous, rejected, {**report, "reused": True}, metrics
    check = ChunkChecker(frozenset(config.reject))
    kept, results = map_stage("validate", raw_conversations, check, KEPT_SCHEMA, work)
    found = reduce(CheckResult.add, results, CheckResult())
    read, rejected = len(raw_conversations), found.rejected
    assert read == len(kept) + len(rejected)  # nothing vanishes
    report = {
        "read": read,
        "kept": len(kept),
        "rejected": len(rejected),
        "by_dataset": {name: {k: c[k] for k in ("read", "kept", "rejected")} for name, c in found.counts.items()},
        "by_reason": dict(found.reasons.most_common()),
        "reused": False,
    }
    logger.info("Validated %d records: %d kept, %d rejected", read, len(kept), len(rejected))
    for reason, count in found.reasons.most_common(5):
        logger.info("  rejected %d x %s", count, reason)
    share = len(rejected) / read if read else 0.0
    if share > config.max_rejected_share:
        top = "; ".join(f"{n} x {r}" for r, n in found.reasons.most_common(3))
        raise DataError(
            f"{len(rejected)} of {read} records rejected ({share:.0%}), more than "
            f"validate.max_rejected_share={config.max_rejected_share}. Top reasons: {top}. "
            "See the rejected_records dataset for each record."
        )
    if not len(kept):
        raise DataError(f"no valid records among {read}; see the rejected_records dataset")
    report["warnings"] = {
        kind: {"records": count, "examples": found.warning_examples[kind]} for kind, count in found.warnings.items()
    }
    for kind, count in found.warnings.most_common():
        example = found.warning_examples[kind][0]
        logger.warning(
            "%d kept conversations where %s; LLaMA-Factory trains on them too. E.g. %s record %d: %s. "
            "To reject them: validate.reject: [%s]",
            count,
            WARNING_TEXT[kind],
            example["file"],
            example["index"],
            example["detail"],
            kind,
        )
    metrics = {key: {"value": float(report[key]), "step": 0} for key in ("read", "kept", "rejected")}
    for name, counts in report["by_dataset"].items():  # e.g. validate.alpaca_demo.rejected
        metrics.update({f"{name}.{key}": {"value": float(v), "step": 0} for key, v in counts.items()})
    return StageOutput(kept, fingerprint, (rejected, report, metrics)), rejected, report, metrics
