"""The merge's check: base+adapter (PEFT's own forward) and the merged files give the same logits.

Both models run through a skeleton whose weights are read one block at a time (accelerate's offload hooks;
tied embeddings once per pass), so the check, like the merge, stays near one block of memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .weights import TensorSpec, read_tensor, return_freed_memory, weight_index


class _LazyWeights(Mapping):
    """Parameter name -> tensor, read from the weight files when a block runs (resident ones as they are)."""

    def __init__(self, model: nn.Module, files: dict[str, TensorSpec], loaded: Mapping[str, torch.Tensor]):
        self._names, self._loaded, self._files, self._source = [], loaded, files, {}
        groups: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self._names.append(name)
            groups.setdefault(id(param), []).append(name)
        for aliases in groups.values():  # tied weights: whichever name the files store
            stored = [self._stored(a) for a in aliases if self._stored(a) in files]
            for alias in aliases:
                self._source[alias] = stored[0] if stored else self._stored(alias)
        config = getattr(model, "config", None)
        if getattr(config, "tie_word_embeddings", False):  # the output head may be stored as the embeddings
            names = {id(m): n for n, m in model.named_modules()}
            output, embed = model.get_output_embeddings(), model.get_input_embeddings()
            head, source = f"{names[id(output)]}.weight", self._stored(f"{names[id(embed)]}.weight")
            if self._source.get(head) not in files:
                self._source[head] = source
        sources = list(self._source.values())
        self._shared = {s for s in sources if sources.count(s) > 1}  # read once per forward, not per alias
        self._cache: dict[str, torch.Tensor] = {}

    @staticmethod
    def _stored(name: str) -> str:
        name = name.removeprefix("base_model.model.")
        return name.replace(".base_layer.", ".").replace(".original_module.", ".")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._loaded:
            return self._loaded[name]
        source = self._source.get(name, name)
        if source not in self._files:
            raise KeyError(f"{name}: not in the weight files (looked for {source})")
        if source in self._shared:
            if source not in self._cache:
                self._cache[source] = read_tensor(self._files[source])
            return self._cache[source]
        return read_tensor(self._files[source])

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _blocks(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The units whose weights load together: each layer of a ModuleList, and each other parameter holder."""
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.ModuleList):
            yield from ((f"{full}.{i}", item) for i, item in enumerate(child))
        elif list(child.parameters(recurse=False)):
            yield full, child
        else:
            yield from _blocks(child, full + ".")


def offloaded_model(weights_dir: Path, adapter_dir: Path | None, device: torch.device) -> nn.Module:
    """The model of ``weights_dir`` (+ the adapter, through PEFT) in float32, weights read per block."""
    from accelerate import init_empty_weights
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import PrefixedDataset
    from transformers import AutoConfig, AutoModelForCausalLM

    files = weight_index(weights_dir)
    config = AutoConfig.from_pretrained(weights_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    loaded = {}
    if adapter_dir is not None:
        from peft import PeftConfig, get_peft_model
        from safetensors.torch import load_file

        model = get_peft_model(model, PeftConfig.from_pretrained(str(adapter_dir)))
        saved = load_file(adapter_dir / "adapter_model.safetensors")
        for name, _ in model.named_parameters():
            if ".default." in name:  # the adapter's own tensors, under the names PEFT saves them with
                key = name.replace(".modules_to_save.default.", ".").replace(".default.", ".")
                key = key.removesuffix(".lora_magnitude_vector.weight") + (
                    ".lora_magnitude_vector" if key.endswith(".lora_magnitude_vector.weight") else ""
                )
                if key not in saved:
                    raise KeyError(f"{adapter_dir}: adapter tensor {key} (for {name}) is missing")
                loaded[name] = saved[key].to(torch.float32)
    weights = _LazyWeights(model, files, loaded)
    for name, block in _blocks(model):
        hook = AlignDevicesHook(
            execution_device=device,
            offload=True,
            weights_map=PrefixedDataset(weights, name + "."),
            place_submodules=True,
        )
        add_hook_to_module(block, hook)
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module, inputs: list[list[int]], device: torch.device | None = None) -> list[torch.Tensor]:
    """Logits of each input, all in one forward pass (each pass reads every weight from disk). Right
    padding leaves a causal model's logits at the real positions untouched."""
    width = max(len(ids) for ids in inputs)
    ids = torch.tensor([row + [0] * (width - len(row)) for row in inputs], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in inputs], device=device)
    out = model(input_ids=ids, attention_mask=mask).logits.float().cpu()
    return [out[i, : len(row)] for i, row in enumerate(inputs)]


@dataclass(frozen=True)
class CheckResult:
    max_abs_logit_diff: float
    top1_agreement: float  # share of positions whose most likely next token is the same
    tolerance: float
    tokens: int

    @property
    def passed(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance


def default_tolerance(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest |logit diff| a correct merge may show, on the logits' own scale.

    float32: 0.1% of the largest |logit|. Rounding W + s*BA once and the forward's float32
    arithmetic grow with the activations and the logits: a fixed absolute bound refuses correct
    merges of real models (logits of 20-40). Measured on the tiny model: 1.2e-5 (a LoRA of B std
    0.3) to 2.3e-4 (B std 3, A x3) of the largest logit; one tensor missing or doubling its
    adapter delta moves the logits by percents. 16-bit exports round every weight: 2% of the
    logit range.
    """
    if dtype == torch.float32:
        return max(1e-3 * float(reference.abs().max()), 1e-6)
    return 0.02 * float(reference.max() - reference.min())


def compare_logits(reference: list[torch.Tensor], merged: list[torch.Tensor], tolerance: float | None, dtype):
    ref, got = torch.cat(reference), torch.cat(merged)
    if tolerance is None:
        tolerance = default_tolerance(ref, dtype)
    return CheckResult(
        max_abs_logit_diff=float((ref - got).abs().max()),
        top1_agreement=float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
        tolerance=tolerance,
        tokens=int(ref.shape[0]),
    )


def check_export(
    weights_dir: Path,
    adapter_dir: Path | None,
    out_dir: Path,
    inputs: list[list[int]],
    *,
    tolerance: float | None,
    dtype: torch.dtype,
    device: torch.device,
) -> CheckResult:
    """Logits of the exported model against base+adapter (PEFT's forward), both read block by block."""
    import gc

    return_freed_memory()
    reference = logits(offloaded_model(weights_dir, adapter_dir, device), inputs, device)
    gc.collect()
    merged = logits(offloaded_model(out_dir, None, device), inputs, device)
    return compare_logits(reference, merged, tolerance, dtype)
