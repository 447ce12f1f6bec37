"""The one type every stage speaks: a conversation of role-tagged messages.

Ingest turns alpaca / sharegpt / openai records into ``Conversation``; validate
checks their shape; format turns them into tokens. Conversations travel between
pipelines as Arrow rows of ``CONVERSATION_SCHEMA`` (plain dicts in Python:
``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Role = Literal["user", "assistant", "observation", "function"]
ROLES: tuple[str, ...] = get_args(Role)
# Roles that ask (the prompt side of a turn) and roles that answer (the target side).
PROMPT_ROLES = ("user", "observation")
ANSWER_ROLES = ("assistant", "function")
# Shapes LLaMA-Factory trains on that validate keeps with a warning (``validate.reject`` turns them into rejects).
WarningKind = Literal["empty_prompt", "empty_answer", "call_without_observation", "observation_without_call"]
WARNING_KINDS: tuple[str, ...] = get_args(WarningKind)

# A conversation as an Arrow row. ``split`` is "validation" for ingest.eval_dataset records;
# ``error`` says why ingest could not convert a record (validate rejects it, then drops the column).
CONVERSATION_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("file", pa.string()),
        ("index", pa.int64()),
        ("system", pa.string()),
        ("tools", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("split", pa.string()),
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class Source:
    """Where a record came from, so any problem can point back at it."""

    dataset: str
    file: str
    index: int

    def describe(self) -> str:
        return f"{self.file} record {self.index} (dataset {self.dataset!r})"


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise TypeError(f"message content must be a string, got {type(self.content).__name__}")


@dataclass(frozen=True)
class Conversation:
    """Alternating prompt / answer messages, an optional system prompt and tool spec.

    ``system=None`` means "not given": the template then uses its default system
    prompt. An empty string is a given, empty system prompt.
    """

    messages: tuple[Message, ...]
    source: Source
    system: str | None = None
    tools: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """Everything wrong with the shape of this conversation, in order (empty if fine)."""
        found: list[str] = []
        if not self.messages:
            return ["no messages"]
        if len(self.messages) % 2:
            found.append(f"odd number of messages ({len(self.messages)}): the last prompt has no answer")
        for i, message in enumerate(self.messages):
            expected = PROMPT_ROLES if i % 2 == 0 else ANSWER_ROLES
            if message.role not in expected:
                side = "a prompt (user/observation)" if i % 2 == 0 else "an answer (assistant/function)"
                found.append(f"message {i}: role {message.role!r} where {side} was expected")
            if message.role == "function":
                found += [f"message {i}: {p}" for p in _function_call_problems(message.content)]
        if self.tools:
            found += [f"tools: {p}" for p in _tools_problems(self.tools)]
        return found

    def warnings(self) -> list[tuple[str, str]]:
        """What LLaMA-Factory trains on but looks like a mistake in the data, as (kind, detail) pairs.

        Kinds (``WARNING_KINDS``): ``empty_prompt`` (a user/observation message that is empty or
        whitespace), ``empty_answer`` (an empty assistant message: it trains only on <|im_end|>),
        ``call_without_observation`` (a function call answered by a user message, not by the
        tool's result), ``observation_without_call`` (a tool result that follows no function call).
        """
        found = []
        for i, message in enumerate(self.messages):
            blank = not message.content.strip()
            if blank and message.role in PROMPT_ROLES:
                found.append(("empty_prompt", f"message {i}: empty {message.role} content"))
            elif blank and message.role == "assistant":
                found.append(("empty_answer", f"message {i}: empty assistant content"))
            if message.role == "function" and i + 1 < len(self.messages) and self.messages[i + 1].role == "user":
                found.append(("call_without_observation", f"message {i}: function call followed by a user message"))
            if message.role == "observation" and (i == 0 or self.messages[i - 1].role != "function"):
                found.append(("observation_without_call", f"message {i}: observation with no function call before it"))
        return found

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.source.dataset,
            "file": self.source.file,
            "index": self.source.index,
            "system": self.system,
            "tools": self.tools,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conversation:
        return cls(
            messages=tuple(Message(m["role"], m["content"]) for m in data["messages"]),
            source=Source(data["dataset"], data["file"], int(data["index"])),
            system=data.get("system"),
            tools=data.get("tools"),
        )


@dataclass(frozen=True)
class ConversationColumns:
    """Many conversations as columns, their messages back to back: what format reads from Arrow rows
    without building a ``Conversation`` (and a ``Message`` each) per record."""

    systems: list[str | None]
    tools: list[str | None]
    roles: list[str]  # every message's, conversation after conversation
    contents: list[str]
    starts: np.ndarray  # where each conversation's messages begin, then the message count
    conversation: Callable[[int], Conversation]  # conversation k in full, for what is said about it

    def __len__(self) -> int:
        return len(self.systems)

    def rows_of(self, messages: Sequence[int]) -> list[int]:
        """The conversations these messages (numbers into ``roles`` / ``contents``) belong to, each once."""
        return np.unique(np.searchsorted(self.starts, messages, side="right") - 1).tolist()

    @classmethod
    def from_table(cls, table: pa.Table) -> ConversationColumns:
        """Rows of ``CONVERSATION_SCHEMA``."""
        messages = table.column("messages").combine_chunks()
        offsets = messages.offsets.to_numpy()  # a sliced array's offsets need not start at 0
        flat = messages.flatten()
        return cls(
            systems=table.column("system").to_pylist(),
            tools=table.column("tools").to_pylist(),
            roles=pc.struct_field(flat, "role").to_pylist(),
            contents=pc.struct_field(flat, "content").to_pylist(),
            starts=offsets - offsets[0],
            conversation=lambda k: Conversation.from_dict(table.slice(k, 1).to_pylist()[0]),
        )

    @classmethod
    def from_conversations(cls, conversations: Sequence[Conversation]) -> ConversationColumns:
        messages = [m for c in conversations for m in c.messages]
        return cls(
            systems=[c.system for c in conversations],
            tools=[c.tools for c in conversations],
            roles=[m.role for m in messages],
            contents=[m.content for m in messages],
            starts=np.cumsum([0] + [len(c.messages) for c in conversations]),
            conversation=conversations.__getitem__,
        )


def _json(text: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg} at character {exc.pos})"


def _function_call_problems(content: str) -> list[str]:
    calls, error = _json(content)
    if error:
        return [f"function call: {error}"]
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and "name" in c and "arguments" in c for c in calls):
        return ['function call: expected {"name": ..., "arguments": ...} or a list of them']
    return []


def _tools_problems(tools: str) -> list[str]:
    specs, error = _json(tools)
    if error:
        return [error]
    if not isinstance(specs, list) or not all(isinstance(t, dict) for t in specs):
        return ["expected a JSON list of tool objects"]
    return []
