"""alpaca / sharegpt / openai records -> conversation dicts, with LLaMA-Factory's ``dataset_info.json`` rules.

Nothing is judged here: a record that cannot be converted gets an ``error`` saying why, and validate
rejects it. ``columns`` and ``tags`` default as in LLaMA-Factory; when an entry gives them, keys it
leaves out become None rather than these defaults (as in LLaMA-Factory).
"""

from __future__ import annotations

import bisect
import json
import re
from collections import Counter
from dataclasses import dataclass, field
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
    if history not in (None, ""):  # "" is no history, as LLaMA-Factory reads it
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
# Columns whose absence from every record of a dataset is an error (the others: a warning).
REQUIRED_COLUMNS = {"alpaca": ("prompt", "response"), "sharegpt": ("messages",), "openai": ("messages",)}
FORMATTING_COLUMNS = {
    "alpaca": ("prompt", "query", "response", "history", "system", "tools"),
    "sharegpt": ("messages", "system", "tools"),
    "openai": ("messages", "system", "tools"),
}
TEXT_COLUMNS = ("prompt", "query", "response", "system")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|true|false|True|False")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape of a UTF-16 surrogate
MAX_KEYS_SEEN = 200  # distinct top-level keys remembered, to name them when a mapped column is absent


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"key {twice!r} appears twice in one object: the first value would be lost")
    return record


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string holding half of a surrogate pair (not Unicode text), if any."""
    if isinstance(value, str):
        return (path or "the record") if re.search("[\ud800-\udfff]", value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        if found := _lone_surrogate(item, where):
            return found
    return None


def parse_record(text: str) -> tuple[Any, str | None]:
    """A record's JSON text as a value, or None and why it cannot be used (duplicate keys, lone surrogates)."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        return None, str(exc)
    if _SURROGATE_ESCAPE.search(text) and (where := _lone_surrogate(data)):
        return None, f"{where}: a lone UTF-16 surrogate escape (such as \\ud83d) is not text"
    return data, None


def numbers_as_text(record: dict[str, Any], columns: dict) -> tuple[dict[str, Any], int]:
    """A table row with the numbers and booleans of its text columns as text; how many there were.

    csv cells arrive as written (read as strings); a cell that spells a number counts too.
    """
    found = 0
    for key in TEXT_COLUMNS:
        column = columns.get(key)
        value = record.get(column) if column else None
        if isinstance(value, (bool, int, float)):
            record = {**record, column: json.dumps(value)}
            found += 1
        elif isinstance(value, str) and _NUMBER.fullmatch(value):
            found += 1
    return record, found


@dataclass
class ConvertResult:
    """What one chunk's conversion counted."""

    ignored: Counter = field(default_factory=Counter)  # fields present but not mapped
    keys: Counter = field(default_factory=Counter)  # top-level keys of the records (at most MAX_KEYS_SEEN)
    numbers_as_text: int = 0

    def add(self, other: ConvertResult) -> ConvertResult:
        self.ignored.update(other.ignored)
        for key, count in other.keys.items():
            if key in self.keys or len(self.keys) < MAX_KEYS_SEEN:
                self.keys[key] += count
        self.numbers_as_text += other.numbers_as_text
        return self


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

    def __call__(self, chunk: pa.Table, offset: int) -> tuple[pa.Table, ConvertResult]:
        starts = [start for start, _ in self.files]
        ignorable = ignorable_fields(self.formatting, self.columns)
        out: dict[str, list] = {name: [] for name in CONVERSATION_SCHEMA.names}
        result = ConvertResult()
        for n, record in enumerate(chunk.to_pylist()):
            row = int(self.rows[offset + n]) if self.rows is not None else offset + n
            part = bisect.bisect_right(starts, row) - 1
            if self.kind == "json":
                error = record["error"]
                data, error = (None, error) if error else parse_record(record["json"])
            else:
                (data, numbers), error = numbers_as_text(record, self.columns), None
                result.numbers_as_text += numbers
            converted = {"error": error} if error else convert(self.formatting, data, self.columns, self.tags)
            if self.formatting == "openai" and self.openai_thinking_suffix:
                converted = thinking_suffix(converted)
            if isinstance(data, dict):
                result.ignored.update(key for key in ignorable if data.get(key) not in (None, "", []))
                present = (key for key, value in data.items() if value is not None)
                if len(result.keys) >= MAX_KEYS_SEEN:
                    present = (key for key in present if key in result.keys)
                result.keys.update(present)
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
        return pa.table(out, schema=CONVERSATION_SCHEMA), result
