"""The byte formulas behind the memory plan's terms that need more than a product: bitsandbytes' packed weights,
ZeRO's sizes, autograd's saved activations, and what the host's RSS keeps beyond the tensors on CPU."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..config import TrainConfig
from .recipe import compute_dtype

if TYPE_CHECKING:
    from .memory import Shape
    from .parameter_count import Tensor
    from .placement import Placement

# glibc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit): bigger blocks are always mmapped
# and returned to the OS when freed, smaller ones may be served from the heap once the threshold has risen.
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20


def quantized_bytes(numel: int, rows: int, bits: int) -> int:
    """Bytes of one bitsandbytes weight. nf4 with double quantization: 4 bits a weight, one uint8 absmax per
    64-weight block, one fp32 absmax per 256 blocks, and its lookup tables (16 + 256 fp32 and an fp32 offset).
    LLM.int8: a byte a weight and an fp32 scale per output row."""
    if bits == 4:
        blocks = math.ceil(numel / 64)
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256 + 1)
    return numel + 4 * rows


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


def zero_number(value, auto: int, default: float) -> int:
    """A ZeRO size from the JSON: a number, "auto" (what transformers fills in), or unset (DeepSpeed's default)."""
    if value == "auto":
        return int(auto)
    return int(value if value is not None else default)


def zero3_working_set(hf, placement: Placement, tensors: list[Tensor]) -> int:
    """Parameters ZeRO-3 holds gathered at once: the largest module being run (the embedding / head, gathered
    for each loss chunk) and the next decoder layer prefetched, capped by stage3_max_live_parameters."""
    layer_params = sum(t.numel for t in tensors if ".layers.0." in t.name)
    largest = max((t.numel for t in tensors), default=0)
    cap = zero_number(placement.zero.get("stage3_max_live_parameters"), int(1e9), 1e9)
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
