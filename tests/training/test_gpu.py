"""GPU-only checks: bf16 training steps with sdpa and FlashAttention-2. Skipped without CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from datasets import Dataset, DatasetDict
from helpers import base_model_of, max_relative_logit_diff

from qwen_pipeline.config import ModelConfig, TrainConfig
from qwen_pipeline.training.checks import environment_problems
from qwen_pipeline.training.recipe import run_sft

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def tiny_dataset() -> DatasetDict:
    ids = [[151644, 872, 198, 6023, 151645, 198, 151644, 77091, 198, 9707, 151645, 198]] * 16
    labels = [[-100] * 9 + [9707, 151645, 198]] * 16
    return DatasetDict(
        {"train": Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12] * 16, "labels": labels})}
    )


@pytest.mark.parametrize("attention", ["sdpa", "fa2"])
def test_bf16_training_steps(attention, tmp_path):
    if attention == "fa2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    config = TrainConfig(
        bf16=True,
        flash_attn=attention,
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        output_dir=str(tmp_path),
        padding_free=attention == "fa2",
    )
    assert environment_problems(config) == []
    result = run_sft(tiny_dataset(), ModelConfig(), config)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.summary["peak_gpu_memory_gb"] > 0


def test_merge_on_the_gpu_matches_base_plus_adapter(tmp_path):
    """export_device: cuda: the merge arithmetic and the check's blocks run on the GPU."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from qwen_pipeline.datasets import ModelBundle, ModelDataset
    from qwen_pipeline.models import EMBEDDED_MODEL, load_causal_lm, load_tokenizer
    from qwen_pipeline.pipelines.merge.nodes import check_merged_model, merge_adapter, publish_merged_model

    torch.manual_seed(0)
    adapter = get_peft_model(load_causal_lm(EMBEDDED_MODEL), LoraConfig(r=4, target_modules="all-linear"))
    for name, weight in adapter.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.3)
    trained = ModelDataset(filepath=str(tmp_path / "trained"), lazy=True)
    trained.save(ModelBundle(model=adapter, tokenizer=load_tokenizer(EMBEDDED_MODEL), base_model=EMBEDDED_MODEL))
    params = {"export_device": "cuda"}
    staged = merge_adapter(trained.load(), base_model_of(), params)
    report = check_merged_model(staged, params)
    assert report["export_device"] == "cuda" and report["check"]["passed"]
    ModelDataset(filepath=str(tmp_path / "merged"), lazy=True).save(publish_merged_model(staged, report))
    ids = torch.tensor([[151644, 872, 198, 6023, 151645, 198, 151644, 77091, 198]])
    reference = PeftModel.from_pretrained(load_causal_lm(EMBEDDED_MODEL), tmp_path / "trained").eval()
    with torch.no_grad():
        diff = max_relative_logit_diff(reference(ids).logits, load_causal_lm(str(tmp_path / "merged"))(ids).logits)
    assert diff < 1e-4
