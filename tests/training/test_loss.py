"""The loss runs the output head only on labelled positions, in chunks, and equals the full-logits loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import demo_examples
from transformers import DataCollatorForSeq2Seq, TrainingArguments

from qwen_pipeline.models import EMBEDDED_MODEL, load_causal_lm
from qwen_pipeline.training.loss import SFTTrainer, token_mean_loss
from qwen_pipeline.training.packing import FlatCollator, pack


@pytest.fixture(scope="module")
def demo(tokenizer):
    return demo_examples(tokenizer, datasets=("alpaca_demo", "sharegpt_demo"), cutoff_len=512)


@pytest.fixture(scope="module")
def padded(demo, tokenizer):
    """A padded batch of 4: 46, 47, 74 and 79 tokens (alpaca and sharegpt)."""
    rows = [demo[i] for i in (0, 200, 5, 300)]
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(rows)


def full_logits_loss(model, labels, **inputs):
    """The computation this replaced: logits at every position, upcast, cross-entropy over the labelled ones."""
    logits = model(**inputs).logits[:, :-1].float().flatten(0, 1)
    target = labels[:, 1:].flatten()
    return F.cross_entropy(logits, target, ignore_index=-100, reduction="sum") / (target != -100).sum()


def head_loss(model, labels, chunk_rows=512, **inputs):
    hidden = model.model(**inputs).last_hidden_state
    return token_mean_loss(model.lm_head, hidden, labels, chunk_rows=chunk_rows)


def loss_and_grads(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(old, new):
    (old_loss, old_grads), (new_loss, new_grads) = old, new
    assert new_loss == pytest.approx(old_loss, rel=1e-5)
    assert new_grads.keys() == old_grads.keys()
    for name, grad in old_grads.items():  # the tied embedding / head included when trained
        scale = float(grad.abs().max())
        assert float((new_grads[name] - grad).abs().max()) <= 1e-5 * scale, name


@pytest.fixture(params=["trained_head", "frozen_head"])
def model(request, embedded_dir):
    """Full fine-tuning (the head trains: checkpointed chunks), or a frozen head as under LoRA and freeze
    (gradients with respect to the hidden states computed in the forward)."""
    model = load_causal_lm(EMBEDDED_MODEL)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in Qwen2.5-0.5B
    model.lm_head.weight.requires_grad_(request.param == "trained_head")
    return model


def test_padded_batch_gives_the_full_logits_loss_and_gradients(model, padded):
    labels, inputs = padded["labels"], {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    old = loss_and_grads(model, lambda: full_logits_loss(model, labels, **inputs))
    new = loss_and_grads(model, lambda: head_loss(model, labels, **inputs))
    assert_same(old, new)
    assert new[0] == pytest.approx(12.665287, abs=1e-5)  # the seeded embedded model on these four examples
    # 4 x 79 positions, 67 of them learned (the rest prompt or padding): the head ran on 67
    assert int((labels[:, 1:] != -100).sum()) == 67 and labels.shape == (4, 79)


@pytest.mark.parametrize("layout", ["neat_packing", "padding_free"])
def test_flat_rows_give_the_full_logits_loss_and_gradients(model, demo, layout):
    sample = demo.select(range(6))
    rows = list(pack(sample, 256, neat=True)[0]) if layout == "neat_packing" else list(sample)
    flat = FlatCollator()(rows)
    inputs = {"input_ids": flat["input_ids"], "position_ids": flat["position_ids"]}
    old = loss_and_grads(model, lambda: full_logits_loss(model, flat["labels"], **inputs))
    new = loss_and_grads(model, lambda: head_loss(model, flat["labels"], **inputs))
    assert_same(old, new)


def test_no_logits_beyond_a_chunk_in_forward_or_backward(model, padded):
    shapes = []
    model.lm_head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    whole = head_loss(model, padded["labels"], chunk_rows=10_000, **inputs)
    loss = head_loss(model, padded["labels"], chunk_rows=16, **inputs)
    forward = len(shapes)
    loss.backward()
    assert shapes[0] == (67, 151936) and forward == 1 + math.ceil(67 / 16)
    assert shapes[1:forward] == [(16, 151936)] * 4 + [(3, 151936)]
    if model.lm_head.weight.requires_grad:  # each chunk's logits recomputed, one at a time, in the backward's order
        assert sorted(shapes[forward:]) == [(3, 151936)] + [(16, 151936)] * 4
    else:  # the gradient was computed with the logits in the forward
        assert len(shapes) == forward
    assert float(loss) == pytest.approx(float(whole), rel=1e-6)


def test_nothing_learned_keeps_every_parameter_in_the_graph(model, padded):
    """A batch without labels gives loss 0 and zero gradients, not missing ones (DDP waits for each)."""
    inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    hidden = model.model(**inputs).last_hidden_state
    loss = token_mean_loss(model.lm_head, hidden, torch.full_like(padded["labels"], -100), num_items_in_batch=1)
    loss.backward()
    assert float(loss) == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)


def test_trainer_keeps_no_logits_and_counts_the_global_batch(padded, tmp_path, embedded_dir):
    """Through the Trainer and a PEFT (LoRA) wrapper: the model hands back no logits, the loss equals the
    full-logits one, and a global token count (num_items_in_batch) divides the sum instead."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_causal_lm(EMBEDDED_MODEL), LoraConfig(r=8, target_modules="all-linear"))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = SFTTrainer(model=model, args=args, data_collator=FlatCollator())
    inputs = {k: padded[k] for k in ("input_ids", "attention_mask", "labels")}
    loss, outputs = trainer.compute_loss(model, dict(inputs), return_outputs=True)
    assert outputs.logits.shape == (4, 0, 151936)
    with torch.no_grad():
        expected = full_logits_loss(model, padded["labels"], **{k: padded[k] for k in ("input_ids", "attention_mask")})
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    halved = trainer.compute_loss(model, dict(inputs), num_items_in_batch=torch.tensor(2 * 67))
    assert float(halved) == pytest.approx(float(expected) / 2, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("finetuning", "port"), [("full", 29531), ("lora", 29532)])
def test_zero3_gives_the_losses_of_one_process(finetuning, port, tokenizer, tmp_path, monkeypatch):
    """ZeRO-3 partitions the head's weight: a trained head (full: checkpointed chunks) and a frozen one
    (LoRA: gradients in the forward) each gather it through the head's hooks. Two torchrun CPU processes
    at batch 2 give one process's losses at batch 4."""
    pytest.importorskip("deepspeed")
    from pathlib import Path

    from helpers import demo_sft_dataset

    from qwen_pipeline.config import ModelConfig, TrainConfig
    from qwen_pipeline.training import launcher
    from qwen_pipeline.training.recipe import run_sft

    monkeypatch.setenv("MASTER_PORT", str(port))
    dataset = demo_sft_dataset(tokenizer, max_samples=32)
    common = {"finetuning_type": finetuning, "learning_rate": 5e-3, "max_steps": 3, "logging_steps": 1}
    common |= {"gradient_accumulation_steps": 1, "lr_scheduler_type": "constant", "shuffle": False}
    one = run_sft(
        dataset, ModelConfig(), TrainConfig(per_device_train_batch_size=4, output_dir=str(tmp_path / "1"), **common)
    )
    zero3 = str(Path(__file__).resolve().parents[2] / "conf" / "base" / "deepspeed" / "zero3.json")
    two = launcher.train(
        dataset,
        ModelConfig(),
        TrainConfig(
            per_device_train_batch_size=2, nproc_per_node=2, deepspeed=zero3, output_dir=str(tmp_path / "2"), **common
        ),
    )
    expected = [h["loss"] for h in one.history]
    assert len(expected) == 3 and [h["loss"] for h in two.history] == pytest.approx(expected, rel=1e-3)


def test_tokens_seen_are_counted_on_the_device_without_padding():
    """The live tokens/s count: non-padding tokens, added up with no read-back per step."""
    from types import SimpleNamespace

    counter = SimpleNamespace(tokens_seen=0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    padded = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": mask}
    SFTTrainer._track_num_input_tokens(counter, padded)
    assert isinstance(counter.tokens_seen, torch.Tensor)  # still a tensor: nothing read back
    SFTTrainer._track_num_input_tokens(counter, {"input_ids": torch.ones(1, 7, dtype=torch.long)})  # a flat batch
    assert int(counter.tokens_seen) == 15
