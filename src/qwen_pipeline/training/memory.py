"""The memory plan: what one training process will hold, per device, worked out before any weights load.

Parameter counts are exact: the model is built from its config on the meta device (no memory) and wrapped
by the recipe's own ``wrap`` (LoRA, DoRA, freeze, modules_to_save), so the trainable set is the one training
uses. Bytes follow the recipe's dtype rules (compute dtype c = bf16 / fp16 / fp32):

- without DeepSpeed: trainable weights fp32 (LoRA adapters, PEFT's autocast_adapter_dtype; full / freeze
  master weights), frozen ones in c, 4-bit / 8-bit bitsandbytes layers at their packed size; gradients in
  the trainable weights' dtype; AdamW's exp_avg and exp_avg_sq fp32;
- under DeepSpeed ZeRO stage s over N processes: weights in c (/N at s=3, plus the gathered working set);
  the optimizer's fp32 master (16-bit training only) + exp_avg + exp_avg_sq, /N from s=1; c gradients, /N
  from s=2, plus the reduce bucket and the fp32 gradient partition of 16-bit training; offload moves the
  optimizer side (offload_optimizer) or the weights (offload_param) to host RAM, checked against it;
- activations: what autograd keeps per token and decoder layer (derived below from the Qwen2 layer and
  checked against saved-tensor measurements, benchmarks/memory_plan.py); with gradient checkpointing only
  each layer's input, plus one layer recomputed;
- the loss chunk: the output head runs on at most ``train.loss_chunk_rows`` labelled positions at a time;
- overhead: on CPU the process's resident memory now (imports done, no weights), on CUDA a fixed allowance;
- on CPU the overhead also holds what the host's resident memory (VmHWM) keeps beyond the tensors (measured
  at the 0.5B shape, benchmarks/memory_plan.py; absent on CUDA, where weights and temporaries live in device
  memory; both named in the notes): ``mapped_checkpoint``, the checkpoint bytes of converted weights
  (quantized, or cast to another dtype) that stay in RSS because the safetensors file stays mapped while any
  weight loaded as is views it (``mapped_checkpoint_bytes``); and ``freed_temporaries``, the dense
  per-module temporaries of QLoRA (the dequantized weight) and DoRA (B·A and W + s·BA) that glibc keeps
  resident after they are freed (``freed_temporary_bytes``).

The peak is the sum of the terms: at the first step the optimizer states appear only after the backward, so
this over-counts that step and is exact from the second on. Loading peaks lower (measured: the weights, the
mapped file and the wrap's temporaries, without activations, loss chunk, gradients and optimizer states).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import QwenPipelineError
from .recipe import compute_dtype, zero_optimization

logger = logging.getLogger(__name__)

GIB = 2**30
# CUDA: what the caching allocator, cuBLAS/cuDNN workspaces and NCCL buffers take beyond the tensors (the CUDA
# context itself is already outside mem_get_info's free memory once this process has touched the device).
CUDA_OVERHEAD = 1 * GIB
TERMS = ("weights", "gradients", "optimizer_states", "activations", "loss_chunk", "overhead")
# glibc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit): bigger blocks are always mmapped
# and returned to the OS when freed, smaller ones may be served from the heap once the threshold has risen.
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
# Where the advice's DeepSpeed configs live (the project's own).
DEEPSPEED_DIR = "conf/base/deepspeed"


class MemoryPlanError(QwenPipelineError, MemoryError):
    """A run whose memory plan does not fit the devices (train.memory_check: error)."""


@dataclass(frozen=True)
class Shape:
    """What one micro-batch holds on one device."""

    rows: int  # sequences per micro-batch (per_device_train_batch_size; for packing: bins per batch)
    row_length: int  # tokens per row (the padded length: longest example / cutoff; or pack_length)

    @property
    def tokens(self) -> int:
        return self.rows * self.row_length


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" or "cpu"
    world_size: int
    procs_per_node: int
    zero_stage: int  # 0 = no DeepSpeed / ZeRO-0
    offload_optimizer: bool
    offload_param: bool
    deepspeed: bool = False  # a DeepSpeed config is used (ZeRO-0 included): weights in c, DeepSpeed's optimizer
    zero: dict[str, Any] = field(default_factory=dict, compare=False)  # the JSON's zero_optimization block


def placement_for(config: TrainConfig, *, world_size: int, procs_per_node: int, cuda: bool) -> Placement:
    """Where training runs, read from ``config.deepspeed``'s JSON (zero_optimization)."""
    zero: dict[str, Any] = {}
    if config.deepspeed:
        try:
            zero = zero_optimization(config)
        except (OSError, ValueError) as error:
            raise MemoryPlanError(f"train.deepspeed={config.deepspeed}: cannot read it ({error})") from error

    def offloaded(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") == "cpu"

    return Placement(
        device="cuda" if cuda else "cpu",
        world_size=world_size,
        procs_per_node=procs_per_node,
        zero_stage=int(zero.get("stage", 0)),
        offload_optimizer=offloaded("offload_optimizer"),
        offload_param=offloaded("offload_param"),
        deepspeed=bool(config.deepspeed),
        zero=zero,
    )


# --- the model, counted on the meta device -----------------------------------------------------------------


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


def quantized_bytes(numel: int, rows: int, bits: int) -> int:
    """Bytes of one bitsandbytes weight. nf4 with double quantization: 4 bits a weight, one uint8 absmax per
    64-weight block, one fp32 absmax per 256 blocks, and its lookup tables (16 + 256 fp32 and an fp32 offset).
    LLM.int8: a byte a weight and an fp32 scale per output row."""
    if bits == 4:
        blocks = math.ceil(numel / 64)
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256 + 1)
    return numel + 4 * rows


# --- the plan ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    terms: dict[str, int]  # bytes per device (TERMS)
    host_terms: dict[str, int]  # bytes moved to host RAM by offload (checked against host_available)
    total: int
    available: int
    fits: bool
    host_available: int = 0
    notes: dict[str, str] = field(default_factory=dict)  # dtype, quantization, ZeRO, kernel, counts: for describe
    # What the plan was made from, so advice can re-plan with one setting changed.
    model: Any = field(default=None, repr=False, compare=False)
    config: TrainConfig | None = field(default=None, repr=False, compare=False)
    shape: Shape | None = field(default=None, repr=False, compare=False)
    placement: Placement | None = field(default=None, repr=False, compare=False)

    @property
    def host_total(self) -> int:
        return sum(self.host_terms.values())

    def metrics(self) -> dict[str, float]:
        gb = {f"plan.{k}_gb": v for k, v in self.terms.items()}
        gb |= {f"plan.host_{k}_gb": v for k, v in self.host_terms.items()}
        gb |= {"plan.total_gb": self.total, "plan.available_gb": self.available}
        return {k: round(v / GIB, 3) for k, v in gb.items()} | {"plan.fits": 1.0 if self.fits else 0.0}

    def biggest(self, n: int = 3) -> list[tuple[str, int]]:
        return sorted(self.terms.items(), key=lambda kv: -kv[1])[:n]

    def describe(self) -> str:
        where = f"per {self.notes.get('device', 'device')}"
        lines = [f"Memory plan ({self.notes.get('summary', '')}), {where}:"]
        for name, size in self.terms.items():
            note = self.notes.get(name)
            lines.append(f"  {name:<17} {size / GIB:8.3f} GiB" + (f"  ({note})" if note else ""))
        for name, size in self.host_terms.items():
            lines.append(f"  host {name:<12} {size / GIB:8.3f} GiB  (offloaded to host RAM)")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  total {self.total / GIB:.3f} GiB of {self.available / GIB:.3f} GiB free: {verdict}")
        if self.host_terms:
            lines.append(f"  host {self.host_total / GIB:.3f} GiB of {self.host_available / GIB:.3f} GiB available")
        return "\n".join(lines)

    def advice(self) -> list[str]:
        """Settings that would fit, each checked by planning again with it; for a key tried at several values
        (batch size, length, DeepSpeed config), the first that fits: the largest batch, the least offload."""
        if self.config is None or self.shape is None or self.placement is None:
            return []
        found, settled = [], set()
        for key, config, shape, placement in _alternatives(self.config, self.shape, self.placement):
            if key.split("=", 1)[0] in settled:
                continue
            plan = plan_memory(
                self.model, config, shape, placement, available=self.available, host_available=self.host_available
            )
            if plan.fits:
                found.append(f"{key} (plan {plan.total / GIB:.1f} GiB)")
                settled.add(key.split("=", 1)[0])
        return found


def _alternatives(config: TrainConfig, shape: Shape, placement: Placement):
    """(what to set, config, shape, placement) for each change that lowers the memory a device needs."""
    replace = dataclasses.replace
    if not config.gradient_checkpointing:
        yield "train.gradient_checkpointing=true", replace(config, gradient_checkpointing=True), shape, placement
    for name, offload in (("zero3", False), ("zero3_offload", True)):
        if offload and placement.device == "cpu":
            continue  # the host is the device: nothing to offload to
        if placement.zero_stage < 3 or (offload and not placement.offload_param):
            path = f"{DEEPSPEED_DIR}/{name}.json"
            zero3 = _project_placement(config, placement, path)
            yield f"train.deepspeed={path}", replace(config, deepspeed=path), shape, zero3
    if config.finetuning_type == "lora" and config.quantization_bit != 4:
        yield "train.quantization_bit=4", replace(config, quantization_bit=4), shape, placement
    if config.finetuning_type != "lora":
        yield "train.finetuning_type=lora", replace(config, finetuning_type="lora"), shape, placement
    rows = shape.rows // 2
    while rows >= 1:  # the largest smaller batch that fits; accumulation keeps the global batch
        steps = config.gradient_accumulation_steps * math.ceil(shape.rows / rows)
        key = f"train.per_device_train_batch_size={rows} with train.gradient_accumulation_steps={steps}"
        smaller = replace(config, per_device_train_batch_size=rows, gradient_accumulation_steps=steps)
        yield key, smaller, Shape(rows, shape.row_length), placement
        rows //= 2
    length = shape.row_length // 2
    key = "train.pack_length" if config.packing or config.neat_packing else "format.cutoff_len"
    while length >= 64:
        yield f"{key}={length}", config, Shape(shape.rows, length), placement
        length //= 2


def _project_placement(config: TrainConfig, placement: Placement, path: str) -> Placement:
    """The placement with one of the project's DeepSpeed configs (read from this checkout when it has it)."""
    here = Path(__file__).resolve().parents[3] / path
    if here.is_file():
        chosen = dataclasses.replace(config, deepspeed=str(here))
        return placement_for(
            chosen,
            world_size=placement.world_size,
            procs_per_node=placement.procs_per_node,
            cuda=placement.device == "cuda",
        )
    offload = "offload" in path  # an installed package without conf/: what zero3(_offload).json say
    zero = {"stage": 3, "reduce_bucket_size": "auto", "stage3_max_live_parameters": 1e9}
    return dataclasses.replace(
        placement, zero_stage=3, deepspeed=True, offload_optimizer=offload, offload_param=offload, zero=zero
    )


def plan_memory(
    model_dir_or_hf_config,
    config: TrainConfig,
    shape: Shape,
    placement: Placement,
    *,
    available: int | None = None,
    host_available: int | None = None,
) -> MemoryPlan:
    """Bytes one training process needs on its device, term by term, and whether they fit ``available``
    (default: ``available_memory(placement)``)."""
    hf = hf_config(model_dir_or_hf_config)
    tensors = model_tensors(hf, config)
    c = compute_dtype(config).itemsize
    n = placement.world_size
    ds, stage = placement.deepspeed or placement.zero_stage > 0, placement.zero_stage
    trainable = sum(t.numel for t in tensors if t.trainable)
    sixteen = c < 4

    # Weights: quantized ones at their packed size; under DeepSpeed all others in c; else trainable fp32.
    quantized = sum(quantized_bytes(t.numel, t.rows, t.quantized) for t in tensors if t.quantized)
    plain = [t for t in tensors if not t.quantized]
    if ds:
        weights = sum(t.numel for t in plain) * c
    else:
        weights = sum(t.numel * (4 if t.trainable else c) for t in plain)
    weights += quantized
    host: dict[str, int] = {}
    if ds and stage == 3:
        partitioned = weights // n
        working = _zero3_working_set(hf, placement, tensors) * c
        if placement.offload_param:
            host["weights"], weights = partitioned, working
        else:
            weights = partitioned + working

    # Gradients and optimizer states of what trains.
    if not ds:
        gradients = trainable * 4  # in the trainable weights' dtype: fp32 by the recipe's rules
        optimizer = trainable * 8  # AdamW exp_avg + exp_avg_sq, fp32
        fp32_grads = 0
    else:
        optimizer = trainable * ((4 if sixteen else 0) + 8)  # fp32 master (16-bit only) + exp_avg + exp_avg_sq
        fp32_grads = trainable * 4 if sixteen else 0  # the fp32 gradient the optimizer steps on
        gradients = trainable * c
        if stage >= 1:
            optimizer //= n
            fp32_grads //= n
        if stage >= 2:
            gradients //= n
        if stage >= 1 and placement.zero.get("contiguous_gradients", True):
            gradients += _zero_number(placement.zero.get("reduce_bucket_size"), hf.hidden_size**2, 5e8) * c
        if placement.offload_optimizer:
            host["optimizer_states"], optimizer = optimizer, 0
            host["fp32_gradients"], fp32_grads = fp32_grads, 0
        gradients += fp32_grads

    activations, attention = activation_bytes(hf, config, shape, tensors)
    vocab = hf.vocab_size
    chunk = min(config.loss_chunk_rows, shape.tokens)
    # One chunk's float32 logits, their log-softmax and its gradient (+ the c-dtype logits when 16-bit).
    loss_chunk = chunk * vocab * (3 * 4 + (2 * c if sixteen else 0))
    overhead = CUDA_OVERHEAD if placement.device == "cuda" else resident_bytes()

    terms = {
        "weights": weights,
        "gradients": gradients,
        "optimizer_states": optimizer,
        "activations": activations,
        "loss_chunk": loss_chunk,
        "overhead": overhead,
    }
    cpu_parts = {}
    if placement.device == "cpu":
        trained_fp32 = not ds and c < 4  # upcast_trainable
        cpu_parts["mapped_checkpoint"] = mapped_checkpoint_bytes(hf, config, tensors, trained_fp32=trained_fp32)
        cpu_parts["freed_temporaries"] = freed_temporary_bytes(config, tensors)
        terms["overhead"] += sum(cpu_parts.values())
    total = sum(terms.values())
    if available is None:
        available = available_memory(placement)
    if host_available is None:
        host_available = host_memory(placement) if host else 0
    fits = total <= available and (not host or sum(host.values()) <= host_available)
    total_params = sum(t.numel for t in tensors)
    quant = f"{config.quantization_bit}-bit bitsandbytes" if config.quantization_bit else "none"
    notes = {
        "device": placement.device,
        "summary": (
            f"{config.finetuning_type}{' dora' if config.use_dora else ''}, {trainable:,} trainable of "
            f"{total_params:,} parameters, {shape.rows} x {shape.row_length} tokens, "
            + (f"ZeRO-{stage} over {n}" if ds else f"no DeepSpeed, {n} process(es)")
            + (", offload optimizer" if placement.offload_optimizer else "")
            + (", offload params" if placement.offload_param else "")
        ),
        "weights": f"compute {str(compute_dtype(config)).removeprefix('torch.')}, quantization {quant}"
        + ("" if ds else ", trainable fp32"),
        "gradients": "fp32 of trainable" if not ds else f"c-dtype{' /N' if stage >= 2 else ''} + reduce bucket",
        "optimizer_states": "AdamW exp_avg + exp_avg_sq fp32" + (" + fp32 master" if ds and sixteen else ""),
        "activations": f"{attention}, gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}",
        "loss_chunk": f"{chunk} positions x {vocab:,} vocab",
        "overhead": "CUDA allocator/workspaces allowance"
        if placement.device == "cuda"
        else f"this process's RSS now {overhead / GIB:.3f} GiB"
        + "".join(f" + {name.replace('_', ' ')} {size / GIB:.3f} GiB" for name, size in cpu_parts.items()),
    }
    return MemoryPlan(terms, host, total, available, fits, host_available, notes, hf, config, shape, placement)


def _checkpoint_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """The wrapped model's parameters that come from the checkpoint: not adapters, not PEFT's trained copies."""
    return [t for t in tensors if ".lora_" not in t.name and ".modules_to_save." not in t.name]


def mapped_checkpoint_bytes(hf, config: TrainConfig, tensors: list[Tensor], *, trained_fp32: bool) -> int:
    """Checkpoint bytes of converted weights that stay in the host's RSS (CPU).

    transformers maps the safetensors file and keeps a weight whose dtype it already has as a view of the
    mapping; one that it converts (bitsandbytes-quantized, or cast to the compute dtype, or the trained ones
    upcast to float32) is read through the mapping once and copied. The file stays mapped while any view
    lives, and every page read stays in RSS: measured at the 0.5B shape in float32, QLoRA held the linears'
    1.37 GiB of float32 source beside their 4-bit copies (the embedding kept it mapped). When every weight is
    converted (a float32 checkpoint trained in bf16) the mapping is gone after loading: nothing."""
    import torch

    stored = getattr(hf, "dtype", None) or torch.float32  # what config.json says the checkpoint holds
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    c = compute_dtype(config)

    def converted(t: Tensor) -> bool:
        held = torch.float32 if t.trainable and trained_fp32 else c  # upcast_trainable's rule
        return bool(t.quantized) or held != stored

    checkpoint = _checkpoint_tensors(tensors)
    if all(converted(t) for t in checkpoint):
        return 0
    return sum(t.numel for t in checkpoint if converted(t)) * stored.itemsize


def freed_temporary_bytes(config: TrainConfig, tensors: list[Tensor]) -> int:
    """Freed per-module temporaries that glibc keeps in the host's RSS (CPU).

    On CPU, bitsandbytes' 4-bit matmul dequantizes each weight to the compute dtype for every forward (and
    backward), and DoRA builds B·A and W + s·BA in float32 for each adapted module (in PEFT's weight-norm
    initialisation and again in every forward). Once glibc has freed one such mmapped block, its dynamic mmap
    threshold rises to that size (at most 32 MiB), later blocks come from the heap, and the holes they leave
    between the activations saved around them stay resident. Measured at the 0.5B shape (float32): the
    peak went down to the other terms with ``MALLOC_MMAP_THRESHOLD_=131072`` (a fixed threshold); with the
    default it held about one dense weight per adapted module per pass that builds them: QLoRA +0.75 GiB
    (1.37 GiB of dense linears, counted once: the forward), DoRA +3.4 GiB (counted twice: the weight-norm
    initialisation and the forward). Weights over 32 MiB are always mmapped and returned, so they count nothing.
    """
    if config.finetuning_type == "lora" and config.use_dora:
        adapted = {t.name.split(".lora_magnitude_vector", 1)[0] for t in tensors if ".lora_magnitude_vector" in t.name}
        dense = [4 * t.numel for t in tensors if t.name.removesuffix(".base_layer.weight") in adapted]
        passes = 2
    elif config.quantization_bit == 4:
        dense = [compute_dtype(config).itemsize * t.numel for t in tensors if t.quantized == 4]
        passes = 1
    else:
        return 0
    return passes * sum(size for size in dense if size <= GLIBC_MMAP_THRESHOLD_MAX)


def _zero_number(value, auto: int, default: float) -> int:
    """A ZeRO size from the JSON: a number, "auto" (what transformers fills in), or unset (DeepSpeed's default)."""
    if value == "auto":
        return int(auto)
    return int(value if value is not None else default)


def _zero3_working_set(hf, placement: Placement, tensors: list[Tensor]) -> int:
    """Parameters ZeRO-3 holds gathered at once: the largest module being run (the embedding / head, gathered
    for each loss chunk) and the next decoder layer prefetched, capped by stage3_max_live_parameters."""
    layer_params = sum(t.numel for t in tensors if ".layers.0." in t.name)
    largest = max((t.numel for t in tensors), default=0)
    cap = _zero_number(placement.zero.get("stage3_max_live_parameters"), int(1e9), 1e9)
    return min(largest + 2 * layer_params, cap)


def activation_bytes(hf, config: TrainConfig, shape: Shape, tensors: list[Tensor]) -> tuple[int, str]:
    """What autograd keeps for the backward of one micro-batch, and the attention kernel's name.

    Per token and decoder layer, with c the compute dtype's bytes (saved tensors of the Qwen2 layer):
    each RMSNorm keeps its float32 input and rsqrt, and its c output (a trained norm keeps it for its weight's
    gradient; a frozen one still feeds a trained linear); attention keeps q, k, v (k and v repeated to all
    heads unless FlashAttention-2), its output and the log-sum-exp, and o_proj's input; the MLP keeps gate and
    up outputs, SiLU's output and the product (down_proj's input). LoRA adds each adapter's rank-r middle;
    DoRA each adapted module's base and LoRA outputs. Eager attention adds the float32 softmax and its c
    copy, [heads x L] per token. Frozen layers that no gradient passes through keep nothing.
    """
    c = compute_dtype(config).itemsize
    h, i = hf.hidden_size, hf.intermediate_size
    heads, kv_heads = hf.num_attention_heads, hf.num_key_value_heads
    head_dim = getattr(hf, "head_dim", None) or h // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    layers = hf.num_hidden_layers
    kernel = {"fa2": "flash_attention_2", "disabled": "eager"}.get(config.flash_attn, "sdpa")
    kv_saved = kv_dim if kernel == "flash_attention_2" else q_dim

    # norms: float32 input + rsqrt each, their c outputs (read by the next linears)
    per_token = 2 * (4 * h + 4) + 2 * h * c
    # attention: q, k, v, the output and o_proj's input (a copy: transposed back), log-sum-exp per head
    per_token += (2 * q_dim + 2 * kv_saved + q_dim) * c + 4 * heads
    per_token += 4 * i * c  # MLP: gate, up, SiLU(gate), the product
    if config.finetuning_type != "lora":  # trained norm weights also keep the normalised input
        per_token += 2 * h * c
    if kernel == "eager":
        per_token += heads * shape.row_length * (4 + c)
    if config.finetuning_type == "lora":
        rank = config.lora_rank
        adapted = {t.name.rsplit(".lora_A", 1)[0] for t in tensors if ".lora_A." in t.name and ".layers.0." in t.name}
        per_token += len(adapted) * rank * c
        if config.use_dora:
            outputs = {"q_proj": q_dim, "k_proj": kv_dim, "v_proj": kv_dim, "o_proj": h, "gate_proj": i}
            outputs |= {"up_proj": i, "down_proj": h}
            per_token += sum(2 * outputs.get(name.rsplit(".", 1)[-1], h) * c for name in adapted)

    tokens = shape.tokens
    backpropagated = layers
    if config.finetuning_type == "freeze" and config.freeze_trainable_layers > 0:
        backpropagated = min(config.freeze_trainable_layers, layers)  # the layers below need no gradient
    if config.gradient_checkpointing:
        kept = tokens * (backpropagated * h * c + per_token)  # each layer's input + one layer recomputed
    else:
        kept = tokens * backpropagated * per_token
    head_input = tokens * (4 * h + 4 + 2 * h * c)  # final norm + the labelled states the head reads
    return kept + head_input, kernel + ("" if kernel != "sdpa" else " (k, v repeated: masked batches)")


# --- what is free ----------------------------------------------------------------------------------------------


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise MemoryPlanError(f"/proc/meminfo has no {key}: cannot tell how much memory is free (train.memory_check=off)")


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def host_memory(placement: Placement) -> int:
    """Host RAM one process may use: MemAvailable shared by the node's processes."""
    return _meminfo("MemAvailable") // max(placement.procs_per_node, 1)


def available_memory(placement: Placement) -> int:
    """Bytes one process may use on its device: the smallest free memory over the visible GPUs, or on CPU
    MemAvailable shared by the node's processes (plus this process's own resident memory when it is the one
    that trains, since the plan counts that as overhead)."""
    if placement.device == "cuda":
        import torch

        return min(torch.cuda.mem_get_info(d)[0] for d in range(torch.cuda.device_count()))
    own = resident_bytes() if placement.procs_per_node == 1 else 0
    return host_memory(placement) + own


def check_memory(plan: MemoryPlan, mode: str) -> None:
    """error: raise when the plan does not fit, in one message; warn: log the same; off: nothing."""
    if mode == "off" or plan.fits:
        return
    biggest = ", ".join(f"{name} {size / GIB:.2f} GiB" for name, size in plan.biggest())
    message = (
        f"memory plan: {plan.total / GIB:.2f} GiB per {plan.notes.get('device', 'device')} needed, "
        f"{plan.available / GIB:.2f} GiB available; biggest: {biggest}"
    )
    if plan.host_terms and plan.host_total > plan.host_available:
        message += f"; offloaded {plan.host_total / GIB:.2f} GiB of {plan.host_available / GIB:.2f} GiB host RAM"
    advice = plan.advice()
    message += (
        ". Settings that would fit: " + "; ".join(advice)
        if advice
        else ". No single setting makes it fit: combine them, use more or larger devices"
    )
    message += " (train.memory_check=warn to try anyway)"
    if mode == "warn":
        logger.warning(message)
        return
    raise MemoryPlanError(message)
