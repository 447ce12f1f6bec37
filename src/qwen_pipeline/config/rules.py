"""Rules that span stages, checked before any node runs (``preflight.check_run``): every block a run reads
parsed, and the rules between them (pack_length vs cutoff_len, a validation split for evaluate)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import blocks
from .blocks import TrainConfig
from .parse import ConfigError, parse_config

# Which class parses each params:<block>.
BLOCKS: dict[str, type] = {
    "model": blocks.ModelConfig,
    "ingest": blocks.IngestConfig,
    "processing": blocks.ProcessingConfig,
    "validate": blocks.ValidateConfig,
    "format": blocks.FormatConfig,
    "train": blocks.TrainConfig,
    "merge": blocks.MergeConfig,
    "evaluate": blocks.EvaluateConfig,
}


def pack_length(train: TrainConfig, cutoff_len: int) -> int:
    """Tokens per packed sequence: ``train.pack_length``, or when not set the ``cutoff_len`` the data was
    made with (the train node reads it from the tokenized dataset, not from params:format)."""
    return train.pack_length or cutoff_len


def run_problems(parameters: Mapping[str, Any], blocks: set[str], stages: set[str]) -> tuple[list[str], list[str]]:
    """Every problem of the ``blocks`` a run reads, and of the rules across its ``stages``, as
    (errors, warnings): found before any node runs."""
    found, warnings, parsed = [], [], {}
    if "model" in parameters:  # --params model.<key>=...: base_model's settings, read by the catalog
        blocks = blocks | {"model"}
    for name in sorted(blocks & set(BLOCKS)):
        try:
            parsed[name] = parse_config(BLOCKS[name], parameters.get(name), name)
        except ConfigError as exc:
            found += exc.problems
    fmt, train, ingest = parsed.get("format"), parsed.get("train"), parsed.get("ingest")
    packs = train and (train.packing or train.neat_packing) and train.pack_length is not None
    # Only when this run formats the data: otherwise train checks pack_length against the data it reads,
    # whose cutoff_len may not be params:format's.
    if fmt and packs and "format" in stages:
        if train.pack_length < fmt.cutoff_len:
            found.append(
                f"train.pack_length={train.pack_length} is below format.cutoff_len={fmt.cutoff_len}: with packing "
                "every longer example would be cut to pack_length. Raise pack_length, or leave it unset (it then "
                "follows cutoff_len)"
            )
    if fmt and ingest and not fmt.val_size and not ingest.eval_dataset:
        message = (
            "format.val_size is 0 and ingest.eval_dataset is empty: there is no validation split to evaluate on. "
            "Set format.val_size (e.g. 0.1) or ingest.eval_dataset"
        )
        if "evaluate" in stages:
            found.append(message)
        elif "format" in stages:
            warnings.append(message + " before running the evaluate pipeline")
    return found, warnings
