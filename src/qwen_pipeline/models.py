"""Where models come from: a hub id, a local directory, or the embedded default (``embedded.py``), and how
they load: the tokenizer (with its fingerprint and the files that decide it) and the causal LM.
"""

from __future__ import annotations

from pathlib import Path

from .embedded import EMBEDDED_MODEL, ensure_embedded_model


def resolve_model_path(model_name_or_path: str) -> str:
    """A hub id or local directory is returned as is; the embedded name is built/cached."""
    if model_name_or_path == EMBEDDED_MODEL:
        return str(ensure_embedded_model())
    if model_name_or_path.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {model_name_or_path!r}; the embedded one is {EMBEDDED_MODEL!r}")
    return model_name_or_path


def local_model_dir(model_name_or_path: str) -> Path:
    """The local directory holding a model: the embedded one, a directory, or a hub id already downloaded."""
    path = Path(resolve_model_path(model_name_or_path))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_name_or_path, local_files_only=True))
    except Exception as error:  # noqa: BLE001 - any failure means "not here"
        raise FileNotFoundError(
            f"model {model_name_or_path!r} is neither a local directory nor in the Hugging Face cache "
            f"(no network is used: download it first, or point model.model_name_or_path at a directory)"
        ) from error


def load_tokenizer(model_name_or_path: str, *, trust_remote_code: bool = False, use_fast: bool = True):
    from transformers import AutoTokenizer

    path = resolve_model_path(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, use_fast=use_fast)
    if tokenizer.pad_token is None:  # as LLaMA-Factory: pad falls back to eos
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# What decides a tokenizer's ids and the chat template it carries, by file name: hashed into the tokenized
# data's fingerprint (``tokenizer_fingerprint``) and copied beside a merged model (``merging``).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_fingerprint(model_name_or_path: str, *, trust_remote_code: bool = False, use_fast: bool = True) -> str:
    """A hash of the tokenizer that ``load_tokenizer`` would load: its files when the model is a local
    folder (nothing is loaded: a rerun that reuses its data learns it in milliseconds), else the
    loaded tokenizer's serialisation."""
    import hashlib

    digest = hashlib.sha256(f"{trust_remote_code}{use_fast}".encode())
    path = Path(resolve_model_path(model_name_or_path))
    if path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                digest.update(name.encode() + b"\0" + (path / name).read_bytes())
    else:
        tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code, use_fast=use_fast)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        digest.update(backend.to_str().encode() if backend is not None else repr(tokenizer).encode())
    return digest.hexdigest()


def load_causal_lm(model_name_or_path: str, *, dtype: str = "float32", trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_name_or_path)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype) if dtype != "auto" else "auto", trust_remote_code=trust_remote_code
    )
