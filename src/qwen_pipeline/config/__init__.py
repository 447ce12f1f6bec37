"""Typed configuration: each ``params:<section>`` block becomes a frozen dataclass (``blocks``), parsed with
every problem named at once (``parse``); the rules that span stages are checked before any node runs (``rules``)."""

from .blocks import (
    EvaluateConfig,
    FormatConfig,
    IngestConfig,
    MergeConfig,
    ModelConfig,
    ProcessingConfig,
    TrainConfig,
    ValidateConfig,
)
from .parse import ConfigError, parse_config
from .rules import BLOCKS, pack_length, run_problems

__all__ = [
    "BLOCKS",
    "ConfigError",
    "EvaluateConfig",
    "FormatConfig",
    "IngestConfig",
    "MergeConfig",
    "ModelConfig",
    "ProcessingConfig",
    "TrainConfig",
    "ValidateConfig",
    "pack_length",
    "parse_config",
    "run_problems",
]
