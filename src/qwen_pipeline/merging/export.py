"""The whole export: the merged weights, in the export dtype and device, beside the config, generation config and
tokenizer files a user loads them with."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from ..models import TOKENIZER_FILES
from .lora import merged_tensor, read_adapter
from .weights import TensorSpec, return_freed_memory, weight_index, write_weights

logger = logging.getLogger(__name__)


def resolve_device(export_device: str) -> torch.device:
    if export_device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if export_device.startswith("cuda") and not torch.cuda.is_available():
        from ..config import ConfigError

        raise ConfigError([f"merge.export_device: {export_device} asked for, but this machine has no CUDA device"])
    return torch.device(export_device)


def export_dtype(name: str, weights_dir: Path, base: Mapping[str, TensorSpec]) -> torch.dtype:
    """``auto``: the dtype the base model declares (else stores); float32 when it says nothing."""
    if name != "auto":
        return getattr(torch, name)
    config = json.loads((weights_dir / "config.json").read_text())
    declared = config.get("dtype") or config.get("torch_dtype")
    if isinstance(declared, str) and isinstance(getattr(torch, declared, None), torch.dtype):
        return getattr(torch, declared)
    stored = [s.dtype for s in base.values() if s.dtype.is_floating_point]
    return stored[0] if stored else torch.float32


def special_token_ids(tokenizer_dir: Path) -> dict[str, int | None]:
    """<|im_end|>, eos and pad ids, read from the tokenizer files: special tokens are the added tokens
    of tokenizer.json (loading a tokenizer takes seconds; this, a tenth of one)."""
    from tokenizers import Tokenizer

    added = {t["content"]: t["id"] for t in json.loads((tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]}
    settings = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    wanted = [settings.get("eos_token"), settings.get("pad_token"), "<|im_end|>"]
    wanted = [w.get("content") if isinstance(w, dict) else w for w in wanted]
    tokenizer = None
    if any(isinstance(w, str) and w not in added for w in wanted):  # a special token that is a plain token
        tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))

    def token(value) -> int | None:
        value = value.get("content") if isinstance(value, dict) else value
        if not isinstance(value, str):
            return None
        return added[value] if value in added else tokenizer.token_to_id(value)

    return {
        "im_end": token("<|im_end|>"),
        "eos": token(settings.get("eos_token")),
        "pad": token(settings.get("pad_token")) or token(settings.get("eos_token")),
    }


def write_model_files(out_dir: Path, weights_dir: Path, tokenizer_dir: Path, dtype: torch.dtype) -> list[int]:
    """config.json in the export dtype, the tokenizer files, and a generation config that stops at
    <|im_end|> as well as the base model's own eos (a base model's config alone never stops a chat answer)."""
    import shutil

    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(weights_dir)
    config.dtype = dtype
    config.save_pretrained(out_dir)
    try:
        generation = GenerationConfig.from_pretrained(weights_dir)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    ids = special_token_ids(tokenizer_dir)
    eos = generation.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    for token_id in (ids["im_end"], ids["eos"]):
        if token_id is not None and token_id not in eos:
            eos.append(token_id)
    generation.eos_token_id = eos
    generation.pad_token_id = ids["pad"]
    generation.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    return eos


def export_merged(
    weights_dir: Path,
    adapter_dir: Path | None,
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    dtype: str = "auto",
    shard_bytes: int = 5 * 10**9,
    legacy: bool = False,
    method: str = "auto",
    device: torch.device = torch.device("cpu"),
) -> dict:
    """Write ``weights_dir`` (+ the adapter merged in) to ``out_dir``; returns what was done."""
    from tqdm.auto import tqdm

    return_freed_memory()
    base = weight_index(weights_dir)
    out_dtype = export_dtype(dtype, weights_dir, base)
    if adapter_dir is not None:
        adapter, reason = read_adapter(adapter_dir, base)
    else:
        adapter, reason = None, ("" if base else "the model directory has no weight files")
    streamed = method == "streamed" or (method == "auto" and not reason)
    if streamed and reason:
        from ..config import ConfigError

        raise ConfigError([f"merge.method: streamed is not possible for this adapter: {reason}"])
    if streamed:
        entries = [
            TensorSpec(n, s.file, s.shape, out_dtype if s.dtype.is_floating_point else s.dtype) for n, s in base.items()
        ]

        def produce(name: str) -> torch.Tensor:
            return merged_tensor(base[name], adapter, device)

    else:
        from peft import PeftModel

        from ..models import load_causal_lm

        logger.info("Merging in memory (%s)", reason or "merge.method: in_memory")
        model = load_causal_lm(str(weights_dir), dtype="float32").to(device)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        state, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() not in seen:  # tied weights are stored once
                seen.add(tensor.data_ptr())
                state[name] = tensor
        entries = [
            TensorSpec(n, Path(), tuple(t.shape), out_dtype if t.is_floating_point() else t.dtype)
            for n, t in state.items()
        ]
        produce = state.__getitem__
    files = write_weights(
        out_dir,
        entries,
        produce,
        shard_bytes=shard_bytes,
        legacy=legacy,
        progress=lambda items: tqdm(items, desc="Writing merged shards", unit="shard"),
    )
    eos = write_model_files(out_dir, weights_dir, tokenizer_dir, out_dtype)
    return {
        "method": "streamed" if streamed else "in_memory",
        "why_in_memory": None if streamed else (reason or "merge.method: in_memory"),
        "merged_tensors": len(adapter.lora) + len(adapter.replace) if adapter else None,
        "export_dtype": str(out_dtype).removeprefix("torch."),
        "export_device": str(device),
        "files": files,
        "total_bytes": sum(e.nbytes for e in entries),
        "eos_token_id": eos,
    }
