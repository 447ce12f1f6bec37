"""A parameters block into its dataclass: ``parse_config`` checks every key (unknown names, with "did you
mean", wrong types, values out of range) and raises one ``ConfigError`` listing all problems, each naming its key."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

from ..errors import QwenPipelineError

T = TypeVar("T")


class ConfigError(QwenPipelineError, ValueError):
    """One or more configuration problems, each naming its key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:  # one line
            super().__init__(f"invalid configuration: {problems[0]}")
        else:
            super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin in (list, tuple):
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if dataclasses.is_dataclass(hint):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def parse_config(cls: type[T], data: Mapping[str, Any] | None, section: str) -> T:
    """Build ``cls`` from a parameters block, collecting every problem before raising."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    problems = []
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{section}.{key}: unknown parameter{hint}")
    nested = {}  # a block inside the block (e.g. train.generation_eval), parsed the same way
    for key in names:
        if key in data and dataclasses.is_dataclass(hints[key]) and isinstance(data[key], Mapping):
            try:
                nested[key] = parse_config(hints[key], data[key], f"{section}.{key}")
            except ConfigError as error:
                problems += error.problems
        elif key in data and not _matches(data[key], hints[key]):
            problems.append(f"{section}.{key}: expected {_describe(hints[key])}, got {data[key]!r}")
    if problems:
        raise ConfigError(problems)
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()} | nested
    config = cls(**kwargs)
    check = getattr(config, "problems", None)
    if check is not None and (found := check()):
        raise ConfigError([f"{section}.{p}" for p in found])
    return config
