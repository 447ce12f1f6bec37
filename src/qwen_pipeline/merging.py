"""Merging a LoRA / DoRA adapter into its base model tensor by tensor, and checking the result.

PEFT's ``merge_and_unload`` needs the whole model in memory, and ``save_pretrained`` then builds each
shard's bytes beside it. Here each base tensor is read, merged with its adapter pieces and written
straight into its shard file, so the merge holds one tensor (plus the small adapter) at a time. The
check runs base+adapter (PEFT's own forward) and then the merged files through a model skeleton whose
weights are read one block at a time (accelerate's offload hooks; tied embeddings once per pass), so it
too stays near one block.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .models import TOKENIZER_FILES

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Where one stored tensor lives and what it is, read from the file header only."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = -1  # where its bytes start in a safetensors file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file, each entry's data_offsets made absolute (from the file start)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    for key, entry in header.items():
        if key != "__metadata__":
            entry["data_offsets"] = [8 + size + offset for offset in entry["data_offsets"]]
    return header


def weight_index(model_dir: Path) -> dict[str, TensorSpec]:
    """Every tensor of a directory's safetensors weights (name -> spec); empty when it has none."""
    model_dir = Path(model_dir)
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin")):
        index = model_dir / f"{stem}.{ext}.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            break
        if (model_dir / f"{stem}.{ext}").is_file():
            files = [f"{stem}.{ext}"]
            break
    else:
        return {}
    specs = {}
    for name in files:
        path = model_dir / name
        if ext == "bin":  # mmap: shapes and dtypes without reading the data
            stored = {
                k: (tuple(t.shape), t.dtype, -1) for k, t in torch.load(path, mmap=True, weights_only=True).items()
            }
        else:
            stored = {
                k: (tuple(v["shape"]), TORCH_DTYPES[v["dtype"]], v["data_offsets"][0])
                for k, v in _header(path).items()
                if k != "__metadata__"
            }
        specs.update({k: TensorSpec(k, path, *entry) for k, entry in stored.items()})
    return specs


def read_tensor(spec: TensorSpec) -> torch.Tensor:
    """One tensor, read straight into its own memory: no file mapping (whose pages would count as the
    process's memory beside the copy), so reading a 600 MB embedding costs 600 MB, not 1.2 GB."""
    if spec.offset < 0:
        return torch.load(spec.file, mmap=True, weights_only=True)[spec.name].clone()
    tensor = torch.empty(spec.shape, dtype=spec.dtype)
    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    with open(spec.file, "rb") as f:
        f.seek(spec.offset)
        if f.readinto(buffer) != spec.nbytes:
            raise OSError(f"{spec.file}: {spec.name} is cut short")
    return tensor


def return_freed_memory() -> None:
    """Make freed tensors leave the process at once (glibc only; elsewhere a no-op).

    glibc serves big allocations with mmap and gives them back on free, but after the first big free it
    raises that threshold (up to 32 MB), so the next layer-sized tensors come from the heap and stay
    resident after they are freed: merging or checking layer after layer, memory then creeps up by
    hundreds of MB. A fixed 1 MB threshold keeps every tensor-sized block returnable.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- writing ---------------------------------------------------------------------------------------


def _write_safetensors(path: Path, entries: list[TensorSpec], produce: Callable[[str], torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor (the library's writer wants them all in memory at once)."""
    header, offset = {}, 0
    for entry in entries:
        header[entry.name] = {
            "dtype": SAFETENSORS_DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data must start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for entry in entries:
            tensor = produce(entry.name).to(entry.dtype).contiguous().cpu()
            if tuple(tensor.shape) != entry.shape:
                raise ValueError(f"{entry.name}: produced shape {tuple(tensor.shape)}, planned {entry.shape}")
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor  # before the next one is read


def write_weights(
    out_dir: Path,
    entries: list[TensorSpec],
    produce: Callable[[str], torch.Tensor],
    *,
    shard_bytes: int,
    legacy: bool = False,
    progress: Callable[[Iterator], Iterator] = iter,
) -> list[str]:
    """Shards of at most ``shard_bytes`` (a bigger single tensor gets a shard of its own), in transformers'
    file names, with an index file when there is more than one. Returns the shard file names."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    stem, ext = ("pytorch_model", "bin") if legacy else ("model", "safetensors")
    names = (
        [f"{stem}.{ext}"]
        if len(shards) == 1
        else [f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}" for i in range(1, len(shards) + 1)]
    )
    for name, shard in progress(list(zip(names, shards))):
        if legacy:  # torch.save needs the shard's tensors together
            torch.save({e.name: produce(e.name).to(e.dtype).contiguous().cpu() for e in shard}, out_dir / name)
        else:
            _write_safetensors(out_dir / name, shard, produce)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in entries)},
            "weight_map": {e.name: name for name, shard in zip(names, shards) for e in shard},
        }
        (out_dir / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


# --- the adapter -----------------------------------------------------------------------------------


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


# --- the check: whole-model logits with the weights read one block at a time ------------------------


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


# --- the whole export ------------------------------------------------------------------------------


def resolve_device(export_device: str) -> torch.device:
    if export_device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if export_device.startswith("cuda") and not torch.cuda.is_available():
        from .config import ConfigError

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
        from .config import ConfigError

        raise ConfigError([f"merge.method: streamed is not possible for this adapter: {reason}"])
    if streamed:
        entries = [
            TensorSpec(n, s.file, s.shape, out_dtype if s.dtype.is_floating_point else s.dtype) for n, s in base.items()
        ]

        def produce(name: str) -> torch.Tensor:
            return merged_tensor(base[name], adapter, device)

    else:
        from peft import PeftModel

        from .models import load_causal_lm

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
