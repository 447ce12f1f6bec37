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

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from .host_memory import resident_bytes
from .memory_terms import (
    activation_bytes,
    freed_temporary_bytes,
    mapped_checkpoint_bytes,
    quantized_bytes,
    zero3_working_set,
    zero_number,
)
from .parameter_count import Tensor as Tensor  # re-exported: the plan's unit, tests build them
from .parameter_count import hf_config, model_tensors
from .placement import MemoryPlanError, Placement, available_memory, host_memory, placement_for
from .recipe import compute_dtype

logger = logging.getLogger(__name__)

GIB = 2**30
# CUDA: what the caching allocator, cuBLAS/cuDNN workspaces and NCCL buffers take beyond the tensors (the CUDA
# context itself is already outside mem_get_info's free memory once this process has touched the device).
CUDA_OVERHEAD = 1 * GIB
TERMS = ("weights", "gradients", "optimizer_states", "activations", "loss_chunk", "overhead")
# Where the advice's DeepSpeed configs live (the project's own).
DEEPSPEED_DIR = "conf/base/deepspeed"


@dataclass(frozen=True)
class Shape:
    """What one micro-batch holds on one device."""

    rows: int  # sequences per micro-batch (per_device_train_batch_size; for packing: bins per batch)
    row_length: int  # tokens per row (the padded length: longest example / cutoff; or pack_length)

    @property
    def tokens(self) -> int:
        return self.rows * self.row_length


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
        working = zero3_working_set(hf, placement, tensors) * c
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
            gradients += zero_number(placement.zero.get("reduce_bucket_size"), hf.hidden_size**2, 5e8) * c
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
