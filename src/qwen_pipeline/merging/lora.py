"""A PEFT LoRA / DoRA adapter read from its folder, and merged into one base tensor at a time."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .weights import TensorSpec, read_tensor


@dataclass
class Adapter:
    """A PEFT LoRA adapter's tensors, keyed by the base tensor each one changes."""

    scaling: float
    lora: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> {"A", "B", "m" (DoRA)}
    replace: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save: whole new tensors


def read_adapter(adapter_dir: Path, base: Mapping[str, TensorSpec]) -> tuple[Adapter | None, str]:
    """The adapter, or None and the reason it cannot be merged tensor by tensor."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = adapter_dir / "adapter_model.safetensors"
    if config.get("peft_type") != "LORA":
        return None, f"adapter type {config.get('peft_type')} (only LoRA / DoRA merge tensor by tensor)"
    for key in ("rank_pattern", "alpha_pattern", "fan_in_fan_out", "lora_bias", "trainable_token_indices"):
        if config.get(key):
            return None, f"adapter option {key}"
    if not weights.is_file():
        return None, "adapter weights are not safetensors"
    if not base:
        return None, "the base directory has no weight files"
    rank, alpha = config["r"], config["lora_alpha"]
    adapter = Adapter(scaling=alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank)
    parts = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m"}
    for key, tensor in load_file(weights).items():
        name = key.removeprefix("base_model.model.")
        suffix = next((s for s in parts if name.endswith(s)), None)
        if suffix:
            adapter.lora.setdefault(name[: -len(suffix)] + ".weight", {})[parts[suffix]] = tensor
        elif "lora_" in name:
            return None, f"adapter tensor {key}"
        else:
            adapter.replace[name] = tensor
    for name, pieces in adapter.lora.items():
        if name not in base:
            return None, f"the adapter changes {name}, which the base does not store (tied weights?)"
        if "A" not in pieces or "B" not in pieces or len(base[name].shape) != 2:
            return None, f"{name} is not a plain LoRA linear layer"
    for name in adapter.replace:
        if name not in base:
            return None, f"the adapter replaces {name}, which the base does not store"
    return adapter, ""


def merged_tensor(spec: TensorSpec, adapter: Adapter | None, device: torch.device) -> torch.Tensor:
    """W + scaling * B @ A, and for DoRA each output row rescaled to its learned magnitude (PEFT's merge)."""
    if adapter is not None and spec.name in adapter.replace:
        return adapter.replace[spec.name]
    weight = read_tensor(spec)
    pieces = adapter.lora.get(spec.name) if adapter is not None else None
    if pieces is None:
        return weight
    weight = weight.to(device, torch.float32)
    weight.addmm_(pieces["B"].to(device, torch.float32), pieces["A"].to(device, torch.float32), alpha=adapter.scaling)
    if "m" in pieces:
        weight *= (pieces["m"].to(device, torch.float32) / torch.linalg.norm(weight, dim=1)).unsqueeze(1)
    return weight
