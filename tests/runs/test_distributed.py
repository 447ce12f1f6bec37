"""Two torchrun CPU processes (gloo DDP) give the per-step losses of one process with the same global batch."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import base_model_of, demo_sft_dataset, stage_output

from qwen_pipeline.config import ModelConfig, TrainConfig
from qwen_pipeline.datasets import ModelDataset
from qwen_pipeline.pipelines.train.nodes import train_model
from qwen_pipeline.training import launcher
from qwen_pipeline.training.ranks import free_port
from qwen_pipeline.training.recipe import data_fingerprint, run_sft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return demo_sft_dataset(tokenizer, max_samples=32)


def next_message_starting(messages: queue.Queue[str], prefix: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if (message := messages.get(timeout=1)).startswith(prefix):
                return message
        except queue.Empty:
            pass
    raise AssertionError(f"nothing logged starting with {prefix!r} within {seconds} s")


def test_two_torchrun_processes_hand_the_saved_adapter_to_the_catalog(dataset, tmp_path, monkeypatch):
    """Under torchrun the Kedro process never loads the model: rank 0 saves it, the trained_model dataset
    moves that folder into place, and what lands there is the trained adapter."""
    import peft
    import torch
    import transformers

    import qwen_pipeline.models

    monkeypatch.setenv("MASTER_PORT", str(free_port()))

    def refuse(*args, **kwargs):
        raise AssertionError(f"the Kedro process loaded a model: {args}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", refuse)
    monkeypatch.setattr(qwen_pipeline.models, "load_causal_lm", refuse)
    params = {
        "per_device_train_batch_size": 2,
        "nproc_per_node": 2,
        "max_steps": 4,
        "learning_rate": 5e-3,
        "gradient_accumulation_steps": 1,
        "logging_steps": 1,
        "output_dir": str(tmp_path / "checkpoints"),
    }
    files, history, summary, _, _ = train_model(stage_output(dataset, cutoff_len=128), base_model_of(), params)
    assert [int(entry["step"]) for entry in history] == [1, 2, 3, 4]
    assert files.path.parent == tmp_path / "checkpoints"  # staged beside the checkpoints: moving it is a rename
    trained = tmp_path / "06_models" / "trained"
    ModelDataset(filepath=str(trained), lazy=True).save(files)
    monkeypatch.undo()

    assert not list((tmp_path / "checkpoints").glob(".qwen-*"))  # work and staging folders gone
    assert sorted(p.name for p in trained.iterdir()) == [
        "README.md",  # PEFT's model card
        "adapter_config.json",
        "adapter_model.safetensors",
        "chat_template.jinja",
        "qwen_pipeline.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    manifest = json.loads((trained / "qwen_pipeline.json").read_text())
    assert manifest["kind"] == "adapter"
    assert manifest["base_model"] == ModelConfig().model_name_or_path
    assert manifest["finetuning_type"] == "lora"
    assert manifest["data_fingerprint"] == data_fingerprint(dataset["train"]) == summary["data_fingerprint"]
    assert manifest["training"]["global_steps"] == 4
    bundle = ModelDataset(filepath=str(trained)).load()
    ids = torch.tensor([dataset["train"][0]["input_ids"]])
    with torch.no_grad():
        tuned = bundle.model.eval()(ids).logits
        with bundle.model.disable_adapter():
            base = bundle.model(ids).logits
    assert float((tuned - base).abs().max()) > 0.1


COMMON = {
    "learning_rate": 5e-3,
    "max_steps": 4,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
    "shuffle": False,  # the same examples in each global batch
}


@pytest.fixture(scope="module")
def one_process_losses(dataset, tmp_path_factory):
    """The reference: one process, batch 4 (computed once for DDP, ZeRO-2 and ZeRO-3)."""
    out = tmp_path_factory.mktemp("one")
    single = run_sft(dataset, ModelConfig(), TrainConfig(per_device_train_batch_size=4, output_dir=str(out), **COMMON))
    return [h["loss"] for h in single.history]


# Same examples, same token-weighted loss; only the order of fp32 sums differs (gloo all-reduce vs one
# batch; DeepSpeed's partitioned reductions and its own Adam), which moves the losses by ~1e-6 relative.
# 1e-4 (DDP) and 1e-3 (DeepSpeed) leave room; a mean-of-means loss would be 5% off on step 1 here.
# ZeRO-3 with 8-row loss chunks: the two ranks hold different numbers of labelled tokens, so different numbers
# of head chunks; DeepSpeed's trace check needs equal module calls on every rank (it hung before they were padded).
@pytest.mark.parametrize(
    ("zero", "port", "rel", "chunk_rows"),
    [(None, 29519, 1e-4, 512), ("zero2", 29521, 1e-3, 512), ("zero3", 29522, 1e-3, 512), ("zero3", 29523, 1e-3, 8)],
)
def test_two_processes_give_the_losses_of_one(
    zero, port, rel, chunk_rows, dataset, one_process_losses, tmp_path, monkeypatch
):
    if zero:
        pytest.importorskip("deepspeed")
    monkeypatch.setenv("MASTER_PORT", str(port))
    deepspeed = (
        str(Path(__file__).resolve().parents[2] / "conf" / "base" / "deepspeed" / f"{zero}.json") if zero else None
    )
    double = launcher.train(
        dataset,
        ModelConfig(),
        TrainConfig(
            per_device_train_batch_size=2,
            nproc_per_node=2,
            deepspeed=deepspeed,
            loss_chunk_rows=chunk_rows,
            ddp_timeout=300,  # a hang fails within 5 minutes, not gloo's 30
            output_dir=str(tmp_path / "two"),
            **COMMON,
        ),
    )
    two = [h["loss"] for h in double.history]
    assert len(two) == 4 and two == pytest.approx(one_process_losses, rel=rel), (one_process_losses, two)


def test_worker_failure_is_a_clear_error(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29518")
    config = TrainConfig(nproc_per_node=2, max_steps=1, output_dir=str(tmp_path / "bad"))
    with pytest.raises(launcher.TrainingError, match=r"torchrun exited with code 1; the last lines of its workers"):
        launcher.train(dataset, ModelConfig(model_name_or_path=str(tmp_path / "no-such-model")), config)
    assert list((tmp_path / "bad").iterdir()) == []  # no work or staging folder left behind


def run_two_nodes(dataset, config, shared: Path, monkeypatch, *, node_1_cwd: Path | None = None):
    """Multi-node on one machine: the launcher as node 0 (NNODES=2, NODE_RANK=0) in a thread; the worker command
    it logs for the other nodes, run as a user pastes it (NODE_RANK=1, from ``node_1_cwd``). Returns the
    TrainedModel and the logged command."""
    import psutil

    port = free_port()
    for name, value in {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("QWEN_PIPELINE_WORK_DIR", str(shared))
    logged: queue.Queue[str] = queue.Queue()
    handler = logging.Handler()
    handler.emit = lambda record: logged.put(record.getMessage())
    launcher.logger.setLevel(logging.INFO)
    launcher.logger.addHandler(handler)
    outcome: dict[str, object] = {}

    def node_0() -> None:
        try:
            outcome["trained"] = launcher.train(dataset, ModelConfig(), config)
        except BaseException as error:  # handed to the test's thread, which asserts on it
            outcome["error"] = error

    before = {child.pid for child in psutil.Process().children(recursive=True)}
    thread = threading.Thread(target=node_0, daemon=True)
    thread.start()
    try:
        message = next_message_starting(logged, "On each other node", seconds=120)
        command = message.split(" run: ", 1)[1]
        node_1 = subprocess.run(
            ["bash", "-c", command],  # as a user pastes it, $NODE_RANK from the environment
            env={**os.environ, "NODE_RANK": "1"},
            cwd=node_1_cwd,
            capture_output=True,
            text=True,
            timeout=480,
        )
        assert node_1.returncode == 0, node_1.stdout[-3000:]
        thread.join(timeout=120)
        assert not thread.is_alive(), "node 0 did not finish after node 1 did"
    finally:
        launcher.logger.removeHandler(handler)
        for child in psutil.Process().children(recursive=True):  # only what this test started; never hang
            if child.pid not in before:
                child.kill()
        thread.join(timeout=30)
    assert "error" not in outcome, outcome.get("error")
    return outcome["trained"], message


def test_two_nodes_launcher_and_its_logged_command_give_the_losses_of_one(
    dataset, one_process_losses, tmp_path, monkeypatch
):
    """The launcher as node 0 logs the worker command for the other node; that command, run with NODE_RANK=1,
    trains together with it, one process a node, batch 2 each: the losses of one process with batch 4."""
    shared = tmp_path / "shared"
    # a stray worker gives up after 5 minutes instead of gloo's 30
    config = TrainConfig(per_device_train_batch_size=2, output_dir=str(tmp_path / "ckpt"), ddp_timeout=300, **COMMON)
    trained, message = run_two_nodes(dataset, config, shared, monkeypatch)
    expected = (
        f"On each other node, with NODE_RANK set to its rank, run: {sys.executable} -m torch.distributed.run"
        " --nproc_per_node=1 --nnodes=2 --node_rank=$NODE_RANK --master_addr=127.0.0.1"
        f" --master_port={os.environ['MASTER_PORT']} -m qwen_pipeline.training {shared}/.qwen-train-"
    )
    assert message.startswith(expected), message
    assert trained.path.parent == shared and [p.name for p in shared.iterdir()] == [trained.path.name]
    assert trained.kind == "adapter" and (trained.path / "adapter_model.safetensors").is_file()
    two = [h["loss"] for h in trained.history]
    # gloo all-reduce across the two nodes vs one batch: the DDP tolerance above
    assert len(two) == 4 and two == pytest.approx(one_process_losses, rel=1e-4), (one_process_losses, two)


def test_two_nodes_resume_together_with_node_1_started_elsewhere(dataset, tmp_path, monkeypatch):
    """A relative output_dir and node 1 started from another folder: both nodes checkpoint and resume in the same
    place (the launcher hands the workers an absolute output_dir, rank 0 decides whether to resume). An interrupted
    run (its last checkpoint removed) resumed on two nodes trains only the missing steps, to the same losses."""
    node_0, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    node_0.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(node_0)
    config = TrainConfig(
        per_device_train_batch_size=2, output_dir="ckpt", save_steps=2, save_total_limit=None, ddp_timeout=300, **COMMON
    )
    first, _ = run_two_nodes(dataset, config, tmp_path / "shared", monkeypatch, node_1_cwd=elsewhere)
    [run_dir] = list((node_0 / "ckpt").glob("[0-9a-f]*"))
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(elsewhere.iterdir())  # node 1 wrote nothing relative to its own folder
    shutil.rmtree(run_dir / "checkpoint-4")  # as if the run had stopped after step 3
    second, _ = run_two_nodes(dataset, config, tmp_path / "shared2", monkeypatch, node_1_cwd=elsewhere)
    assert (second.summary["resumed_from_step"], second.summary["steps_this_run"]) == (2, 2)
    losses = {int(h["step"]): h["loss"] for h in first.history}
    assert {int(h["step"]): h["loss"] for h in second.history if h["step"] > 2} == pytest.approx(
        {3: losses[3], 4: losses[4]}, rel=1e-4
    )


def test_zero3_builds_the_model_partitioned_in_every_process(tmp_path):
    """Under ZeRO-3 the recipe creates its TrainingArguments (the live DeepSpeed config) before loading, so
    transformers builds the model partitioned (zero.Init): each of 2 processes holds half the weights, and a GPU
    never receives the whole model. (Loaded the other way round, each process builds all of it and DeepSpeed
    partitions it only after moving it to the device.) While loading, the memory each process owns stays near the
    half it keeps (the layers gathered on the CPU are handed back to the OS: ``return_freed_host_memory``); rank 0
    also maps the checkpoint, whose pages are the OS's file cache, shared and not multiplied by the ranks."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    # Many wide layers and a small vocabulary: no single tensor is a large share of the 1.4 GB model.
    config = Qwen2Config(
        vocab_size=1024,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    full = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(str(model_dir))
    del model
    worker = Path(__file__).parents[1] / "workers" / "zero3_load.py"
    deepspeed = Path(__file__).resolve().parents[2] / "conf" / "base" / "deepspeed" / "zero3.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        str(worker), str(model_dir), str(deepspeed), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["weights_held"] for r in ranks] == [pytest.approx(full / 2, rel=0.01)] * 2
    owned = [r["grown"]["RssAnon"] / full for r in ranks]
    logging.getLogger(__name__).info(
        "ZeRO-3 load, peak growth per rank / one full copy: %s",
        [{kind: round(grown / full, 2) for kind, grown in r["grown"].items()} for r in ranks],
    )
    # Measured 0.53 on each rank (it was 1.02 on rank 0 with glibc's dynamic threshold); the rest of 0.6 is room
    # for a gathered layer (4% of the model here) and allocator rounding.
    assert max(owned) < 0.6, owned
    assert ranks[1]["grown"]["RssFile"] < 0.05 * full  # only rank 0 reads the checkpoint's values
