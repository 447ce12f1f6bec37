"""The code paths a real GPU run takes, reproduced on the CPU where the mechanism exists here: precision (what
trains is float32 under mixed precision), where quantized weights go under torchrun, the process group one
process gets (DeepSpeed, several GPUs), multi-node checks, equal loss-chunk counts across ranks, and one resume
decision for all ranks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from helpers import demo_sft_dataset

from qwen_pipeline.config import ConfigError, ModelConfig, TrainConfig, parse_config
from qwen_pipeline.training import ranks, recipe
from qwen_pipeline.training.checks import environment_problems
from qwen_pipeline.training.loss import SFTTrainer, token_mean_loss

ZERO = {stage: f"conf/base/deepspeed/zero{stage}.json" for stage in (2, 3)}


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return demo_sft_dataset(tokenizer, max_samples=16)


def one_step(dataset, tmp_path, monkeypatch, **params):
    """run_sft for one optimizer step; returns the result and the Trainer (its optimizer states)."""
    seen = {}
    train = SFTTrainer.train

    def keep(self, *args, **kwargs):
        seen["trainer"] = self
        return train(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "train", keep)
    settings = {
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "constant",
        "shuffle": False,
        "output_dir": str(tmp_path / "ckpt"),
        **params,
    }
    result = recipe.run_sft(dataset, ModelConfig(), parse_config(TrainConfig, settings, "train"))
    return result, seen["trainer"]


def optimizer_state_dtypes(trainer) -> set[torch.dtype]:
    return {v.dtype for state in trainer.optimizer.state.values() for v in state.values() if v.dim() > 0}


@pytest.mark.parametrize("mode", ["full", "freeze"])
def test_bf16_mixed_precision_trains_float32_weights_and_states(mode, dataset, tmp_path, monkeypatch):
    """bf16 mixed precision without DeepSpeed (LLaMA-Factory's rule): what trains, and AdamW's states, are float32;
    frozen weights stay bf16; an lr of 1e-5 moves nearly every weight of a trained layer (in bf16 weights such an
    update is below half a unit in the last place of most entries and rounds away)."""
    before = None

    def remember(model, config):
        nonlocal before
        before = model.model.layers[-1].mlp.down_proj.weight.detach().float().clone()

    upcast = recipe.upcast_trainable
    monkeypatch.setattr(
        recipe, "upcast_trainable", lambda model, config: (remember(model, config), upcast(model, config))
    )
    params = {"finetuning_type": mode, "bf16": True, "learning_rate": 1e-5, "freeze_trainable_layers": 1}
    result, trainer = one_step(dataset, tmp_path, monkeypatch, **params)
    model = result.model
    trained = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.dtype for name, p in model.named_parameters() if not p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}
    assert optimizer_state_dtypes(trainer) == {torch.float32}
    assert set(frozen.values()) == ({torch.bfloat16} if mode == "freeze" else set())
    after = model.model.layers[-1].mlp.down_proj.weight.detach().float()
    assert float((after != before).float().mean()) > 0.99


def test_lora_under_bf16_keeps_the_base_in_bf16_and_trains_float32_adapters(dataset, tmp_path, monkeypatch):
    result, trainer = one_step(dataset, tmp_path, monkeypatch, bf16=True, additional_target=["embed_tokens"])
    dtypes = {name: p.dtype for name, p in result.model.named_parameters()}
    trained = {name for name, p in result.model.named_parameters() if p.requires_grad}
    assert {dtypes[n] for n in trained} == {torch.float32}
    # a full copy of embed_tokens trains, in float32 too
    assert {n for n in trained if "modules_to_save" in n} == {
        "base_model.model.model.embed_tokens.modules_to_save.default.weight"
    }
    assert {dtypes[n] for n in dtypes if n not in trained} == {torch.bfloat16}
    assert optimizer_state_dtypes(trainer) == {torch.float32}


def test_fa2_without_16_bit_is_refused_before_loading():
    with pytest.raises(ConfigError) as info:
        parse_config(TrainConfig, {"flash_attn": "fa2"}, "train")
    assert info.value.problems == ["train.flash_attn: fa2 runs in 16-bit only; set bf16 (or fp16) with it, or use sdpa"]


@pytest.mark.parametrize(
    ("params", "zero3", "expected"),
    [
        ({"quantization_bit": 4, "bf16": True}, False, {"device_map": {"": 3}}),
        ({"quantization_bit": 8}, False, {"device_map": {"": 3}}),
        ({"quantization_bit": 4, "bf16": True}, True, {"quant_storage": torch.bfloat16}),
        ({}, False, {}),
    ],
)
def test_quantized_weights_go_to_the_local_rank_device(params, zero3, expected, monkeypatch):
    """Under torchrun each rank's QLoRA weights go to its own GPU (bitsandbytes otherwise uses the current device,
    cuda:0, for every rank); under ZeRO-3 DeepSpeed places them, and their storage has the compute dtype."""
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(recipe, "zero_stage", lambda config: 3 if zero3 else 0)
    kwargs = recipe.load_kwargs(ModelConfig(), TrainConfig(**params), cuda=True)
    assert kwargs.get("device_map") == expected.get("device_map")
    if "quant_storage" in expected:
        assert kwargs["quantization_config"].bnb_4bit_quant_storage == expected["quant_storage"]
    if params.get("quantization_bit") == 4:
        assert kwargs["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs["dtype"] == (torch.bfloat16 if params.get("bf16") else torch.float32)


def test_one_process_gets_a_group_of_its_own_only_when_it_needs_one(monkeypatch):
    for name in ranks.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert ranks.needs_own_group("zero2.json", cuda_devices=0)
    assert ranks.needs_own_group(None, cuda_devices=8)  # else the Trainer takes all 8 through DataParallel
    assert not ranks.needs_own_group(None, cuda_devices=1)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not ranks.needs_own_group("zero2.json", cuda_devices=8)  # torchrun already made one


def test_one_process_on_a_multi_gpu_host_uses_one_and_says_how_to_use_all(monkeypatch, caplog):
    for name in ranks.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(ranks, "_close_group", lambda: None)
    with caplog.at_level(logging.WARNING, logger=ranks.logger.name), ranks.one_process_group(None):
        assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("0", "0", "1")
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ  # as before
    assert caplog.messages == [
        "One training process on a host with 8 GPUs: it uses cuda:0 only. To use all of them, run one process "
        "per GPU: train.nproc_per_node=8 (or NPROC_PER_NODE=8)"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_in_one_process_trains_like_plain_training(stage, dataset, tmp_path):
    """One process with a DeepSpeed config (the default nproc_per_node: 1) sets up its own single-rank group
    instead of looking for MPI, and trains to the losses of the same run without DeepSpeed."""
    common = {
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "constant",
        "learning_rate": 5e-3,
        "shuffle": False,
    }
    plain = recipe.run_sft(dataset, ModelConfig(), TrainConfig(**common, output_dir=str(tmp_path / "a")))
    before = dict(os.environ)
    ds = recipe.run_sft(
        dataset, ModelConfig(), TrainConfig(**common, deepspeed=ZERO[stage], output_dir=str(tmp_path / "b"))
    )
    assert dict(os.environ) == before  # the group's variables are gone again
    assert not torch.distributed.is_initialized()
    from transformers.integrations import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled()  # a later from_pretrained in this process builds a whole model
    losses = [h["loss"] for h in plain.history]
    assert len(losses) == 3 and [h["loss"] for h in ds.history] == pytest.approx(losses, rel=1e-3)


def test_several_nodes_need_master_addr():
    assert environment_problems(TrainConfig(nnodes=2), cuda=False, environ={}) == [
        "train.nnodes=2: set MASTER_ADDR to an address of node 0 that every node can reach (without it each node "
        "would look for rank 0 at 127.0.0.1, itself)"
    ]
    assert environment_problems(TrainConfig(), cuda=False, environ={"NNODES": "3"}) == [
        "train.nnodes=3: set MASTER_ADDR to an address of node 0 that every node can reach (without it each node "
        "would look for rank 0 at 127.0.0.1, itself)"
    ]
    assert environment_problems(TrainConfig(nnodes=2), cuda=False, environ={"MASTER_ADDR": "10.0.0.1"}) == []


class CountingHead(torch.nn.Linear):
    calls: list[int]

    def forward(self, x):
        self.calls.append(len(x))
        return super().forward(x)


@pytest.mark.parametrize("trained", [True, False])
def test_every_rank_can_be_made_to_call_the_head_equally_often(trained):
    """ZeRO-3 asserts every rank makes as many module calls: the extra chunks a rank with fewer labels runs are
    empty, and the loss is unchanged."""
    torch.manual_seed(0)
    head = CountingHead(8, 32, bias=False).requires_grad_(trained)
    head.calls = []
    hidden = torch.randn(1, 21, 8, requires_grad=True)
    labels = torch.randint(0, 32, (1, 21))
    labels[0, :5] = -100  # 16 labelled next tokens (positions 5..20): 2 chunks of 8
    plain = token_mean_loss(head, hidden, labels, chunk_rows=8)
    assert head.calls == [8, 8]
    head.calls = []
    padded = token_mean_loss(head, hidden, labels, chunk_rows=8, min_chunks=lambda n: max(n, 5))
    assert head.calls == [8, 8, 0, 0, 0]
    assert float(padded) == pytest.approx(float(plain), rel=1e-6)
    padded.backward()
    padded_grad, hidden.grad = hidden.grad, None
    plain.backward()  # the empty chunks add nothing to the gradient either
    assert torch.allclose(padded_grad, hidden.grad, rtol=1e-6, atol=1e-8) and float(hidden.grad.abs().sum()) > 0


def _resume_rank(rank: int, port: int, dirs: list[str], out) -> None:
    import torch.distributed as dist

    from qwen_pipeline.training.recipe import resume_point

    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out.put((rank, resume_point(Path(dirs[rank]), TrainConfig())))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes in a gloo group
def test_rank_zero_decides_whether_to_resume_for_every_rank(tmp_path):
    """Only rank 0 writes checkpoints: a rank whose own view of the folder has none (another node's disk, or a
    relative path from another working directory) still resumes from rank 0's, never starting fresh beside it."""
    import json
    import multiprocessing

    with_checkpoint, empty = tmp_path / "node0", tmp_path / "node1"
    (with_checkpoint / "checkpoint-2").mkdir(parents=True)
    (with_checkpoint / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 4}))
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    port = ranks.free_port()
    workers = [
        context.Process(target=_resume_rank, args=(r, port, [str(with_checkpoint), str(empty)], out)) for r in (0, 1)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    resumed = str(with_checkpoint / "checkpoint-2")
    assert dict(out.get(timeout=5) for _ in workers) == {0: resumed, 1: resumed}
