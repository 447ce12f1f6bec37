"""The qwen template: exact token ids, exact masked positions, LLaMA-Factory's cutoff rule."""

from __future__ import annotations

import pytest

from qwen_pipeline.conversation import Conversation, Message, Source
from qwen_pipeline.template import (
    IGNORE_INDEX as X,
)
from qwen_pipeline.template import (
    TemplateOptions,
    assemble,
    encode_conversations,
    infer_seqlen,
    tokenize_turns,
)

DEFAULT_SYSTEM_IDS = [
    151644,
    8948,
    198,
    2610,
    525,
    1207,
    16948,
    11,
    3465,
    553,
    54364,
    14817,
    13,
    1446,
    525,
    264,
    10950,
    17847,
    13,
    151645,
    198,
]
USER_HI = [
    151644,
    872,
    198,
    6023,
    151645,
    198,
    151644,
    77091,
    198,
]  # <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n
USER_HELLO = [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]
ANSWER_HELLO = [9707, 151645, 198]  # Hello<|im_end|>\n  (im_end and newline are learned)
ANSWER_HI = [6023, 151645, 198]


def conv(*contents: str, system: str | None = None) -> Conversation:
    roles = ["user", "assistant"] * (len(contents) // 2)
    return Conversation(tuple(Message(r, c) for r, c in zip(roles, contents)), Source("d", "f.json", 0), system)


def encode(tokenizer, conversation, **options):
    return encode_conversations([conversation], tokenizer, TemplateOptions(**options))[0]


def test_single_turn_ids_and_mask(tokenizer):
    e = encode(tokenizer, conv("hi", "Hello"))
    assert e.input_ids == DEFAULT_SYSTEM_IDS + USER_HI + ANSWER_HELLO
    assert e.labels == [X] * (len(DEFAULT_SYSTEM_IDS) + len(USER_HI)) + ANSWER_HELLO
    assert not e.truncated


def test_single_turn_equals_apply_chat_template(tokenizer):
    e = encode(tokenizer, conv("hi", "Hello"))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]
    assert e.input_ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]


def test_own_system_prompt_replaces_default_and_empty_falls_back(tokenizer):
    own = encode(tokenizer, conv("hi", "Hello", system="Be brief."))
    system_ids = tokenizer("<|im_start|>system\nBe brief.<|im_end|>\n")["input_ids"]
    assert own.input_ids == system_ids + USER_HI + ANSWER_HELLO
    assert encode(tokenizer, conv("hi", "Hello", system="")).input_ids[: len(DEFAULT_SYSTEM_IDS)] == DEFAULT_SYSTEM_IDS


def test_multi_turn_labels_every_answer(tokenizer):
    e = encode(tokenizer, conv("hi", "Hello", "Hello", "hi"))
    prefix = len(DEFAULT_SYSTEM_IDS) + len(USER_HI)
    assert e.input_ids == DEFAULT_SYSTEM_IDS + USER_HI + ANSWER_HELLO + USER_HELLO + ANSWER_HI
    assert e.labels == [X] * prefix + ANSWER_HELLO + [X] * len(USER_HELLO) + ANSWER_HI


def test_mask_history_labels_only_last_answer(tokenizer):
    e = encode(tokenizer, conv("hi", "Hello", "Hello", "hi"), mask_history=True)
    assert e.input_ids == DEFAULT_SYSTEM_IDS + USER_HI + ANSWER_HELLO + USER_HELLO + ANSWER_HI
    assert e.labels == [X] * (len(e.input_ids) - 3) + ANSWER_HI


def test_train_on_prompt_labels_everything(tokenizer):
    e = encode(tokenizer, conv("hi", "Hello"), train_on_prompt=True)
    assert e.labels == e.input_ids


def test_cutoff_cuts_turns_in_order(tokenizer):
    # turn 0 = 30 source + 3 target tokens; with cutoff 35 turn 1 keeps 2 tokens of its source only
    e = encode(tokenizer, conv("hi", "Hello", "Hello", "hi"), cutoff_len=35)
    assert e.input_ids == DEFAULT_SYSTEM_IDS + USER_HI + ANSWER_HELLO + USER_HELLO[:2]
    assert e.truncated and e.full_length == 45
    assert e.labels[-2:] == [X, X]


def test_cutoff_with_mask_history_cuts_the_earliest_turns(tokenizer):
    e = encode(tokenizer, conv("hi", "Hello", "Hello", "hi"), mask_history=True, cutoff_len=12)
    # last turn visited first: its 9 source and 3 target tokens fill the cutoff; turn 0 is gone
    assert e.input_ids == USER_HELLO + ANSWER_HI
    assert e.labels == [X] * 9 + ANSWER_HI


def test_cutoff_splits_a_long_turn_by_infer_seqlen(tokenizer):
    long_answer = " ".join(["word"] * 60)
    answer_ids = tokenizer(long_answer + "<|im_end|>\n")["input_ids"]
    assert len(answer_ids) == 62  # 60 words + <|im_end|> + newline
    e = encode(tokenizer, conv("hi", long_answer), cutoff_len=40)
    # source 30, target 62, both over half of 40: target gets int(40 * 62 / 92) = 26, source 14
    assert infer_seqlen(30, 62, 40) == (14, 26)
    assert e.input_ids == (DEFAULT_SYSTEM_IDS + USER_HI)[:14] + answer_ids[:26]
    assert e.labels == [X] * 14 + answer_ids[:26]
    assert e.full_length == 92


@pytest.mark.parametrize(
    ("source", "target", "cutoff", "expected"),
    [
        ((3000, 2000, 1000), None, None, (600, 400)),
        ((2000, 3000, 1000), None, None, (400, 600)),
        ((1000, 100, 1000), None, None, (900, 100)),
        ((100, 1000, 1000), None, None, (100, 900)),
        ((100, 500, 1000), None, None, (100, 500)),
        ((500, 100, 1000), None, None, (500, 100)),
        ((10, 10, 1000), None, None, (10, 10)),
    ],
)
def test_infer_seqlen_matches_llamafactory(source, target, cutoff, expected):
    assert infer_seqlen(*source) == expected


def test_braces_in_content_are_kept(tokenizer):
    e = encode(tokenizer, conv('print({"a": 1})', "{content}"))
    assert tokenizer.decode(e.input_ids).endswith(
        'print({"a": 1})<|im_end|>\n<|im_start|>assistant\n{content}<|im_end|>\n'
    )


def test_options_refuse_train_on_prompt_with_mask_history():
    with pytest.raises(ValueError, match="cannot be combined"):
        TemplateOptions(train_on_prompt=True, mask_history=True)


@pytest.mark.parametrize("options", [{}, {"mask_history": True}, {"train_on_prompt": True}])
def test_many_at_once_equals_one_turn_at_a_time_around_the_cutoff(tokenizer, options):
    """Within cutoff_len the ids are taken whole, beyond it cut turn by turn: both as ``assemble``."""
    conversation = conv("hi", "Hello", "what is 2 + 2?", "4, as ever", system="Be brief.")
    full = len(encode(tokenizer, conversation, **options).input_ids)
    for cutoff_len in (full + 1, full, full - 1, 40, 1):
        settings = TemplateOptions(cutoff_len=cutoff_len, **options)
        expected = assemble(tokenize_turns([conversation], tokenizer, "turns")[0], settings)
        assert encode_conversations([conversation], tokenizer, settings)[0] == expected


def test_turns_the_template_cannot_render_name_the_record(tokenizer):
    two_prompts = Conversation((Message("user", "a"), Message("user", "b")), Source("d", "f.json", 3))
    with pytest.raises(ValueError, match=r"f.json record 3 \(dataset 'd'\): turn 0 \(user -> user\) is not supported"):
        encode_conversations([conv("hi", "Hello"), two_prompts], tokenizer, TemplateOptions())
