"""Ingest: read the datasets named in ``params:ingest.dataset`` into one conversation shape.

Conversion follows LLaMA-Factory's ``dataset_info.json`` schema (``data/converters.py``), selection
and mixing its ``num_samples``, ``max_samples`` and ``mix_strategy`` (``data/mixing.py``). Nothing is
judged or dropped here: a record that cannot be converted keeps an ``error`` saying why, and validate
rejects it. What mixing leaves out or repeats is counted in the ingest report.
"""

from __future__ import annotations

import logging
from functools import reduce
from typing import Any

from datasets import Dataset, concatenate_datasets

from ...config import IngestConfig, ProcessingConfig, parse_config
from ...conversation import CONVERSATION_SCHEMA
from ...data.converters import (
    DEFAULT_COLUMNS,
    FORMATTING_COLUMNS,
    FORMATTINGS,
    REQUIRED_COLUMNS,
    ChunkConverter,
    ConvertResult,
    columns_and_tags,
    ignorable_fields,
)
from ...data.fingerprint import stage_fingerprint
from ...data.mixing import mix, selected_rows
from ...data.streaming import Staging, map_stage
from ...datasets import RawDatasets, StageOutput
from ...datasets.stage import reuse
from ...errors import DataError

logger = logging.getLogger(__name__)


def ingest_datasets(
    raw: RawDatasets, previous: StageOutput | None, params: dict[str, Any], processing: dict[str, Any]
) -> tuple[StageOutput, dict[str, Any]]:
    """Every selected record, converted to a conversation row (or an error), and an ingest report."""
    config = parse_config(IngestConfig, params, "ingest")
    work = parse_config(ProcessingConfig, processing, "processing")
    unknown = [name for name in (*config.dataset, *config.eval_dataset) if name not in raw.info]
    if unknown:
        raise DataError(
            f"{raw.info_path}: no dataset named {', '.join(map(repr, unknown))}; "
            f"it defines {', '.join(map(repr, raw.info))}"
        )
    names = [*config.dataset, *config.eval_dataset]
    key = stage_fingerprint("ingest", config, [(n, raw.fingerprint(n)) for n in names])
    if last := reuse(previous, key, work.overwrite_cache):
        logger.info("Ingest: datasets and parameters unchanged, reusing %d records", len(last.data))
        return last, {**last.outputs["report"], "reused": True}
    report: dict[str, Any] = {"datasets": {}, "mix_strategy": config.mix_strategy, "reused": False}
    staging = Staging("ingest")
    train = [_read_dataset(raw, name, config, work, report, staging) for name in config.dataset]
    mixed, in_mix = mix(train, config.mix_strategy, config.interleave_probs, config.seed)
    for name, count in zip(config.dataset, in_mix):
        report["datasets"][name]["in_mix"] = count
    if config.mix_strategy != "concat":
        logger.info(
            "Mixed with %s: %s",
            config.mix_strategy,
            ", ".join(f"{n} {d['in_mix']} of {d['selected']}" for n, d in report["datasets"].items()),
        )
    held_out = [
        _read_dataset(raw, name, config, work, report, staging, split="validation") for name in config.eval_dataset
    ]
    for name, part in zip(config.eval_dataset, held_out):  # held out whole for evaluation: not mixed in
        report["datasets"][name]["eval"] = len(part)
    records = concatenate_datasets([mixed, *held_out]) if held_out else mixed
    report["records"] = len(records)
    _same_files(report)
    return StageOutput(records, key, {"report": report}, staging=staging), report


def _read_dataset(
    raw: RawDatasets,
    name: str,
    config: IngestConfig,
    work: ProcessingConfig,
    report: dict[str, Any],
    staging: Staging,
    split: str | None = None,
) -> Dataset:
    """One dataset's selected records as conversation rows (or errors); its counts go into ``report``."""
    info = raw.info[name]
    where = f"{raw.info_path}, dataset {name!r}"
    formatting = info.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{where}: formatting {formatting!r} is not one of {', '.join(FORMATTINGS)}")
    columns, tags = columns_and_tags(info)
    needed = ("response",) if formatting == "alpaca" else ("messages",)
    if missing := [k for k in needed if not columns.get(k)]:
        raise DataError(f"{where}: 'columns' maps no {', '.join(map(repr, missing))} column")
    table = raw.read(name)
    rows = selected_rows(len(table.data), info.get("num_samples"), config.max_samples, config.seed, where)
    source = table.data if rows is None else table.data.select(rows)
    convert = ChunkConverter(
        dataset=name,
        formatting=formatting,
        columns=columns,
        tags=tags,
        files=table.files,
        kind=table.kind,
        rows=rows,
        split=split,
        openai_thinking_suffix=config.openai_thinking_suffix,
    )
    converted, results = map_stage(source, convert, CONVERSATION_SCHEMA, work, staging)
    found = reduce(ConvertResult.add, results, ConvertResult())
    _check_mapped_columns(where, formatting, columns if "columns" in info else {}, found, table)
    for key in ignorable_fields(formatting, columns):
        if not (count := found.ignored[key]):
            continue
        logger.warning(
            "%s: %d records have a %r field, but dataset_info.json maps no %r column, so it is ignored "
            '(LLaMA-Factory ignores it too). Add "%s": "%s" to "columns" to use it.',
            where, count, key, key, key, key,
        )  # fmt: skip
    report["datasets"][name] = {
        "read": len(table.data),
        "selected": len(converted),
        "formatting": formatting,
        "files": [file for _, file in table.files],
        "skipped_files": list(table.skipped),
        "numbers_as_text": found.numbers_as_text,
    }
    logger.info("Read %d %s records of dataset %r, %d selected", len(table.data), formatting, name, len(converted))
    if table.skipped:
        logger.info("%s: skipped hidden files %s", where, ", ".join(table.skipped))
    if found.numbers_as_text:
        logger.info("%s: %d numbers or booleans in text columns read as text", where, found.numbers_as_text)
    return converted


def _check_mapped_columns(where: str, formatting: str, mapped: dict, found: ConvertResult, table) -> None:
    """A column that no record has is a mistake in dataset_info.json: an error for the columns a
    conversation needs (mapped or LLaMA-Factory's defaults), a warning for others the entry maps."""
    files = ", ".join(file for _, file in table.files)
    has = ", ".join(sorted(found.keys)) or "no fields"
    defaults = {key: DEFAULT_COLUMNS[key] for key in REQUIRED_COLUMNS[formatting]}
    for key, column in (mapped or defaults).items():
        if not column or found.keys[column] or key not in FORMATTING_COLUMNS[formatting]:
            continue
        message = f"{where}: 'columns' maps {key} to {column!r}, but no record of {files} has it (records have: {has})"
        if key in REQUIRED_COLUMNS[formatting]:
            raise DataError(message)
        logger.warning("%s", message)


def _same_files(report: dict[str, Any]) -> None:
    """Two datasets reading one file train on its records twice: say so."""
    readers: dict[str, list[str]] = {}
    for name, entry in report["datasets"].items():
        for file in entry["files"]:
            readers.setdefault(file, []).append(name)
    shared = {file: names for file, names in readers.items() if len(names) > 1}
    for file, names in shared.items():
        logger.warning("%s is read by datasets %s: its records are used %d times", file, ", ".join(names), len(names))
    report["shared_files"] = shared
