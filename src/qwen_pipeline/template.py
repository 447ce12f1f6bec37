"""The ``qwen`` chat template: conversation -> (input_ids, labels), as LLaMA-Factory does for SFT.

Facts carried from LLaMA-Factory 0.9.5 (template ``qwen``, stage ``sft``):
- turn 0's source is the system piece then the first prompt piece; each later source is
  the next prompt; targets are the answers. Every piece is tokenized on its own (which is
  why ids can differ from tokenizing the whole rendered text at piece boundaries);
- the system piece is always present: a conversation's own non-empty system prompt,
  otherwise the default one; no BOS token;
- an answer's ``<|im_end|>`` and the newline after it are part of its labels;
- ``cutoff_len`` is shared turn by turn with ``infer_seqlen``; both sides keep their heads;
- ``mask_history`` labels only the last answer and visits turns last-first, so the
  earliest turns are the ones cut.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .conversation import Conversation, ConversationColumns

IGNORE_INDEX = -100
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

SYSTEM_PIECE = "<|im_start|>system\n{content}<|im_end|>\n"
PROMPT_PIECES = {
    "user": "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    "observation": (
        "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ),
}
ANSWER_PIECES = {"assistant": "{content}<|im_end|>\n", "function": "{content}<|im_end|>\n"}
PIECES = {**PROMPT_PIECES, **ANSWER_PIECES}
# Appended to the system prompt when a conversation offers tools (Qwen2.5's tool prompt).
TOOLS_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call>"
)


def _identity(text: str) -> str:
    return text


def tools_text(tools: str, own=_identity) -> str:
    """The tool prompt for a JSON list of tool specs ('' for none); plain specs are wrapped as functions.
    ``own`` wraps the data's own text (each spec)."""
    specs = json.loads(tools)
    if not specs:
        return ""
    lines = "".join(
        "\n"
        + own(json.dumps(t if t.get("type") == "function" else {"type": "function", "function": t}, ensure_ascii=False))
        for t in specs
    )
    return TOOLS_PROMPT.replace("{tools}", lines)


def function_call_text(content: str, own=_identity) -> str:
    """A function turn's JSON ({"name", "arguments"} or a list of them) as <tool_call> blocks.
    ``own`` wraps the data's own text (each call)."""
    calls = json.loads(content)
    calls = calls if isinstance(calls, list) else [calls]
    blocks = [json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False) for c in calls]
    return "\n".join(f"<tool_call>\n{own(b)}\n</tool_call>" for b in blocks)


Tokenization = Literal["turns", "whole_text"]
TurnIds = tuple[list[int], list[int]]  # one turn's (source ids, target ids)


@dataclass(frozen=True)
class TemplateOptions:
    cutoff_len: int = 2048
    train_on_prompt: bool = False
    mask_history: bool = False
    default_system: str = DEFAULT_SYSTEM
    # "turns": each piece alone, as LLaMA-Factory; "whole_text": as apply_chat_template / inference.
    tokenization: Tokenization = "turns"

    def __post_init__(self) -> None:
        if found := option_problems(self.cutoff_len, self.train_on_prompt, self.mask_history):
            raise ValueError("; ".join(found))


def option_problems(cutoff_len: int, train_on_prompt: bool, mask_history: bool) -> list[str]:
    """What the template cannot do (format.problems reports them too, before any node runs)."""
    found = []
    if cutoff_len < 1:
        found.append(f"cutoff_len: must be positive, got {cutoff_len}")
    if train_on_prompt and mask_history:  # as in LLaMA-Factory
        found.append("mask_history: cannot be combined with train_on_prompt")
    return found


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    full_length: int  # tokens before cutoff_len was applied

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


def _fill(piece: str, content: str) -> str:
    # str.replace, not str.format: content may hold braces (code, JSON).
    return piece.replace("{content}", content)


# Around the data's own text when it is to be escaped (``render(mark=True)``): lone surrogates,
# which no record holds (ingest rejects them; Arrow cannot store them).
OPEN, CLOSE = "\ud800", "\ud801"


def _marked(text: str) -> str:
    return OPEN + text + CLOSE


@dataclass(frozen=True)
class Pieces:
    """Many conversations' text in the pieces that are tokenized alone: turn after turn, its source
    pieces (turn 0: the system piece, then the prompt) then its target piece."""

    texts: list[str]
    is_target: np.ndarray  # per piece
    starts: np.ndarray  # where each conversation's pieces begin, then the piece count

    def __len__(self) -> int:
        return len(self.starts) - 1

    def span(self, k: int) -> range:
        return range(self.starts[k], self.starts[k + 1])

    def text(self, k: int) -> str:
        """Conversation k's whole rendered text."""
        return "".join(self.texts[p] for p in self.span(k))

    def flat(self, k: int, piece_ids: Sequence[Sequence[int]]) -> list[int]:
        """Conversation k's ids, from the ids of every piece."""
        return [i for p in self.span(k) for i in piece_ids[p]]

    def turns(self, k: int, piece_ids: Sequence[Sequence[int]]) -> list[TurnIds]:
        """Conversation k's (source ids, target ids) per turn, from the ids of every piece."""
        turns, source = [], []
        for p in self.span(k):
            if self.is_target[p]:
                turns.append((source, list(piece_ids[p])))
                source = []
            else:
                source = source + list(piece_ids[p])
        return turns


SIDES = {**dict.fromkeys(PROMPT_PIECES, 0), **dict.fromkeys(ANSWER_PIECES, 1)}  # a turn's message 0 and 1


def render(columns: ConversationColumns, default_system: str = DEFAULT_SYSTEM, mark: bool = False) -> Pieces:
    """The text pieces of every turn of every conversation, all at once. Each piece is tokenized alone.

    ``mark``: the data's own text (messages, system prompt, tool specs, call names and arguments)
    stands between ``OPEN`` and ``CLOSE``, so it can be told from the template's text.
    """
    own = _marked if mark else _identity
    sides = np.array([SIDES.get(role, -1) for role in columns.roles], dtype=np.int8)
    counts = np.diff(columns.starts)
    position = np.arange(len(sides)) - np.repeat(columns.starts[:-1], counts)
    if (sides != position % 2).any() or (counts % 2).any() or not counts.all():  # validate lets none through
        raise ValueError(next(filter(None, (_unsupported(columns.conversation(k)) for k in range(len(columns))))))
    systems = [
        _fill(SYSTEM_PIECE, (own(system) if system else default_system) + (tools_text(tools, own) if tools else ""))
        for system, tools in zip(columns.systems, columns.tools)
    ]
    messages = [
        _fill(PIECES[role], function_call_text(content, own) if role == "function" else own(content))
        for role, content in zip(columns.roles, columns.contents)
    ]
    texts, starts = [], columns.starts.tolist()
    for system, first, end in zip(systems, starts, starts[1:]):
        texts.append(system)
        texts += messages[first:end]
    is_target = np.zeros(len(texts), dtype=bool)  # message j of conversation k is piece j + k + 1
    is_target[np.arange(len(sides)) + np.repeat(np.arange(1, len(counts) + 1), counts)] = sides == 1
    return Pieces(texts, is_target, columns.starts + np.arange(len(counts) + 1))


def _unsupported(conversation: Conversation) -> str | None:
    """What the qwen template cannot render in this conversation (None: nothing)."""
    roles = [m.role for m in conversation.messages]
    if not roles:
        return f"{conversation.source.describe()}: no messages"
    for i in range(0, len(roles), 2):
        prompt, answer = roles[i], roles[i + 1] if i + 1 < len(roles) else "no answer"
        if prompt not in PROMPT_PIECES or answer not in ANSWER_PIECES:
            return (
                f"{conversation.source.describe()}: turn {i // 2} ({prompt} -> {answer}) "
                "is not supported by the qwen template yet"
            )
    return None


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """How many source and target tokens of a turn fit in ``cutoff_len`` (LLaMA-Factory's rule)."""
    if target_len * 2 < cutoff_len:  # a short target keeps all of itself
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # a short source keeps all of itself
        max_target_len = cutoff_len - source_len
    else:  # both long: share in proportion
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def assemble(turns: Sequence[tuple[list[int], list[int]]], options: TemplateOptions) -> Encoded:
    """Join tokenized turns into input_ids and labels, applying cutoff and masking."""
    input_ids: list[int] = []
    labels: list[int] = []
    full_length = sum(len(s) + len(t) for s, t in turns)
    ordered = list(reversed(turns)) if options.mask_history else list(turns)
    total = 0
    for turn_idx, (source_ids, target_ids) in enumerate(ordered):
        if total >= options.cutoff_len:
            break
        source_len, target_len = infer_seqlen(len(source_ids), len(target_ids), options.cutoff_len - total)
        source_ids, target_ids = source_ids[:source_len], target_ids[:target_len]
        total += source_len + target_len
        source_labels = list(source_ids) if options.train_on_prompt else [IGNORE_INDEX] * source_len
        if options.mask_history and turn_idx != 0:
            target_labels = [IGNORE_INDEX] * target_len
        else:
            target_labels = list(target_ids)
        if options.mask_history:  # visited last-first: prepend
            input_ids = source_ids + target_ids + input_ids
            labels = source_labels + target_labels + labels
        else:
            input_ids += source_ids + target_ids
            labels += source_labels + target_labels
    return Encoded(input_ids=input_ids, labels=labels, full_length=full_length)


@dataclass(frozen=True)
class EncodedBatch:
    """Many examples' input_ids and labels back to back, ``lengths`` tokens each."""

    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32
    lengths: np.ndarray
    full_lengths: np.ndarray  # tokens before cutoff_len was applied

    @property
    def truncated(self) -> np.ndarray:
        return self.full_lengths > self.lengths

    def select(self, keep: np.ndarray) -> EncodedBatch:
        tokens = np.repeat(keep, self.lengths)
        return EncodedBatch(self.input_ids[tokens], self.labels[tokens], self.lengths[keep], self.full_lengths[keep])

    def examples(self) -> list[Encoded]:
        bounds = np.cumsum(self.lengths)[:-1]
        rows = zip(np.split(self.input_ids, bounds), np.split(self.labels, bounds), self.full_lengths.tolist())
        return [Encoded(ids.tolist(), labels.tolist(), full) for ids, labels, full in rows]


def assemble_many(pieces: Pieces, piece_ids: Sequence[Sequence[int]], options: TemplateOptions) -> EncodedBatch:
    """``assemble`` for many conversations at once. One within cutoff_len keeps every token in order
    (``infer_seqlen`` cuts nothing then, and mask_history's last-first visit rebuilds the same order),
    so its ids are its pieces' ids back to back, labelled piece by piece; only longer ones are cut one
    by one by ``assemble``."""
    piece_lengths = np.fromiter(map(len, piece_ids), dtype=np.int64, count=len(piece_ids))
    ids = np.fromiter(itertools.chain.from_iterable(piece_ids), dtype=np.int32, count=int(piece_lengths.sum()))
    labelled = np.ones(len(piece_ids), dtype=bool) if options.train_on_prompt else pieces.is_target.copy()
    if options.mask_history:  # only each conversation's last answer
        labelled[:] = False
        labelled[pieces.starts[1:] - 1] = True
    labels = np.where(np.repeat(labelled, piece_lengths), ids, np.int32(IGNORE_INDEX))
    bounds = np.concatenate([[0], np.cumsum(piece_lengths)])[pieces.starts]  # each conversation's first token
    full_lengths = np.diff(bounds)
    lengths = full_lengths.copy()
    id_parts, label_parts, done = [], [], 0
    for k in np.flatnonzero(full_lengths > options.cutoff_len).tolist():
        cut = assemble(pieces.turns(k, piece_ids), options)
        lengths[k] = len(cut.input_ids)
        id_parts += [ids[done : bounds[k]], np.array(cut.input_ids, dtype=np.int32)]
        label_parts += [labels[done : bounds[k]], np.array(cut.labels, dtype=np.int32)]
        done = bounds[k + 1]
    if id_parts:
        ids, labels = np.concatenate([*id_parts, ids[done:]]), np.concatenate([*label_parts, labels[done:]])
    return EncodedBatch(ids, labels, lengths, full_lengths)


def batch_encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts in one call of the Rust tokenizer (parallel), no special tokens added.

    Identical texts are tokenized once (the system piece repeats in nearly every conversation).
    """
    unique = list(dict.fromkeys(texts))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):  # skips offsets: ~1.4x faster
        # transformers leaves this set after a call with split_special_tokens=True: control tokens
        # in the template must be matched, whatever the tokenizer was last asked.
        backend.encode_special_tokens = False
        ids = [e.ids for e in backend.encode_batch_fast(unique, add_special_tokens=False)]
    else:
        ids = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
    by_text = dict(zip(unique, ids))
    return [by_text[t] for t in texts]


def tokenize_pieces(pieces: Pieces, tokenizer, mode: Tokenization) -> list[list[int]]:
    """Every piece's token ids, in one batched call. "turns": each piece alone (LLaMA-Factory's way);
    "whole_text": each conversation's whole text at once (as ``apply_chat_template``, inference servers),
    each token given to the piece in which its first character lies (so a token merging the newline
    after ``assistant`` with an answer's leading newline is prompt)."""
    if mode == "turns":
        return batch_encode(tokenizer, pieces.texts)
    if not len(pieces):
        return []
    texts = [pieces.text(k) for k in range(len(pieces))]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    ends = list(itertools.accumulate(map(len, pieces.texts)))  # where each piece ends in the texts joined
    out: list[list[int]] = [[] for _ in pieces.texts]
    for k, (ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
        first, last = pieces.starts[k], pieces.starts[k + 1] - 1
        before = ends[first - 1] if first else 0
        for token, (start, _end) in zip(ids, offsets):
            out[bisect.bisect_right(ends, before + start, first, last)].append(token)
    return out


def tokenize_turns(
    conversations: Sequence[Conversation], tokenizer, mode: Tokenization, default_system: str = DEFAULT_SYSTEM
) -> list[list[TurnIds]]:
    """Token ids of each turn's (source, target) for every conversation, in one batched call."""
    pieces = render(ConversationColumns.from_conversations(conversations), default_system)
    piece_ids = tokenize_pieces(pieces, tokenizer, mode)
    return [pieces.turns(k, piece_ids) for k in range(len(pieces))]


def encode_conversations(conversations: Sequence[Conversation], tokenizer, options: TemplateOptions) -> list[Encoded]:
    """Encode many conversations: tokenize (per ``options.tokenization``), then cut and mask."""
    pieces = render(ConversationColumns.from_conversations(conversations), options.default_system)
    return assemble_many(pieces, tokenize_pieces(pieces, tokenizer, options.tokenization), options).examples()


def conversation_ids(pieces: Pieces, rows: Sequence[int], tokenizer, mode: Tokenization) -> list[list[int]]:
    """The ids of conversations ``rows``, one list each, tokenized ``mode``'s way (in one batched call)."""
    if mode == "whole_text":
        return batch_encode(tokenizer, [pieces.text(k) for k in rows])
    ids = iter(batch_encode(tokenizer, [pieces.texts[p] for k in rows for p in pieces.span(k)]))
    return [[i for _ in pieces.span(k) for i in next(ids)] for k in rows]


def _answer_may_merge(role: str, content: str) -> bool:
    # Pieces meet either at a special or added token (<|im_start|>, <tool_call>: the tokenizer splits
    # there anyway) or where an answer follows "assistant\n". Only an answer that starts with whitespace
    # can merge with that newline under Qwen2's split pattern.
    return role == "assistant" and content[:1].isspace()


def may_tokenize_differently(conversation: Conversation) -> bool:
    """Whether turn-by-turn and whole-text tokenization can disagree on this conversation."""
    return any(_answer_may_merge(m.role, m.content) for m in conversation.messages)


def may_tokenize_differently_rows(columns: ConversationColumns) -> list[int]:
    """``may_tokenize_differently`` over many conversations: the numbers of those that may."""
    return columns.rows_of([j for j, m in enumerate(zip(columns.roles, columns.contents)) if _answer_may_merge(*m)])


def flat_ids(turns: list[TurnIds]) -> list[int]:
    return [i for source, target in turns for i in (*source, *target)]
