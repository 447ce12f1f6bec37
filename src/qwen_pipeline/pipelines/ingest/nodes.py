"""Ingest: read the datasets named in ``params:ingest.dataset`` into one conversation shape.

Conversion follows LLaMA-Factory's ``dataset_info.json`` schema (``data/converters.py``), selection
and mixing its ``num_samples``, ``max_samples`` and ``mix_strategy`` (``data/mixing.py``). Nothing is
judged or dropped here: a record that cannot be converted keeps an ``error`` saying why, and validate
rejects it. What mixing leaves out or repeats is counted in the ingest report.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from datasets import Dataset, concatenate_datasets

from ...config import IngestConfig, ProcessingConfig, parse_config
from ...conversation import CONVERSATION_SCHEMA
from ...data.converters import FORMATTINGS, ChunkConverter, columns_and_tags, ignorable_fields
from ...data.fingerprint import stage_fingerprint
from ...data.mixing import mix, selected_rows
from ...data.streaming import map_stage
from ...datasets import RawDatasets, StageOutput
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
    if previous is not None and previous.fingerprint == key and not work.overwrite_cache:
        logger.info("Ingest: datasets and parameters unchanged, reusing %d records", len(previous.data))
        (report,) = previous.outputs
        return previous, {**report, "reused": True}
    report: dict[str, Any] = {"datasets": {}, "mix_strategy": config.mix_strategy, "reused": False}
    train = [_read_dataset(raw, name, config, work, report) for name in config.dataset]
    mixed, in_mix = mix(train, config.mix_strategy, config.interleave_probs, config.seed)
    for name, count in zip(config.dataset, in_mix):
        report["datasets"][name]["in_mix"] = count
    if config.mix_strategy != "concat":
        logger.info(
            "Mixed with %s: %s",
            config.mix_strategy,
            ", ".join(f"{n} {d['in_mix']} of {d['selected']}" for n, d in report["datasets"].items()),
        )
    held_out = [_read_dataset(raw, name, config, work, report, split="validation") for name in config.eval_dataset]
    for name, part in zip(config.eval_dataset, held_out):  # held out whole for evaluation: not mixed in
        report["datasets"][name]["eval"] = len(part)
    records = concatenate_datasets([mixed, *held_out]) if held_out else mixed
    report["records"] = len(records)
    return StageOutput(records, key, (report,)), report


def _read_dataset(
    raw: RawDatasets,
    name: str,
    config: IngestConfig,
    work: ProcessingConfig,
    report: dict[str, Any],
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
    converted, ignored = map_stage("ingest", source, convert, CONVERSATION_SCHEMA, work)
    ignored_counts = sum(ignored, start=Counter())
    for key in ignorable_fields(formatting, columns):
        if not (count := ignored_counts[key]):
            continue
        logger.warning(
            "%s: %d records have a %r field, but dataset_info.json maps no %r column, so it is ignored "
            '(LLaMA-Factory ignores it too). Add "%s": "%s" to "columns" to use it.',
            where, count, key, key, key, key,
        )  # fmt: skip
    report["datasets"][name] = {"read": len(table.data), "selected": len(converted), "formatting": formatting}
    logger.info("Read %d %s records of dataset %r, %d selected", len(table.data), formatting, name, len(converted))
    return converted
