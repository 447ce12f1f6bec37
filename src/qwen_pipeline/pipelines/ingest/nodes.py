"""Ingest: read the datasets named in ``params:ingest.dataset`` into one conversation shape.

Conversion follows LLaMA-Factory's ``dataset_info.json`` schema (alpaca, sharegpt and openai,
``columns`` and ``tags`` with its defaults, ``num_samples``, ``max_samples``, ``mix_strategy``).
Nothing is judged or dropped here: a record that cannot be converted keeps an ``error`` saying
why, and validate rejects it. What mixing leaves out or repeats is counted in the ingest report.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import numpy as np

from ...config import IngestConfig, parse_config
from ...datasets import RawDatasets, RawRecord
from ...errors import DataError

logger = logging.getLogger(__name__)

# LLaMA-Factory's defaults. When an entry gives "columns" (or "tags"), keys it leaves out
# become None rather than these defaults, as in LLaMA-Factory.
DEFAULT_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "messages": "conversations"}
DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools")
FORMATTINGS = ("alpaca", "sharegpt", "openai")


def ingest_datasets(raw: RawDatasets, params: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every selected record, converted to a conversation dict (or an error), and an ingest report."""
    config = parse_config(IngestConfig, params, "ingest")
    unknown = [name for name in (*config.dataset, *config.eval_dataset) if name not in raw.info]
    if unknown:
        raise DataError(
            f"{raw.info_path}: no dataset named {', '.join(map(repr, unknown))}; "
            f"it defines {', '.join(map(repr, raw.info))}"
        )
    report = {"datasets": {}, "mix_strategy": config.mix_strategy}
    per_dataset = [_read_dataset(raw, name, config, report) for name in config.dataset]
    records = _mix(per_dataset, config)
    for name, count in Counter(r["dataset"] for r in records).items():
        report["datasets"][name]["in_mix"] = count
    if config.mix_strategy != "concat":
        logger.info(
            "Mixed with %s: %s",
            config.mix_strategy,
            ", ".join(f"{n} {d['in_mix']} of {d['selected']}" for n, d in report["datasets"].items()),
        )
    for name in config.eval_dataset:  # held out whole for evaluation: not mixed into the training data
        held_out = [{**r, "split": "validation"} for r in _read_dataset(raw, name, config, report)]
        report["datasets"][name]["eval"] = len(held_out)
        records += held_out
    report["records"] = len(records)
    return records, report


def _read_dataset(raw: RawDatasets, name: str, config: IngestConfig, report: dict[str, Any]) -> list[dict[str, Any]]:
    """One dataset's selected records as conversation dicts (or errors); its counts go into ``report``."""
    info = raw.info[name]
    where = f"{raw.info_path}, dataset {name!r}"
    formatting = info.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{where}: formatting {formatting!r} is not one of {', '.join(FORMATTINGS)}")
    columns = {k: info["columns"].get(k) for k in COLUMN_KEYS} if "columns" in info else DEFAULT_COLUMNS
    tags = {k: info["tags"].get(k) for k in DEFAULT_TAGS} if "tags" in info else DEFAULT_TAGS
    needed = ("response",) if formatting == "alpaca" else ("messages",)
    missing = [k for k in needed if not columns.get(k)]
    if missing:
        raise DataError(f"{where}: 'columns' maps no {', '.join(map(repr, missing))} column")
    rows = raw.read(name)
    read = len(rows)
    rows = _sample(rows, info.get("num_samples"), config.seed, where)
    if config.max_samples is not None:
        rows = rows[: config.max_samples]
    convert = {"alpaca": _convert_alpaca, "sharegpt": _convert_sharegpt, "openai": _convert_openai}[formatting]
    converted = [_base(name, row) | convert(row, columns, tags) for row in rows]
    if formatting == "openai" and config.openai_thinking_suffix:
        converted = [_thinking_suffix(r) for r in converted]
    _warn_ignored_fields(where, rows, columns, formatting)
    report["datasets"][name] = {"read": read, "selected": len(converted), "formatting": formatting}
    logger.info("Read %d %s records of dataset %r, %d selected", read, formatting, name, len(converted))
    return converted


def _thinking_suffix(record: dict[str, Any]) -> dict[str, Any]:
    """What LLaMA-Factory 0.9.5's openai converter does to the system prompt (reproduced on request)."""
    if record.get("error"):
        return record
    system, tools = record.get("system") or "", record.get("tools") or ""
    if not tools:
        if not system:
            system = "detailed thinking off"
        elif "detailed thinking on" not in system and "detailed thinking off" not in system:
            system += "\ndetailed thinking off"
    elif system:
        system += "\n"
    return {**record, "system": system or None}


def _sample(rows: list[RawRecord], num_samples: int | None, seed: int, where: str) -> list[RawRecord]:
    """LLaMA-Factory's num_samples: every record once in random order, then random repeats if more."""
    if num_samples is None:
        return rows
    if not isinstance(num_samples, int) or num_samples < 1:
        raise DataError(f"{where}: num_samples must be a positive integer, got {num_samples!r}")
    rng = np.random.default_rng(seed)
    indexes = rng.permutation(len(rows))[:num_samples]
    if num_samples > len(rows):
        indexes = np.concatenate([indexes, rng.choice(len(rows), num_samples - len(rows))])
    return [rows[i] for i in indexes]


def _mix(per_dataset: list[list[dict[str, Any]]], config: IngestConfig) -> list[dict[str, Any]]:
    """Concatenate, or interleave exactly as ``datasets.interleave_datasets`` (what LLaMA-Factory calls)."""
    if config.mix_strategy == "concat" or len(per_dataset) == 1:
        return [r for records in per_dataset for r in records]
    from datasets import Dataset, interleave_datasets

    # Interleave (source, index) pairs with the library, then pick the records.
    pairs = [
        Dataset.from_dict({"s": [s] * len(records), "i": list(range(len(records)))})
        for s, records in enumerate(per_dataset)
    ]
    stopping = "first_exhausted" if config.mix_strategy == "interleave_under" else "all_exhausted"
    mixed = interleave_datasets(
        pairs, probabilities=config.interleave_probs, seed=config.seed, stopping_strategy=stopping
    )
    return [per_dataset[s][i] for s, i in zip(mixed["s"], mixed["i"])]


def _warn_ignored_fields(where: str, rows: list[RawRecord], columns: dict, formatting: str) -> None:
    """Warn where LLaMA-Factory would silently ignore data: fields present but not mapped."""
    candidates = ("system", "tools", "history") if formatting == "alpaca" else ("system", "tools")
    for key in candidates:
        if columns.get(key):
            continue
        present = sum(1 for r in rows if isinstance(r.data, dict) and r.data.get(key) not in (None, "", []))
        if present:
            logger.warning(
                "%s: %d records have a %r field, but dataset_info.json maps no %r column, so it is ignored "
                '(LLaMA-Factory ignores it too). Add "%s": "%s" to "columns" to use it.',
                where,
                present,
                key,
                key,
                key,
                key,
            )


def _base(dataset: str, row: RawRecord) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "file": row.file,
        "index": row.index,
        "system": None,
        "tools": None,
        "messages": [],
        "error": row.error,
    }


def _field(record: Any, column: str | None) -> Any:
    return record.get(column) if column else None


def _check_object(row: RawRecord) -> dict[str, Any] | None:
    if row.error:
        return {}
    if not isinstance(row.data, dict):
        return {"error": f"expected a JSON object, got {type(row.data).__name__}"}
    return None


def _convert_alpaca(row: RawRecord, columns: dict, tags: dict) -> dict[str, Any]:
    if (bad := _check_object(row)) is not None:
        return bad
    record = row.data
    messages: list[dict[str, str]] = []
    history = _field(record, columns.get("history"))
    if history is not None:
        if not isinstance(history, list):
            return {"error": f"column {columns['history']!r}: expected a list of [prompt, answer] pairs"}
        for n, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                return {"error": f"column {columns['history']!r}, item {n}: not a [prompt, answer] pair of strings"}
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    parts = []
    for key in ("prompt", "query"):
        column = columns.get(key)
        value = _field(record, column)
        if value is not None and not isinstance(value, str):
            return {"error": f"column {column!r}: expected a string, got {type(value).__name__}"}
        if value:
            parts.append(value)
    response_column = columns["response"]
    if response_column not in record:
        return {"error": f"missing column {response_column!r}"}
    response = record[response_column]
    if not isinstance(response, str):
        return {"error": f"column {response_column!r}: expected a string, got {type(response).__name__}"}
    messages += [{"role": "user", "content": "\n".join(parts)}, {"role": "assistant", "content": response}]
    return {"messages": messages, **_system_and_tools(record, columns)}


def _system_and_tools(record: dict[str, Any], columns: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("system", "tools"):
        value = _field(record, columns.get(key))
        if key == "tools" and isinstance(value, (list, dict)):  # tools given as JSON, not a string
            value = json.dumps(value, ensure_ascii=False)
        if value is not None and not isinstance(value, str):
            return {"error": f"column {columns[key]!r}: expected a string, got {type(value).__name__}"}
        out[key] = value
    return out


def _turns(record: dict[str, Any], columns: dict, tags: dict) -> tuple[list | None, dict[str, Any]]:
    column = columns["messages"]
    turns = record.get(column)
    if turns is None:
        return None, {"error": f"missing column {column!r}"}
    if not isinstance(turns, list):
        return None, {"error": f"column {column!r}: expected a list of messages, got {type(turns).__name__}"}
    role_tag = tags["role_tag"]
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_tag not in turn:
            return None, {"error": f"message {n}: expected an object with a {role_tag!r} field"}
    return turns, {}


def _prepare_messages(row: RawRecord, columns: dict, tags: dict) -> tuple[list | None, dict[str, Any]]:
    """The message list and the system/tools fields of a sharegpt or openai record, or an error."""
    if (bad := _check_object(row)) is not None:
        return None, bad
    turns, error = _turns(row.data, columns, tags)
    if turns is None:
        return None, error
    extra = _system_and_tools(row.data, columns)
    return (None, extra) if "error" in extra else (turns, extra)


def _unknown_role(n: int, tag: Any, role_tag: str, roles: dict[str, str]) -> dict[str, str]:
    return {"error": f"message {n}: unknown role {tag!r} in {role_tag!r} (expected {', '.join(map(repr, roles))})"}


def _roles(tags: dict) -> dict[str, str]:
    return {tags[f"{r}_tag"]: r for r in ("user", "assistant", "observation", "function") if tags.get(f"{r}_tag")}


def _convert_sharegpt(row: RawRecord, columns: dict, tags: dict) -> dict[str, Any]:
    turns, extra = _prepare_messages(row, columns, tags)
    if turns is None:
        return extra
    role_tag, content_tag, roles = tags["role_tag"], tags["content_tag"], _roles(tags)
    messages = []
    for n, turn in enumerate(turns):
        tag, content = turn.get(role_tag), turn.get(content_tag)
        if not isinstance(content, str):
            return {"error": f"message {n}: expected an object with a string {content_tag!r}"}
        if n == 0 and tags.get("system_tag") and tag == tags["system_tag"]:
            extra["system"] = content  # a leading system message is the system prompt
            continue
        if tag not in roles:
            return _unknown_role(n, tag, role_tag, roles)
        messages.append({"role": roles[tag], "content": content})
    return {"messages": messages, **extra}


def _convert_openai(row: RawRecord, columns: dict, tags: dict) -> dict[str, Any]:
    """OpenAI-style messages: assistant tool_calls become a function turn; consecutive tool
    results become one observation, joined as LLaMA-Factory joins them."""
    turns, extra = _prepare_messages(row, columns, tags)
    if turns is None:
        return extra
    role_tag, content_tag, roles = tags["role_tag"], tags["content_tag"], _roles(tags)
    if turns and tags.get("system_tag") and turns[0].get(role_tag) == tags["system_tag"]:
        extra["system"], turns = turns[0].get(content_tag), turns[1:]
    messages, tool_results = [], []
    for n, turn in enumerate(turns):
        tag, content = turn.get(role_tag), turn.get(content_tag)
        if tag in (tags.get("assistant_tag"), tags.get("function_tag")) and turn.get("tool_calls"):
            calls = turn["tool_calls"]
            if not isinstance(calls, list) or not all(isinstance(c, dict) and "function" in c for c in calls):
                return {"error": f"message {n}: tool_calls must be a list of objects with a 'function'"}
            tag, content = tags.get("function_tag"), json.dumps([c["function"] for c in calls], ensure_ascii=False)
        if not isinstance(content, str):
            return {"error": f"message {n}: expected an object with a string {content_tag!r}"}
        if tag not in roles:
            return _unknown_role(n, tag, role_tag, roles)
        if roles[tag] == "observation":
            tool_results.append(content)
            continue
        if tool_results:
            messages.append(
                {"role": "observation", "content": "\n</tool_response>\n<tool_response>\n".join(tool_results)}
            )
            tool_results = []
        messages.append({"role": roles[tag], "content": content})
    if tool_results:
        messages.append({"role": "observation", "content": "\n</tool_response>\n<tool_response>\n".join(tool_results)})
    return {"messages": messages, **extra}
