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

from ...config import ProcessingConfig, ValidateConfig, parse_config
from ...data.fingerprint import stage_fingerprint
from ...data.streaming import Staging, map_stage
from ...data.validation import KEPT_SCHEMA, CheckResult, ChunkChecker
from ...datasets import StageOutput
from ...datasets.stage import reuse
from ...errors import DataError

logger = logging.getLogger(__name__)

EXAMPLES = 5  # rejected records named in the report and in the error that stops a run
WARNING_TEXT = {
    "empty_prompt": "a user or observation message is empty",
    "empty_answer": "an assistant message is empty (that turn trains only on <|im_end|>)",
    "call_without_observation": "a function call is followed by a user message, not by the tool's result",
    "observation_without_call": "a tool result (observation) follows no function call",
}


def validate_conversations(
    raw_conversations: StageOutput, previous: StageOutput | None, params: dict[str, Any], processing: dict[str, Any]
) -> tuple[StageOutput, list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Split records into kept conversations and rejected records; report the counts."""
    config = parse_config(ValidateConfig, params, "validate")
    work = parse_config(ProcessingConfig, processing, "processing")
    fingerprint = stage_fingerprint("validate", config, raw_conversations.fingerprint)
    if last := reuse(previous, fingerprint, work.overwrite_cache):
        logger.info("Validate: records and parameters unchanged, reusing %d conversations", len(last.data))
        report = {**last.outputs["report"], "reused": True}
        return last, last.outputs["rejected"], report, last.outputs["metrics"]
    check = ChunkChecker(frozenset(config.reject))
    staging = Staging("validate")
    kept, results = map_stage(raw_conversations.data, check, KEPT_SCHEMA, work, staging)
    found = reduce(CheckResult.add, results, CheckResult())
    read, rejected = len(raw_conversations.data), found.rejected
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
    report["rejected_examples"] = [{k: r[k] for k in ("dataset", "file", "index")} for r in rejected[:EXAMPLES]]
    # Whether the run goes on (accept_conversations): written first, so a stopped run's report says so.
    report["accepted"] = bool(len(kept)) and len(rejected) <= config.max_rejected_share * read
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
    outputs = {"rejected": rejected, "report": report, "metrics": metrics}
    return StageOutput(kept, fingerprint, outputs, staging=staging), rejected, report, metrics


def accept_conversations(validated: StageOutput, params: dict[str, Any]) -> StageOutput:
    """The validated conversations, unless too many records were rejected: then the run stops here,
    after the rejected records and the validation report of this run were written."""
    config = parse_config(ValidateConfig, params, "validate")
    report = validated.outputs["report"]
    if report["accepted"]:
        return validated
    read, rejected = report["read"], report["rejected"]
    share = rejected / read if read else 0.0
    examples = _describe(report["rejected_examples"])
    if share > config.max_rejected_share:
        top = "; ".join(f"{n} x {r}" for r, n in list(report["by_reason"].items())[:3])
        raise DataError(
            f"{rejected} of {read} records rejected ({share:.0%}), more than "
            f"validate.max_rejected_share={config.max_rejected_share}. Top reasons: {top}. "
            f"First rejected: {examples}. Every record and its reason: the rejected_records dataset "
            "(data/08_reporting/rejected_records.json), counts in the validation report."
        )
    raise DataError(
        f"no valid records among {read} (first rejected: {examples}); "
        "see the rejected_records dataset (data/08_reporting/rejected_records.json)"
    )


def _describe(examples: list[dict[str, Any]]) -> str:
    """Records named by dataset: "dataset 'a' (a.json record 1, a.json record 3); dataset 'b' (...)"."""
    grouped: dict[str, list[str]] = {}
    for example in examples:
        grouped.setdefault(example["dataset"], []).append(f"{example['file']} record {example['index']}")
    return "; ".join(f"dataset {name!r} ({', '.join(records)})" for name, records in grouped.items())
