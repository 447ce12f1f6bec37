"""Merge: the exported model computes what base + adapter computes, in the files a user expects.

Adapters are made on the embedded tiny model (LoRA, rsLoRA, DoRA, modules_to_save with random non-zero
weights; one trained with 4-bit QLoRA) and run through the merge nodes as `kedro run --pipelines merge`
does: merge_adapter -> check_merged_model -> publish_merged_model -> ModelDataset.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import base_model_of, demo_sft_dataset, max_relative_logit_diff
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from qwen_pipeline import merging
from qwen_pipeline.config import ConfigError
from qwen_pipeline.datasets import ModelBundle, ModelDataset
from qwen_pipeline.datasets.base_model import BaseModelMismatchError
from qwen_pipeline.models import EMBEDDED_MODEL, load_causal_lm
from qwen_pipeline.pipelines.merge.nodes import (
    MergeCheckError,
    check_merged_model,
    merge_adapter,
    publish_merged_model,
)

IDS = torch.tensor([[151644, 872, 198, 3838, 374, 220, 17, 5519, 220, 18, 30, 151645, 198, 151644, 77091, 198]])
IM_END = 151645


def save_trained(root: Path, model, tokenizer, base_model: str = EMBEDDED_MODEL, **info):
    dataset = ModelDataset(filepath=str(root / "trained"), lazy=True)
    dataset.save(ModelBundle(model=model, tokenizer=tokenizer, base_model=base_model, info=info))
    return dataset.load()


def random_adapter(seed: int = 0, **lora) -> PeftModel:
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora)
    model = get_peft_model(load_causal_lm(EMBEDDED_MODEL), config)
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.3)
        if "magnitude" in name:
            weight.data *= 1.3
        if "modules_to_save" in name:
            weight.data += 0.5
    return model.eval()


def merge(trained, root: Path, **params):
    staged = merge_adapter(trained, base_model_of(trained.base_model), params)
    report = check_merged_model(staged, params)
    ModelDataset(filepath=str(root / "merged"), lazy=True).save(publish_merged_model(staged, report))
    return report


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    "lora",
    [{}, {"use_rslora": True}, {"use_dora": True}, {"modules_to_save": ["norm"]}],
    ids=["lora", "rslora", "dora", "modules_to_save"],
)
def test_merged_logits_equal_base_plus_adapter(lora, tmp_path, tokenizer):
    adapter = random_adapter(**lora)
    trained = save_trained(tmp_path, adapter, tokenizer)
    report = merge(trained, tmp_path)
    assert report["method"] == "streamed" and report["check"]["passed"]
    assert report["check"]["top1_agreement"] == 1.0
    assert report["config"]["export_size"] == 5.0 and report["config"]["export_dtype"] == "auto"  # resolved
    merged = load_causal_lm(str(tmp_path / "merged"))
    reference = PeftModel.from_pretrained(load_causal_lm(EMBEDDED_MODEL), tmp_path / "trained").eval()
    assert max_relative_logit_diff(logits(reference), logits(merged)) < 1e-4
    assert float((logits(load_causal_lm(EMBEDDED_MODEL)) - logits(merged)).abs().max()) > 0.1  # it did change


def test_in_memory_merge_writes_the_same_weights(tmp_path, tokenizer):
    trained = save_trained(tmp_path, random_adapter(use_dora=True), tokenizer)
    streamed = merge(trained, tmp_path / "a")
    in_memory = merge(trained, tmp_path / "b", method="in_memory")
    assert (streamed["method"], in_memory["method"]) == ("streamed", "in_memory")
    assert in_memory["why_in_memory"] == "merge.method: in_memory"
    a, b = (merging.weight_index(tmp_path / x / "merged") for x in "ab")
    assert set(a) == set(b)
    for name in a:
        assert torch.allclose(merging.read_tensor(a[name]), merging.read_tensor(b[name]), atol=1e-6), name


def test_qlora_trained_adapter_merges_into_the_unquantized_base(tmp_path, tokenizer):
    from qwen_pipeline.config import ModelConfig, TrainConfig
    from qwen_pipeline.training.recipe import run_sft

    config = TrainConfig(
        quantization_bit=4, learning_rate=5e-3, max_steps=3, per_device_train_batch_size=8,
        gradient_accumulation_steps=1, output_dir=str(tmp_path / "ckpt"),
    )  # fmt: skip
    result = run_sft(demo_sft_dataset(tokenizer, max_samples=24), ModelConfig(), config)
    trained = save_trained(tmp_path, result.model, tokenizer, quantization_bit=4)
    report = merge(trained, tmp_path)
    assert report["check"]["passed"]
    reference = PeftModel.from_pretrained(load_causal_lm(EMBEDDED_MODEL), tmp_path / "trained").eval()
    merged = load_causal_lm(str(tmp_path / "merged"))
    assert max_relative_logit_diff(logits(reference), logits(merged)) < 1e-4
    with safe_open(tmp_path / "merged/model.safetensors", "pt") as f:  # plain float32, no quantization state
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_export_size_gives_shards_and_an_index(tmp_path, tokenizer):
    trained = save_trained(tmp_path, random_adapter(), tokenizer)
    limit = 200_000  # bytes: the 38.9 MB embedding gets a shard of its own, the 2 layers spread over several
    report = merge(trained, tmp_path, export_size=limit / 1e9)
    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(shards)
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)] == report["files"]
    assert sorted(set(index["weight_map"].values())) == shards
    sizes = {}
    for shard in shards:
        header = merging.weights._header(out / shard)
        sizes[shard] = [math.prod(v["shape"]) * 4 for k, v in header.items() if k != "__metadata__"]
    assert sum(map(sum, sizes.values())) == index["metadata"]["total_size"] == report["total_bytes"]
    for shard, tensor_sizes in sizes.items():  # a shard overflows only when it holds one tensor
        assert sum(tensor_sizes) <= limit or len(tensor_sizes) == 1, shard
    for this, following in zip(shards, shards[1:]):  # and each was filled as far as the next tensor allowed
        assert sum(sizes[this]) + sizes[following][0] > limit
    assert count >= 4 and len(index["weight_map"]) == 26  # every tensor of the tiny model, once
    reference = PeftModel.from_pretrained(load_causal_lm(EMBEDDED_MODEL), tmp_path / "trained").eval()
    assert max_relative_logit_diff(logits(reference), logits(load_causal_lm(str(out)))) < 1e-4


def test_bfloat16_export_and_legacy_bin_format(tmp_path, tokenizer):
    trained = save_trained(tmp_path, random_adapter(), tokenizer)
    report = merge(trained, tmp_path / "bf16", export_dtype="bfloat16")
    assert report["export_dtype"] == "bfloat16" and report["check"]["passed"]
    assert 1e-4 < report["check"]["max_abs_logit_diff"] <= report["check"]["tolerance"]  # rounded, within 2%
    with safe_open(tmp_path / "bf16/merged/model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "bf16/merged/config.json").read_text())["dtype"] == "bfloat16"

    report = merge(trained, tmp_path / "bin", export_legacy_format=True, export_size=0.02)
    out = tmp_path / "bin/merged"
    assert report["files"] == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert (out / "pytorch_model.bin.index.json").is_file() and not list(out.glob("*.safetensors"))
    reference = PeftModel.from_pretrained(load_causal_lm(EMBEDDED_MODEL), tmp_path / "trained").eval()
    assert max_relative_logit_diff(logits(reference), logits(load_causal_lm(str(out)))) < 1e-4


def test_full_weights_are_re_exported_and_checked(tmp_path, tokenizer):
    model = load_causal_lm(EMBEDDED_MODEL)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    trained = save_trained(tmp_path, model, tokenizer)
    assert trained.kind == "causal_lm"
    report = merge(trained, tmp_path, export_size=0.02)
    assert report["adapter"] is None and report["check"]["passed"]
    assert max_relative_logit_diff(logits(model), logits(load_causal_lm(str(tmp_path / "merged")))) < 1e-5


def test_check_tolerance_follows_large_logits_and_still_refuses_a_wrong_merge(tmp_path, tokenizer, embedded_dir):
    """Logits of magnitude ~40 (as real models) and a strong adapter: float32 rounding alone moves the
    logits by more than 1e-4, which a fixed bound refused; one tensor merged twice is still refused."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(embedded_dir, base)
    scaled = load_causal_lm(str(base))
    with torch.no_grad():
        scaled.model.norm.weight.mul_(5.0)  # tied head: every logit x5
    scaled.save_pretrained(base)
    torch.manual_seed(1)
    adapter = get_peft_model(load_causal_lm(str(base)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, weight in adapter.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=1.0)
    trained = save_trained(tmp_path, adapter, tokenizer, base_model=str(base))
    staged = merge_adapter(trained, base_model_of(str(base)), {})
    check = check_merged_model(staged, {})["check"]
    assert check["passed"] and 1e-4 < check["max_abs_logit_diff"] <= check["tolerance"] / 3
    assert check["tolerance"] > 0.02  # 0.1% of the largest |logit|, here above 20

    module = adapter.base_model.model.model.layers[1].self_attn.q_proj
    delta = (module.lora_B["default"].weight @ module.lora_A["default"].weight) * module.scaling["default"]
    weights = staged.path / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.self_attn.q_proj.weight"] += delta.detach()  # the adapter merged twice into one tensor
    save_file(tensors, weights, metadata={"format": "pt"})
    wrong = check_merged_model(staged, {})["check"]
    assert not wrong["passed"] and wrong["max_abs_logit_diff"] > 3 * wrong["tolerance"]


def test_failed_check_fails_and_publishes_nothing(tmp_path, tokenizer):
    trained = save_trained(tmp_path, random_adapter(), tokenizer)
    staged = merge_adapter(trained, base_model_of(), {})
    report = check_merged_model(staged, {"check_tolerance": 1e-12})
    assert not report["check"]["passed"] and report["check"]["max_abs_logit_diff"] > 1e-12
    with pytest.raises(MergeCheckError, match=r"max \|logit diff\| .* > tolerance 1e-12.*nothing was published"):
        publish_merged_model(staged, report)
    assert not staged.path.exists()
    assert not ModelDataset(filepath=str(tmp_path / "merged")).exists()


def test_interrupted_merge_leaves_nothing_that_looks_complete(tmp_path, tokenizer, monkeypatch):
    trained = save_trained(tmp_path, random_adapter(), tokenizer)
    merge(trained, tmp_path)  # a complete earlier merge
    before = sorted(p.name for p in (tmp_path / "merged").iterdir())
    real_write = merging.weights._write_safetensors
    written = []

    def interrupted(path, entries, produce):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        real_write(path, entries, produce)

    monkeypatch.setattr(merging.weights, "_write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_adapter(trained, base_model_of(), {"export_size": 0.02})
    assert written and not written[0].exists()  # the staging directory is gone with its first shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "trained"]
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == before  # the earlier merge untouched
    # a hard kill leaves a staging folder without a manifest; the next merge clears it
    stale = tmp_path / ".merge-staging-killed"
    stale.mkdir()
    monkeypatch.setattr(merging.weights, "_write_safetensors", real_write)
    staged = merge_adapter(trained, base_model_of(), {})
    assert not stale.exists() and staged.path.parent == tmp_path


def test_exported_model_generates_and_stops_at_im_end(tmp_path, tokenizer, embedded_dir):
    """A base whose own eos is <|endoftext|> only (as Qwen2.5 base models), fine-tuned to answer "OK"."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM, GenerationConfig

    from qwen_pipeline.config import ModelConfig, TrainConfig
    from qwen_pipeline.training.recipe import run_sft

    base = tmp_path / "base"
    shutil.copytree(embedded_dir, base)
    generation = GenerationConfig.from_pretrained(base)
    generation.eos_token_id = 151643
    generation.save_pretrained(base)
    ok = tokenizer("OK", add_special_tokens=False)["input_ids"]
    rows = []
    for question in ("hi", "what is 2 + 2?", "name a colour", "say something", "tell a joke", "你好", "why?", "how?"):
        prompt = tokenizer(
            f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n",
            add_special_tokens=False,
        )["input_ids"]
        answer = ok + [IM_END, 198]
        rows.append({"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
                     "labels": [-100] * len(prompt) + answer})  # fmt: skip
    config = TrainConfig(
        learning_rate=2e-2, max_steps=40, per_device_train_batch_size=8, gradient_accumulation_steps=1,
        lr_scheduler_type="constant", output_dir=str(tmp_path / "ckpt"),
    )  # fmt: skip
    result = run_sft(DatasetDict({"train": Dataset.from_list(rows)}), ModelConfig(str(base)), config)
    trained = save_trained(tmp_path, result.model, tokenizer, base_model=str(base))
    report = merge(trained, tmp_path)
    assert report["eos_token_id"] == [151643, IM_END]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.generation_config.eos_token_id == [151643, IM_END]
    prompt = torch.tensor([rows[0]["input_ids"][: -len(ok) - 2]])
    out = merged.generate(prompt, max_new_tokens=20)[0, prompt.shape[1] :].tolist()
    assert out == ok + [IM_END]  # answered, then stopped at <|im_end|>
    merged.generation_config.eos_token_id = 151643  # the base model's own setting
    assert len(merged.generate(prompt, max_new_tokens=20)[0, prompt.shape[1] :]) == 20  # never stops


def test_an_adapter_merges_only_into_the_base_it_was_trained_on(tmp_path, tokenizer, embedded_dir):
    trained = save_trained(tmp_path, random_adapter(), tokenizer)
    other = tmp_path / "other-base"
    with pytest.raises(BaseModelMismatchError) as error:
        merge_adapter(trained, base_model_of(str(other)), {})
    assert str(error.value) == (
        f"the adapter in {trained.path} was made from base model 'embedded:tiny-qwen2.5', but base_model is "
        f"'{other}': run with --params model.model_name_or_path=embedded:tiny-qwen2.5 (or set "
        "model.model_name_or_path in conf/<env>/globals.yml), or train again from this base"
    )
    assert not list(tmp_path.glob("trained/../.merge-staging-*"))  # stopped before anything was written
    staged = merge_adapter(trained, base_model_of(str(embedded_dir)), {})  # the same model, named by its folder
    assert staged.manifest["merge"]["weights"] == str(embedded_dir)


def test_bad_settings_are_named(tmp_path, tokenizer):
    with pytest.raises(ConfigError) as error:
        merge_adapter(
            None, base_model_of(), {"export_size": 0, "export_device": "tpu", "method": "fast", "check_texts": []}
        )
    message = str(error.value)
    assert "merge.method: expected one of 'auto', 'streamed', 'in_memory', got 'fast'" in message
    with pytest.raises(ConfigError) as error:
        merge_adapter(None, base_model_of(), {"export_size": 0, "export_device": "tpu", "check_texts": []})
    assert str(error.value).splitlines()[1:] == [
        "  - merge.export_size: must be positive (GB per shard), got 0",
        "  - merge.export_device: cpu, auto, cuda or cuda:N, got 'tpu'",
        "  - merge.check_texts: give at least one non-empty text",
    ]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="export_device: cuda asked for, but this machine has no CUDA device"):
            merge_adapter(None, base_model_of(), {"export_device": "cuda"})
    trained = save_trained(tmp_path, random_adapter(), tokenizer)
    config = json.loads((trained.path / "adapter_config.json").read_text())
    (trained.path / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {"q_proj": 16}}))
    with pytest.raises(ConfigError, match="streamed is not possible for this adapter: adapter option alpha_pattern"):
        merge_adapter(trained, base_model_of(), {"method": "streamed"})
    report = merge(trained, tmp_path)  # auto falls back to PEFT in memory, and says why
    assert (report["method"], report["why_in_memory"]) == ("in_memory", "adapter option alpha_pattern")
    assert report["check"]["passed"]
