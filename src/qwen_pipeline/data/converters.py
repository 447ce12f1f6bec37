"""alpaca / sharegpt / openai records -> conversation dicts, with LLaMA-Factory's ``dataset_info.json`` rules.

Nothing is judged here: a record that cannot be converted gets an ``error`` saying why, and validate
rejects it. ``columns`` and ``tags`` default as in LLaMA-Factory; when an entry gives them, keys it
leaves out become None rather than these defaults (as in LLaMA-Factory).
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ..conversation import CONVERSATION_SCHEMA

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


def columns_and_tags(info: dict[str, Any]) -> tuple[dict, dict]:
    columns = {k: info["columns"].get(k) for k in COLUMN_KEYS} if "columns" in info else DEFAULT_COLUMNS
    tags = {k: info["tags"].get(k) for k in DEFAULT_TAGS} if "tags" in info else DEFAULT_TAGS
    return columns, tags


def ignorable_fields(formatting: str, columns: dict) -> tuple[str, ...]:
    """Fields LLaMA-Factory would silently ignore when present but not mapped (we count and warn)."""
    candidates = ("system", "tools", "history") if formatting == "alpaca" else ("system", "tools")
    return tuple(key for key in candidates if not columns.get(key))


def convert(formatting: str, data: Any, columns: dict, tags: dict) -> dict[str, Any]:
    """One parsed record as {messages, system, tools} or {error}."""
    if not isinstance(data, dict):
        return {"error": f"expected a JSON object, got {type(data).__name__}"}
    return CONVERTERS[formatting](data, columns, tags)


def thinking_suffix(record: dict[str, Any]) -> dict[str, Any]:
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


def _field(record: Any, column: str | None) -> Any:
    return record.get(column) if column else None


def _alpaca(record: dict[str, Any], columns: dict, tags: dict) -> dict[str, Any]:
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
    """The message list and the system/tools fields of a sharegpt or openai record, or an error."""
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
    extra = _system_and_tools(record, columns)
    return (None, extra) if "error" in extra else (turns, extra)


def _unknown_role(n: int, tag: Any, role_tag: str, roles: dict[str, str]) -> dict[str, str]:
    return {"error": f"message {n}: unknown role {tag!r} in {role_tag!r} (expected {', '.join(map(repr, roles))})"}


def _roles(tags: dict) -> dict[str, str]:
    return {tags[f"{r}_tag"]: r for r in ("user", "assistant", "observation", "function") if tags.get(f"{r}_tag")}


def _sharegpt(record: dict[str, Any], columns: dict, tags: dict) -> dict[str, Any]:
    turns, extra = _turns(record, columns, tags)
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


def _openai(record: dict[str, Any], columns: dict, tags: dict) -> dict[str, Any]:
    """OpenAI-style messages: assistant tool_calls become a function turn; consecutive tool
    results become one observation, joined as LLaMA-Factory joins them."""
    turns, extra = _turns(record, columns, tags)
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


CONVERTERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai}


@dataclass(frozen=True)
class ChunkConverter:
    """Converts chunks of one named dataset's raw rows (``sources.RawTable``) into conversation rows.

    ``rows[i]`` is the raw row behind output row ``i`` (after num_samples / max_samples), or None
    for "row i". The result of each chunk counts the fields present but not mapped (see
    ``ignorable_fields``).
    """

    dataset: str
    formatting: str
    columns: dict
    tags: dict
    files: tuple[tuple[int, str], ...]  # (first row, file name), as RawTable.files
    kind: str  # "json": rows carry their JSON text; "table": rows are the record
    rows: Any = None  # numpy array of raw row numbers, or None
    split: str | None = None  # "validation" for ingest.eval_dataset
    openai_thinking_suffix: bool = False

    def __call__(self, chunk: pa.Table, offset: int) -> tuple[pa.Table, Counter]:
        starts = [start for start, _ in self.files]
        ignorable = ignorable_fields(self.formatting, self.columns)
        out: dict[str, list] = {name: [] for name in CONVERSATION_SCHEMA.names}
        ignored: Counter = Counter()
        for n, record in enumerate(chunk.to_pylist()):
            row = int(self.rows[offset + n]) if self.rows is not None else offset + n
            part = bisect.bisect_right(starts, row) - 1
            if self.kind == "json":
                error = record["error"]
                data = None if error else json.loads(record["json"])
            else:
                error, data = None, record
            converted = {"error": error} if error else convert(self.formatting, data, self.columns, self.tags)
            if self.formatting == "openai" and self.openai_thinking_suffix:
                converted = thinking_suffix(converted)
            if isinstance(data, dict):
                ignored.update(key for key in ignorable if data.get(key) not in (None, "", []))
            values = {
                "dataset": self.dataset,
                "file": self.files[part][1],
                "index": row - starts[part],
                "split": self.split,
                "messages": [],
                **converted,
            }
            for name, column in out.items():
                column.append(values.get(name))
        return pa.table(out, schema=CONVERSATION_SCHEMA), ignored
