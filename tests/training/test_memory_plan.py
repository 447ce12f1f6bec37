"""The memory plan (training/memory.py): exact counts from the config alone, byte terms per mode and ZeRO stage,
the advice, and the check's one message."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import pytest
import torch
from helpers import PROJECT_ROOT

from qwen_pipeline.config import TrainConfig
from qwen_pipeline.errors import QwenPipelineError
from qwen_pipeline.training.memory import (
    CUDA_OVERHEAD,
    GIB,
    MemoryPlanError,
    Placement,
    Shape,
    check_memory,
    model_tensors,
    placement_for,
    plan_memory,
    quantized_bytes,
)

DEEPSPEED = PROJECT_ROOT / "conf" / "base" / "deepspeed"
SHAPE = Shape(rows=2, row_length=128)
# The embedded model: 151,936 x 64 tied embedding, 2 layers of hidden 64, intermediate 256, 4 heads, 2 kv heads.
EMBEDDED_PARAMETERS = 9_847_360


def gpu(world_size: int = 1, stage: int = 0, **kwargs) -> Placement:
    """A CUDA placement (fixed overhead: nothing here asks a GPU anything when ``available`` is given)."""
    return Placement("cuda", world_size, min(world_size, 8), stage, False, False, deepspeed=stage > 0, **kwargs)


def measured_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def quant_tensors(state):
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif hasattr(value, "absmax"):
            yield from quant_tensors(value)


def real_weights(model):
    for p in model.parameters():
        yield p
        if getattr(p, "quant_state", None) is not None:
            yield from quant_tensors(p.quant_state)
        yield getattr(p, "SCB", None)


@pytest.fixture(scope="module")
def hf(embedded_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(embedded_dir)


@pytest.fixture(scope="module")
def qwen05b():
    """Qwen2.5-0.5B's config (no weights anywhere)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )


MODES = {
    "lora": TrainConfig(),
    "dora": TrainConfig(use_dora=True, use_rslora=True, lora_rank=4),
    "lora_q_v": TrainConfig(lora_target=["q_proj", "v_proj"], additional_target=["embed_tokens"]),
    "qlora4": TrainConfig(quantization_bit=4),
    "qlora8": TrainConfig(quantization_bit=8),
    "full": TrainConfig(finetuning_type="full"),
    "freeze": TrainConfig(finetuning_type="freeze", freeze_trainable_layers=1),
    "freeze_first": TrainConfig(finetuning_type="freeze", freeze_trainable_layers=-1),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_counts_and_weight_bytes_match_the_real_wrapped_model(embedded_dir, mode):
    """Counted on the meta device from config.json alone == the loaded, wrapped model; the planned weight bytes
    (quantized layers included) == the bytes of its tensors."""
    from qwen_pipeline.config import ModelConfig
    from qwen_pipeline.training.recipe import load_model, wrap

    config = MODES[mode]
    tensors = model_tensors(embedded_dir, config)
    model = wrap(load_model(ModelConfig(str(embedded_dir)), config), config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel for t in tensors if t.trainable) == trainable
    assert [t.name for t in tensors] == [name for name, _ in model.named_parameters()]
    plan = plan_memory(embedded_dir, config, SHAPE, gpu(), available=80 * GIB)
    assert plan.terms["weights"] == measured_bytes(real_weights(model))
    assert plan.terms["gradients"] == 4 * trainable and plan.terms["optimizer_states"] == 8 * trainable


def test_exact_counts_per_mode(embedded_dir):
    def counts(config):
        tensors = model_tensors(embedded_dir, config)
        return sum(t.numel for t in tensors if t.trainable), sum(t.numel for t in tensors if t.quantized)

    # LoRA r8 on the 7 linears of 2 layers: r * (in + out) each.
    lora = 2 * 8 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 256) * 2 + (256 + 64))
    assert counts(MODES["lora"]) == (lora, 0)
    assert counts(MODES["qlora4"]) == (lora, 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 256 * 3))
    assert counts(MODES["full"]) == (EMBEDDED_PARAMETERS, 0)


def test_quantized_bytes():
    # nf4: 4 bits, an 8-bit absmax per 64, an fp32 absmax per 256 blocks, the 16 + 256 + 1 fp32 tables.
    assert quantized_bytes(4864 * 896, 4864, 4) == 4864 * 896 // 2 + 68096 + 4 * 266 + 4 * 273
    assert quantized_bytes(4864 * 896, 4864, 8) == 4864 * 896 + 4 * 4864  # LLM.int8: + an fp32 scale per row


def test_byte_terms_by_mode_and_zero_stage(qwen05b):
    params = 494_032_768  # Qwen2.5-0.5B, tied embedding once
    full = TrainConfig(finetuning_type="full")
    base = plan_memory(qwen05b, full, SHAPE, gpu(), available=80 * GIB)
    assert (base.terms["weights"], base.terms["gradients"], base.terms["optimizer_states"]) == (
        4 * params,
        4 * params,
        8 * params,
    )
    assert base.terms["overhead"] == CUDA_OVERHEAD
    assert base.total == sum(base.terms.values())

    bf16 = dataclasses.replace(full, bf16=True)
    no_ds = plan_memory(qwen05b, bf16, SHAPE, gpu(), available=80 * GIB)
    assert no_ds.terms["weights"] == 4 * params  # every weight trains: fp32 master weights, no DeepSpeed
    bucket = 5 * 10**8 * 2  # zero2.json: reduce_bucket_size 5e8 elements in bf16
    for world in (2, 8):
        zero2 = placement_for(dataclasses.replace(bf16, deepspeed=str(DEEPSPEED / "zero2.json")), **_where(world))
        plan = plan_memory(qwen05b, bf16, SHAPE, zero2, available=80 * GIB)
        assert plan.terms["weights"] == 2 * params
        assert plan.terms["optimizer_states"] == 12 * params // world  # fp32 master + exp_avg + exp_avg_sq
        assert plan.terms["gradients"] == 2 * params // world + bucket + 4 * params // world

        zero3 = placement_for(dataclasses.replace(bf16, deepspeed=str(DEEPSPEED / "zero3.json")), **_where(world))
        plan3 = plan_memory(qwen05b, bf16, SHAPE, zero3, available=80 * GIB)
        embedding, layer = 151936 * 896, 14_912_384
        assert plan3.terms["weights"] == 2 * params // world + 2 * (embedding + 2 * layer)  # + the gathered set
        assert plan3.terms["optimizer_states"] == plan.terms["optimizer_states"]
        assert plan3.terms["gradients"] == 2 * params // world + 896 * 896 * 2 + 4 * params // world  # bucket: auto

    offload = placement_for(dataclasses.replace(bf16, deepspeed=str(DEEPSPEED / "zero3_offload.json")), **_where(8))
    plan = plan_memory(qwen05b, bf16, SHAPE, offload, available=80 * GIB, host_available=64 * GIB)
    assert plan.terms["optimizer_states"] == 0
    assert plan.host_terms == {
        "weights": 2 * params // 8,
        "optimizer_states": 12 * params // 8,
        "fp32_gradients": 4 * params // 8,
    }

    lora = plan_memory(qwen05b, TrainConfig(bf16=True), SHAPE, gpu(), available=80 * GIB)
    trainable = 4_399_104  # r8 on q, k, v, o, gate, up, down of 24 layers
    assert lora.terms["gradients"] == 4 * trainable and lora.terms["optimizer_states"] == 8 * trainable
    assert lora.terms["weights"] == 2 * params + 4 * trainable  # frozen base in bf16, adapters fp32
    qlora = plan_memory(qwen05b, TrainConfig(bf16=True, quantization_bit=4), SHAPE, gpu(), available=80 * GIB)
    linears = [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864)]
    quantized = 24 * sum(quantized_bytes(out * into, out, 4) for out, into in linears)
    plain = params - 24 * sum(out * into for out, into in linears)  # embedding, norms, biases: bf16
    assert qlora.terms["weights"] == quantized + 2 * plain + 4 * trainable


def _where(world: int) -> dict:
    return {"world_size": world, "procs_per_node": min(world, 8), "cuda": True}


def test_placement_reads_the_deepspeed_json():
    config = TrainConfig(deepspeed=str(DEEPSPEED / "zero3_offload.json"))
    placement = placement_for(config, world_size=4, procs_per_node=4, cuda=True)
    assert (placement.zero_stage, placement.offload_optimizer, placement.offload_param) == (3, True, True)
    assert placement_for(TrainConfig(), world_size=1, procs_per_node=1, cuda=False) == Placement(
        "cpu", 1, 1, 0, False, False
    )
    with pytest.raises(MemoryPlanError, match="train.deepspeed=missing.json: cannot read it"):
        placement_for(TrainConfig(deepspeed="missing.json"), world_size=1, procs_per_node=1, cuda=False)


def test_activations_grow_with_tokens_and_shrink_with_checkpointing(qwen05b):
    config = TrainConfig(bf16=True, flash_attn="fa2")
    small = plan_memory(qwen05b, config, Shape(1, 1024), gpu(), available=80 * GIB).terms["activations"]
    assert plan_memory(qwen05b, config, Shape(2, 1024), gpu(), available=80 * GIB).terms["activations"] == 2 * small
    checkpointed = dataclasses.replace(config, gradient_checkpointing=True)
    assert plan_memory(qwen05b, checkpointed, Shape(1, 1024), gpu(), available=80 * GIB).terms["activations"] < (
        small / 8
    )
    eager = plan_memory(
        qwen05b, dataclasses.replace(config, flash_attn="disabled"), Shape(1, 1024), gpu(), available=80 * GIB
    )
    # eager keeps [heads x L x L] float32 softmax + its bf16 copy per layer
    assert eager.terms["activations"] - small >= 24 * 14 * 1024 * 1024 * 6


def test_advice_names_checkpointing_when_that_fits(qwen05b):
    config = TrainConfig(bf16=True, flash_attn="fa2")
    shape = Shape(8, 4096)
    checkpointed = plan_memory(
        qwen05b, dataclasses.replace(config, gradient_checkpointing=True), shape, gpu(), available=80 * GIB
    )
    plan = plan_memory(qwen05b, config, shape, gpu(), available=checkpointed.total + GIB)
    assert not plan.fits
    advice = plan.advice()
    assert f"train.gradient_checkpointing=true (plan {checkpointed.total / GIB:.1f} GiB)" in advice
    assert not any("quantization_bit" in line for line in advice)  # QLoRA alone does not bring it under


def test_advice_names_zero3_when_that_fits(qwen05b):
    config = TrainConfig(finetuning_type="full", bf16=True, gradient_checkpointing=True, flash_attn="fa2")
    zero2 = placement_for(dataclasses.replace(config, deepspeed=str(DEEPSPEED / "zero2.json")), **_where(8))
    zero3 = placement_for(dataclasses.replace(config, deepspeed=str(DEEPSPEED / "zero3.json")), **_where(8))
    shape = Shape(1, 1024)
    need3 = plan_memory(qwen05b, config, shape, zero3, available=80 * GIB).total
    plan = plan_memory(qwen05b, config, shape, zero2, available=need3 + GIB // 4)
    assert not plan.fits
    assert f"train.deepspeed=conf/base/deepspeed/zero3.json (plan {need3 / GIB:.1f} GiB)" in plan.advice()


def test_check_memory_raises_one_message_and_warns(qwen05b, caplog):
    config = TrainConfig(finetuning_type="full", bf16=True)
    plan = plan_memory(qwen05b, config, SHAPE, gpu(), available=4 * GIB)
    assert not plan.fits
    with pytest.raises(MemoryPlanError) as raised:
        check_memory(plan, "error")
    message = str(raised.value)
    assert isinstance(raised.value, QwenPipelineError)
    assert message.startswith(f"memory plan: {plan.total / GIB:.2f} GiB per cuda needed, 4.00 GiB available; ")
    assert f"biggest: optimizer_states {8 * 494_032_768 / GIB:.2f} GiB" in message
    assert "train.finetuning_type=lora (plan" in message and "\n" not in message
    with caplog.at_level(logging.WARNING, logger="qwen_pipeline.training.memory"):
        check_memory(plan, "warn")
        check_memory(plan, "off")
    assert [r.getMessage() for r in caplog.records] == [message]
    check_memory(plan_memory(qwen05b, config, SHAPE, gpu(), available=80 * GIB), "error")  # fits: silent


def test_metrics_and_describe(qwen05b):
    plan = plan_memory(qwen05b, TrainConfig(bf16=True), SHAPE, gpu(), available=80 * GIB)
    metrics = plan.metrics()
    assert list(metrics) == [
        "plan.weights_gb",
        "plan.gradients_gb",
        "plan.optimizer_states_gb",
        "plan.activations_gb",
        "plan.loss_chunk_gb",
        "plan.overhead_gb",
        "plan.total_gb",
        "plan.available_gb",
        "plan.fits",
    ]
    assert metrics["plan.available_gb"] == 80.0 and metrics["plan.fits"] == 1.0
    assert metrics["plan.total_gb"] == round(plan.total / GIB, 3)
    # 256 labelled positions at most: float32 logits, log-softmax, gradient + the bf16 logits and gradient
    assert plan.terms["loss_chunk"] == 256 * 151936 * 16
    text = plan.describe()
    assert "compute bfloat16, quantization none" in text and "of 80.000 GiB free: fits" in text


def test_cpu_plan_counts_this_process_and_available_ram(embedded_dir):
    from qwen_pipeline.training.memory import available_memory, resident_bytes

    placement = placement_for(TrainConfig(), world_size=1, procs_per_node=1, cuda=False)
    plan = plan_memory(embedded_dir, TrainConfig(), SHAPE, placement)
    assert math.isclose(plan.terms["overhead"], resident_bytes(), rel_tol=0.2)
    assert 0 < plan.available and math.isclose(plan.available, available_memory(placement), rel_tol=0.2)


def test_cpu_overhead_holds_the_mapped_checkpoint_and_freed_temporaries(qwen05b):
    """CPU only: the converted weights' checkpoint bytes while the file stays mapped, and the per-module dense
    temporaries glibc keeps (QLoRA's dequantized weight once, DoRA's B·A / W + s·BA twice), each <= 32 MiB."""
    from qwen_pipeline.training.memory import freed_temporary_bytes, mapped_checkpoint_bytes

    linears = 24 * (896 * 896 * 2 + 128 * 896 * 2 + 4864 * 896 * 3)  # q, o, k, v, gate, up, down of 24 layers

    def parts(config, hf=qwen05b):
        tensors = model_tensors(hf, config)
        trained_fp32 = config.bf16  # upcast_trainable, no DeepSpeed
        return mapped_checkpoint_bytes(hf, config, tensors, trained_fp32=trained_fp32), freed_temporary_bytes(
            config, tensors
        )

    # float32 checkpoint: QLoRA reads the linears' float32 through the mapping, the embedding keeps it mapped
    assert parts(TrainConfig(quantization_bit=4)) == (4 * linears, 4 * linears)
    assert parts(TrainConfig(use_dora=True)) == (0, 2 * 4 * linears)  # every weight a view of the file
    assert parts(TrainConfig()) == parts(TrainConfig(finetuning_type="full")) == (0, 0)
    # bf16 from a float32 checkpoint: every weight converted, the mapping is gone after loading
    assert parts(TrainConfig(bf16=True, quantization_bit=4)) == (0, 2 * linears)
    bf16_checkpoint = copy.deepcopy(qwen05b)
    bf16_checkpoint.dtype = torch.bfloat16  # as Qwen2.5's config.json says
    assert parts(TrainConfig(bf16=True, quantization_bit=4), bf16_checkpoint) == (2 * linears, 2 * linears)
    # full fine-tuning in bf16 from a bf16 checkpoint: trained weights upcast to float32, nothing left mapped
    assert parts(TrainConfig(bf16=True, finetuning_type="full"), bf16_checkpoint)[0] == 0

    # On CPU both are part of the overhead (with this process's RSS, about equal between two calls); not on CUDA.
    cpu = Placement("cpu", 1, 1, 0, False, False)
    qlora = plan_memory(qwen05b, TrainConfig(quantization_bit=4), SHAPE, cpu, available=80 * GIB)
    lora = plan_memory(qwen05b, TrainConfig(), SHAPE, cpu, available=80 * GIB)
    assert math.isclose(qlora.terms["overhead"] - lora.terms["overhead"], 8 * linears, abs_tol=64 * 2**20)
    assert "+ mapped checkpoint 1.333 GiB + freed temporaries 1.333 GiB" in qlora.notes["overhead"]
    on_gpu = plan_memory(qwen05b, TrainConfig(quantization_bit=4), SHAPE, gpu(), available=80 * GIB)
    assert on_gpu.terms["overhead"] == CUDA_OVERHEAD


def test_freed_temporaries_skip_blocks_glibc_always_mmaps():
    from qwen_pipeline.training.memory import Tensor, freed_temporary_bytes

    big = Tensor("m.layers.0.mlp.up_proj.base_layer.weight", 9 * 2**20, 18944, False, 4)  # 36 MiB in float32
    small = Tensor("m.layers.0.mlp.down_proj.base_layer.weight", 2**20, 896, False, 4)
    assert freed_temporary_bytes(TrainConfig(quantization_bit=4), [big, small]) == 4 * 2**20
    assert freed_temporary_bytes(TrainConfig(bf16=True, quantization_bit=4), [big, small]) == 2 * (9 + 1) * 2**20
