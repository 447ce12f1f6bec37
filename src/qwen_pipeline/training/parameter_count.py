"""The wrapped model's parameters, counted on the meta device (no memory): each one's size, whether it trains,
and how many bits bitsandbytes quantizes it to."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import TrainConfig


@dataclass(frozen=True)
class Tensor:
    """One parameter of the wrapped model as training holds it."""

    name: str
    numel: int  # elements before quantization
    rows: int  # first dimension (LLM.int8 keeps one fp32 scale per row)
    trainable: bool
    quantized: int  # 0, 4 or 8 bits (bitsandbytes)


def hf_config(model_dir_or_hf_config):
    """A transformers config: given, or read from a model folder (config.json only)."""
    if not isinstance(model_dir_or_hf_config, (str, os.PathLike)):
        return model_dir_or_hf_config
    from transformers import AutoConfig

    from ..models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(str(model_dir_or_hf_config)))


def meta_model(hf, config: TrainConfig):
    """The model built from its config on the meta device and wrapped as the recipe wraps it (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .recipe import wrap

    with torch.device("meta"):  # on a copy: from_config(dtype=) writes that dtype into the config it is given
        model = AutoModelForCausalLM.from_config(copy.deepcopy(hf), dtype=torch.float32)
        return wrap(model, config)


# Settings that cannot change which parameters exist or train: re-plans that change only these (the advice's)
# reuse the counted model.
NOT_WRAPPING = ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "deepspeed")
NOT_WRAPPING += ("bf16", "fp16", "flash_attn", "pack_length", "memory_check", "nproc_per_node", "nnodes")


def model_tensors(model_dir_or_hf_config, config: TrainConfig) -> list[Tensor]:
    """Every parameter (tied ones once) of the wrapped model: size, trainable, quantized bits."""
    hf = hf_config(model_dir_or_hf_config)
    wrapping = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_WRAPPING}
    return list(_counted(_Key(hf, config, json.dumps(wrapping, sort_keys=True))))


@dataclass(frozen=True)
class _Key:
    hf: Any = field(compare=False, hash=False)
    config: TrainConfig = field(compare=False, hash=False)
    wrapping: str  # what decides the parameters

    @property
    def model(self) -> str:
        return self.hf.to_json_string()

    def __hash__(self) -> int:
        return hash((self.model, self.wrapping))

    def __eq__(self, other) -> bool:
        return isinstance(other, _Key) and (self.model, self.wrapping) == (other.model, other.wrapping)


@functools.lru_cache(maxsize=32)
def _counted(key: _Key) -> tuple[Tensor, ...]:
    config = key.config
    model = meta_model(key.hf, config)
    quantized = quantized_names(key.hf) if config.quantization_bit else set()
    tensors = []
    for name, p in model.named_parameters():
        # PEFT keeps an adapted layer's original module as base_layer: its weight is the one bnb quantized.
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        bits = config.quantization_bit if plain in quantized and not p.requires_grad else 0
        tensors.append(Tensor(name, p.numel(), p.shape[0] if p.dim() else 1, p.requires_grad, bits or 0))
    return tuple(tensors)


def quantized_names(hf) -> set[str]:
    """Weights bitsandbytes quantizes: every plain nn.Linear but what transformers keeps in full precision
    (output head, tied weights, the last module: ``get_keys_to_not_convert``), as transformers decides it."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    with torch.device("meta"):
        bare = AutoModelForCausalLM.from_config(hf)
    keep = get_keys_to_not_convert(bare)
    return {
        f"{name}.weight"
        for name, module in bare.named_modules()
        if type(module) is torch.nn.Linear and should_convert_module(name, keep)
    }
