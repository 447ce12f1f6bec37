"""Ingest: read the datasets named in ``params:ingest.dataset`` into one conversation shape.

Conversion follows LLaMA-Factory's ``dataset_info.json`` schema (alpaca and sharegpt,
``columns`` and ``tags`` with its defaults). Nothing is judged or dropped here: a record
that cannot be converted keeps an ``error`` saying why, and validate rejects it.
"""

from __future__ import annotations

import logging
from typing import Any

from ...config import IngestConfig, parse_config
from ...datasets import RawDatasets, RawRecord

logger = logging.getLogger(__name__)

# LLaMA-Factory's defaults. When an entry gives "columns" (or "tags"), keys it leaves out
# become None rather than these defaults, as in LLaMA-Factory.
DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
}
DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}


def ingest_datasets(raw: RawDatasets, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every record of every selected dataset, converted to a conversation dict (or an error)."""
    config = parse_config(IngestConfig, params, "ingest")
    unknown = [name for name in config.dataset if name not in raw.info]
    if unknown:
        raise KeyError(
            f"{raw.info_path}: no dataset named {', '.join(map(repr, unknown))}; "
            f"it defines {', '.join(map(repr, raw.info))}"
        )
    records: list[dict[str, Any]] = []
    for name in config.dataset:
        info = raw.info[name]
        file, rows = raw.read(name)
        if config.max_samples is not None:
            rows = rows[: config.max_samples]
        formatting = info.get("formatting", "alpaca")
        if formatting not in DEFAULT_COLUMNS:
            raise ValueError(f"{raw.info_path}, dataset {name!r}: formatting {formatting!r} is not supported yet")
        columns = info["columns"] if "columns" in info else DEFAULT_COLUMNS[formatting]
        tags = {k: info["tags"].get(k) for k in DEFAULT_TAGS} if "tags" in info else DEFAULT_TAGS
        convert = _convert_alpaca if formatting == "alpaca" else _convert_sharegpt
        converted = [_base(name, file, row) | convert(row, columns, tags) for row in rows]
        logger.info("Ingested %d %s records from %s (dataset %r)", len(converted), formatting, file, name)
        records += converted
    return records


def _base(dataset: str, file: str, row: RawRecord) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "file": file,
        "index": row.index,
        "system": None,
        "tools": None,
        "messages": [],
        "error": row.error,
    }


def _field(record: Any, column: str | None) -> Any:
    return record.get(column) if column else None


def _convert_alpaca(row: RawRecord, columns: dict[str, str], tags: dict[str, str]) -> dict[str, Any]:
    record = row.data
    if row.error:
        return {}
    if not isinstance(record, dict):
        return {"error": f"expected a JSON object, got {type(record).__name__}"}
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
    response_column = columns.get("response")
    response = _field(record, response_column)
    if response_column and response_column not in record:
        return {"error": f"missing column {response_column!r}"}
    if not isinstance(response, str):
        return {"error": f"column {response_column!r}: expected a string, got {type(response).__name__}"}
    messages += [{"role": "user", "content": "\n".join(parts)}, {"role": "assistant", "content": response}]
    return {"messages": messages, **_system_and_tools(record, columns)}


def _system_and_tools(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("system", "tools"):
        value = _field(record, columns.get(key))
        if value is not None and not isinstance(value, str):
            return {"error": f"column {columns[key]!r}: expected a string, got {type(value).__name__}"}
        out[key] = value if value is not None else None
    return out


def _convert_sharegpt(row: RawRecord, columns: dict[str, str], tags: dict[str, str]) -> dict[str, Any]:
    record = row.data
    if row.error:
        return {}
    if not isinstance(record, dict):
        return {"error": f"expected a JSON object, got {type(record).__name__}"}
    column = columns.get("messages")
    turns = _field(record, column)
    if turns is None:
        return {"error": f"missing column {column!r}"}
    if not isinstance(turns, list):
        return {"error": f"column {column!r}: expected a list of messages, got {type(turns).__name__}"}
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    roles = {tags[f"{r}_tag"]: r for r in ("user", "assistant", "observation", "function") if tags.get(f"{r}_tag")}
    extra = _system_and_tools(record, columns)
    if "error" in extra:
        return extra
    messages = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(content_tag), str):
            return {"error": f"message {n}: expected an object with a string {content_tag!r}"}
        tag = turn.get(role_tag)
        if n == 0 and tags.get("system_tag") and tag == tags["system_tag"]:
            extra["system"] = turn[content_tag]  # a leading system message is the system prompt
            continue
        if tag not in roles:
            return {
                "error": f"message {n}: unknown role {tag!r} in {role_tag!r} (expected {', '.join(map(repr, roles))})"
            }
        messages.append({"role": roles[tag], "content": turn[content_tag]})
    return {"messages": messages, **extra}
