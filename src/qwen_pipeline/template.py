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

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .conversation import Conversation

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
        if self.cutoff_len < 1:
            raise ValueError(f"cutoff_len must be positive, got {self.cutoff_len}")
        if self.train_on_prompt and self.mask_history:
            raise ValueError("train_on_prompt and mask_history cannot be combined (as in LLaMA-Factory)")


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


# Around the data's own text when it is to be escaped (``turn_pieces(mark=True)``): lone surrogates,
# which no record holds (ingest rejects them; Arrow cannot store them).
OPEN, CLOSE = "\ud800", "\ud801"


def _marked(text: str) -> str:
    return OPEN + text + CLOSE


def turn_pieces(
    conversation: Conversation, default_system: str = DEFAULT_SYSTEM, mark: bool = False
) -> list[tuple[list[str], str]]:
    """The text pieces of each turn: ([source pieces], target piece). Each piece is tokenized alone.

    ``mark``: the data's own text (messages, system prompt, tool specs, call names and arguments)
    stands between ``OPEN`` and ``CLOSE``, so it can be told from the template's text.
    """
    own = _marked if mark else _identity
    messages = conversation.messages
    system = own(conversation.system) if conversation.system else default_system
    turns: list[tuple[list[str], str]] = []
    for i in range(0, len(messages), 2):
        prompt, answer = messages[i], messages[i + 1]
        if prompt.role not in PROMPT_PIECES or answer.role not in ANSWER_PIECES:
            raise ValueError(
                f"{conversation.source.describe()}: turn {i // 2} ({prompt.role} -> {answer.role}) "
                "is not supported by the qwen template yet"
            )
        source = [_fill(PROMPT_PIECES[prompt.role], own(prompt.content))]
        if i == 0:
            tools = tools_text(conversation.tools, own) if conversation.tools else ""
            source.insert(0, _fill(SYSTEM_PIECE, system + tools))
        if answer.role == "function":
            content = function_call_text(answer.content, own)
        else:
            content = own(answer.content)
        turns.append((source, _fill(ANSWER_PIECES[answer.role], content)))
    return turns


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


def _tokenize_pieces(all_turns: list[list[tuple[list[str], str]]], tokenizer) -> list[list[TurnIds]]:
    """LLaMA-Factory's way: every piece tokenized on its own (one batched call for all pieces)."""
    pieces = [p for turns in all_turns for source, target in turns for p in (*source, target)]
    ids = iter(batch_encode(tokenizer, pieces))
    out = []
    for turns in all_turns:
        tokenized = []
        for source, _ in turns:
            source_ids: list[int] = []
            for _piece in source:
                source_ids += next(ids)
            tokenized.append((source_ids, list(next(ids))))
        out.append(tokenized)
    return out


def _tokenize_whole(all_turns: list[list[tuple[list[str], str]]], tokenizer) -> list[list[TurnIds]]:
    """Inference servers' way: the whole rendered text tokenized at once (as ``apply_chat_template``).

    Each token is given to the source or target part in which its first character lies, so a
    token merging the newline after ``assistant`` with an answer's leading newline is prompt.
    """
    texts, bounds = [], []
    for turns in all_turns:
        text, ends = "", []
        for source, target in turns:
            text += "".join(source)
            ends.append(len(text))
            text += target
            ends.append(len(text))
        texts.append(text)
        bounds.append(ends)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
    out = []
    for n, ends in enumerate(bounds):
        parts: list[list[int]] = [[] for _ in ends]
        part = 0
        for token, (start, _end) in zip(encoded["input_ids"][n], encoded["offset_mapping"][n]):
            while part < len(ends) - 1 and start >= ends[part]:
                part += 1
            parts[part].append(token)
        out.append([(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)])
    return out


def tokenize_turns(
    conversations: Sequence[Conversation], tokenizer, mode: Tokenization, default_system: str = DEFAULT_SYSTEM
) -> list[list[TurnIds]]:
    """Token ids of each turn's (source, target) for every conversation, in one batched call."""
    all_turns = [turn_pieces(c, default_system) for c in conversations]
    return _tokenize_pieces(all_turns, tokenizer) if mode == "turns" else _tokenize_whole(all_turns, tokenizer)


def encode_conversations(conversations: Sequence[Conversation], tokenizer, options: TemplateOptions) -> list[Encoded]:
    """Encode many conversations: tokenize (per ``options.tokenization``), then cut and mask."""
    tokenized = tokenize_turns(conversations, tokenizer, options.tokenization, options.default_system)
    return [assemble(turns, options) for turns in tokenized]


def may_tokenize_differently(conversation: Conversation) -> bool:
    """Whether turn-by-turn and whole-text tokenization can disagree on this conversation.

    Pieces meet either at a special or added token (``<|im_start|>``, ``<tool_call>``: the
    tokenizer splits there anyway) or where an answer follows ``assistant\\n``. Only an answer
    that starts with whitespace can merge with that newline under Qwen2's split pattern.
    """
    return any(m.role == "assistant" and m.content[:1].isspace() for m in conversation.messages)


def flat_ids(turns: list[TurnIds]) -> list[int]:
    return [i for source, target in turns for i in (*source, *target)]


# --- control tokens in the data's own text ----------------------------------------------------------


def control_token_pattern(tokenizer) -> re.Pattern:
    """What the tokenizer reads as one added token (``<|im_end|>``, ``<tool_call>``, ...) wherever it
    appears in text, longest first."""
    texts = sorted({str(t) for t in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts)))


def control_tokens_in(conversation: Conversation, pattern: re.Pattern) -> list[str]:
    """Where the conversation's own text holds control-token text: ["message 0: <|im_end|>", ...]."""
    fields = [("system", conversation.system), ("tools", conversation.tools)]
    fields += [(f"message {i}", m.content) for i, m in enumerate(conversation.messages)]
    found = []
    for where, text in fields:
        if text and (tokens := pattern.findall(text)):
            found.append(f"{where}: {', '.join(dict.fromkeys(tokens))}")
    return found


def plain_text_tokenizer(tokenizer):
    """The tokenizer's Rust core with no added tokens: text becomes ordinary tokens only, even the
    characters of ``<|im_end|>`` or ``<tool_call>`` (which ``split_special_tokens`` would still
    match, being added but not special)."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(spec))


def tokenize_escaped(
    conversations: Sequence[Conversation], tokenizer, pattern: re.Pattern, plain, default_system: str = DEFAULT_SYSTEM
) -> list[list[TurnIds]]:
    """Turn by turn as ``tokenize_turns``, but control-token text in the data's own text is read as
    ordinary text (``plain``: ``plain_text_tokenizer``); the template's own control tokens stay.

    Each piece is cut at the template's control tokens; the text between them (template text and the
    data's text together, as the tokenizer would see it) is encoded with no added token matched.
    """
    ids_of = {str(t): i for i, t in tokenizer.added_tokens_decoder.items()}
    turns = [turn_pieces(c, default_system, mark=True) for c in conversations]
    segments = {p: _segments(p, pattern) for pieces in turns for source, target in pieces for p in (*source, target)}
    texts = list(dict.fromkeys(text for parts in segments.values() for text, special in parts if not special))
    by_text = {t: e.ids for t, e in zip(texts, plain.encode_batch(texts, add_special_tokens=False))}

    def ids(piece: str) -> list[int]:
        return [i for text, special in segments[piece] for i in ([ids_of[text]] if special else by_text[text])]

    return [[([i for p in source for i in ids(p)], ids(target)) for source, target in pieces] for pieces in turns]


def _segments(piece: str, pattern: re.Pattern) -> list[tuple[str, bool]]:
    """A marked piece as (text, False) and (template control token, True) parts, marks removed."""
    out: list[tuple[str, bool]] = []
    text, inside, at = "", 0, 0
    for match in re.finditer(f"{OPEN}|{CLOSE}|{pattern.pattern}", piece):
        token = match.group()
        text += piece[at : match.start()]
        at = match.end()
        if token in (OPEN, CLOSE):
            inside += 1 if token == OPEN else -1
        elif inside:  # in the data's own text: stays text
            text += token
        else:  # the template's own control token
            out += [(text, False), (token, True)] if text else [(token, True)]
            text = ""
    text += piece[at:]
    return out + [(text, False)] if text else out
