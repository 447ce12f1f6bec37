"""Every fine-tuning mode lowers the loss on the tiny model, and what it saves loads back with the same logits."""

from __future__ import annotations

import pytest
import torch
from helpers import demo_sft_dataset

from qwen_pipeline.config import ConfigError, ModelConfig, TrainConfig, parse_config
from qwen_pipeline.datasets import ModelBundle, ModelDataset
from qwen_pipeline.models import EMBEDDED_MODEL
from qwen_pipeline.training.checks import environment_problems
from qwen_pipeline.training.recipe import data_fingerprint, run_sft

IDS = torch.tensor([[151644, 872, 198, 3838, 374, 220, 17, 5519, 220, 18, 30, 151645, 198, 151644, 77091, 198]])


@pytest.fixture(scope="module")
def small_dataset(tokenizer):
    return demo_sft_dataset(tokenizer, max_samples=24)


MODES = {
    "full": {"finetuning_type": "full", "learning_rate": 1e-3},
    "freeze": {"finetuning_type": "freeze", "freeze_trainable_layers": 1, "learning_rate": 5e-3},
    "lora": {"finetuning_type": "lora"},
    "dora": {"finetuning_type": "lora", "use_dora": True},
    "rslora": {"finetuning_type": "lora", "use_rslora": True},
    "qlora_4bit": {"finetuning_type": "lora", "quantization_bit": 4},
    "qlora_8bit": {"finetuning_type": "lora", "quantization_bit": 8},
    "lora_neat_packing": {
        "finetuning_type": "lora",
        "neat_packing": True,
        "pack_length": 256,
        "per_device_train_batch_size": 1,
    },
    "lora_padding_free": {"finetuning_type": "lora", "padding_free": True},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_lowers_loss_and_round_trips(mode, small_dataset, tmp_path, embedded_dir):
    params = {
        "learning_rate": 5e-3,
        "num_train_epochs": 4.0,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "constant",
        "output_dir": str(tmp_path / "ckpt"),
        **MODES[mode],
    }
    config = parse_config(TrainConfig, params, "train")
    assert environment_problems(config) == []
    result = run_sft(small_dataset, ModelConfig(), config)
    assert result.summary["data_fingerprint"] == data_fingerprint(small_dataset["train"])
    losses = [h["loss"] for h in result.history]
    assert len(losses) >= 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    model = result.model.eval()
    with torch.no_grad():
        before = model(IDS).logits
    dataset = ModelDataset(filepath=str(tmp_path / "saved"))
    dataset.save(
        ModelBundle(
            model=model,
            tokenizer=result.tokenizer,
            base_model=EMBEDDED_MODEL,
            info={"quantization_bit": config.quantization_bit},
        )
    )
    if config.quantization_bit:  # the adapter on the same quantized base it trained on
        from peft import PeftModel

        from qwen_pipeline.training.recipe import load_model

        reloaded = PeftModel.from_pretrained(load_model(ModelConfig(), config), str(tmp_path / "saved")).eval()
    else:
        reloaded = dataset.load().model.eval()
    with torch.no_grad():
        after = reloaded(IDS).logits
    assert float((before - after).abs().max()) < 1e-4
    kind = "adapter" if config.finetuning_type == "lora" else "causal_lm"
    assert (tmp_path / "saved" / ("adapter_config.json" if kind == "adapter" else "config.json")).exists()


def test_data_fingerprint_is_the_digest_of_the_whole_columns(small_dataset):
    """Streamed chunk by chunk, it stays the digest of the combined columns (older checkpoint folders resume)."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    from datasets import Dataset

    train = small_dataset["train"]
    chunked = Dataset(pa.Table.from_batches(train.data.table.to_batches(max_chunksize=5)))
    digest = hashlib.sha256()
    for name in ("input_ids", "labels"):
        column = train.data.table.column(name).combine_chunks()
        digest.update(np.asarray(column.offsets).tobytes())
        digest.update(np.asarray(column.flatten()).astype(np.int64).tobytes())
    assert data_fingerprint(train) == data_fingerprint(chunked) == digest.hexdigest()
    # a split stored as a row order over shared files hashes as its rows, without a flattened copy
    order = list(range(len(train)))[::-1]
    assert data_fingerprint(train.select(order)) == data_fingerprint(Dataset.from_dict(train.select(order).to_dict()))


def test_freeze_trains_only_the_last_layers(small_dataset, tmp_path):
    from qwen_pipeline.training.recipe import load_model, wrap

    model = wrap(
        load_model(ModelConfig(), TrainConfig()), TrainConfig(finetuning_type="freeze", freeze_trainable_layers=1)
    )
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"1"}  # model.layers.1.*


INVALID = [
    (
        {"finetuning_type": "full", "quantization_bit": 4},
        False,
        ["train.quantization_bit: QLoRA trains adapters; it needs finetuning_type lora, not full"],
    ),
    ({"quantization_bit": 3}, False, ["train.quantization_bit: 4 or 8, got 3"]),
    ({"bf16": True, "fp16": True}, False, ["train.fp16: choose bf16 or fp16, not both"]),
]
ENVIRONMENT = [
    (
        {"flash_attn": "fa2"},
        [
            "train.flash_attn: fa2 needs a CUDA GPU and none is visible (use sdpa or auto)",
            "train.flash_attn: fa2 needs the flash-attn package (pip install -e '.[gpu]')",
        ],
    ),
    ({"fp16": True}, ["train.fp16: fp16 mixed precision needs a CUDA GPU (on CPU use bf16 or neither)"]),
    (
        {"deepspeed": "conf/base/deepspeed/nope.json"},
        [
            "train.deepspeed: no DeepSpeed config at conf/base/deepspeed/nope.json",
        ],
    ),
]


@pytest.mark.parametrize(("params", "_", "expected"), INVALID)
def test_invalid_combinations_fail_with_every_problem(params, _, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(TrainConfig, params, "train")
    assert info.value.problems == expected


@pytest.mark.parametrize(("params", "expected"), ENVIRONMENT)
def test_environment_checks_name_each_problem(params, expected, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "flash_attn" else real(name))
    assert environment_problems(TrainConfig(**params), cuda=False) == expected


def test_missing_packages_are_named(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    problems = environment_problems(
        TrainConfig(quantization_bit=4, deepspeed="conf/base/deepspeed/zero2.json"), cuda=False
    )
    assert problems == [
        "train.quantization_bit: QLoRA needs the bitsandbytes package",
        "train.deepspeed: needs the deepspeed package",
    ]


def test_zero3_with_8bit_is_refused(tmp_path):
    config = tmp_path / "z3.json"
    config.write_text('{"zero_optimization": {"stage": 3}}')
    problems = environment_problems(TrainConfig(quantization_bit=8, deepspeed=str(config)), cuda=False)
    assert "train.deepspeed: ZeRO-3 cannot shard 8-bit quantized weights (use quantization_bit 4 or ZeRO-2)" in problems


def test_smoothing_follows_llamafactory_plot_loss():
    from qwen_pipeline.pipelines.train.nodes import plot_loss, smooth

    # weight = 1.8 * (sigmoid(0.05 * 2) - 0.5) = 0.044962
    assert smooth([4.0, 2.0]) == pytest.approx([4.0, 4 * 0.044962 + 0.955038 * 2], abs=1e-5)
    figure = plot_loss({1: 4.0, 2: 2.0, 3: 1.0})
    assert [line.get_label() for line in figure.axes[0].lines] == ["original", "smoothed"]


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert environment_problems(TrainConfig(bf16=True), cuda=True) == [
        "train.bf16: this GPU does not support bf16 (use fp16)"
    ]
