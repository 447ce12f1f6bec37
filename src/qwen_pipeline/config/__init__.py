"""Typed configuration: each ``params:<section>`` block becomes a frozen dataclass (``blocks``), parsed with
every problem named at once (``parse``); the rules that span stages are checked before any node runs (``rules``)."""

from . import blocks
from .blocks import *  # noqa: F403 - the dataclasses, one per parameters block
from .parse import ConfigError, parse_config
from .rules import BLOCKS, pack_length, run_problems

__all__ = [*blocks.__all__, "BLOCKS", "ConfigError", "pack_length", "parse_config", "run_problems"]
