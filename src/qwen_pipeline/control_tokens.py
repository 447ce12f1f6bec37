"""Control-token text in the data's own text (``<|im_end|>``, ``<tool_call>`` typed in a message): finding it,
and tokenizing it as plain text (``format.control_tokens: escape``) while the template's own control tokens stay."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from .conversation import Conversation, ConversationColumns
from .template import CLOSE, DEFAULT_SYSTEM, OPEN, render


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
) -> list[list[int]]:
    """Every piece's ids as ``tokenize_pieces`` "turns" (the pieces ``render`` gives), but control-token text
    in the data's own text is read as ordinary text (``plain``: ``plain_text_tokenizer``); the template's
    own control tokens stay.

    Each piece is cut at the template's control tokens; the text between them (template text and the
    data's text together, as the tokenizer would see it) is encoded with no added token matched.
    """
    ids_of = {str(t): i for i, t in tokenizer.added_tokens_decoder.items()}
    pieces = render(ConversationColumns.from_conversations(conversations), default_system, mark=True).texts
    segments = {p: _segments(p, pattern) for p in pieces}

    texts = list(dict.fromkeys(text for parts in segments.values() for text, special in parts if not special))
    by_text = {t: e.ids for t, e in zip(texts, plain.encode_batch(texts, add_special_tokens=False))}
    return [
        [i for text, special in segments[p] for i in ([ids_of[text]] if special else by_text[text])] for p in pieces
    ]


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
