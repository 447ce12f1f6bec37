"""Two torchrun CPU processes (gloo DDP) give the per-step losses of one process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import demo_sft_dataset

from qwen_pipeline.config import ModelConfig, TrainConfig
from qwen_pipeline.training import launcher
from qwen_pipeline.training.recipe import run_sft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return demo_sft_dataset(tokenizer, max_samples=32)


def test_two_torchrun_processes_train_and_hand_back_the_adapter(dataset, tmp_path, monkeypatch):
    """The launcher runs the recipe under torchrun (gloo DDP, 2 CPU processes) and reads rank 0's result."""
    import torch

    monkeypatch.setenv("MASTER_PORT", "29517")
    config = TrainConfig(
        per_device_train_batch_size=2,
        nproc_per_node=2,
        max_steps=4,
        learning_rate=5e-3,
        gradient_accumulation_steps=1,
        logging_steps=1,
        output_dir=str(tmp_path / "two"),
    )
    result = launcher.train(dataset, ModelConfig(), config)
    assert [h["step"] for h in result.history] == [1.0, 2.0, 3.0, 4.0]
    assert result.summary["global_steps"] == 4
    ids = torch.tensor([dataset["train"][0]["input_ids"]])
    with torch.no_grad():
        trained = result.model.eval()(ids).logits
        with result.model.disable_adapter():
            base = result.model(ids).logits
    assert float((trained - base).abs().max()) > 0.1


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
@pytest.mark.parametrize(("zero", "port", "rel"), [(None, 29519, 1e-4), ("zero2", 29521, 1e-3), ("zero3", 29522, 1e-3)])
def test_two_processes_give_the_losses_of_one(zero, port, rel, dataset, one_process_losses, tmp_path, monkeypatch):
    if zero:
        pytest.importorskip("deepspeed")
    monkeypatch.setenv("MASTER_PORT", str(port))
    deepspeed = (
        str(Path(__file__).resolve().parents[1] / "conf" / "base" / "deepspeed" / f"{zero}.json") if zero else None
    )
    double = launcher.train(
        dataset,
        ModelConfig(),
        TrainConfig(
            per_device_train_batch_size=2,
            nproc_per_node=2,
            deepspeed=deepspeed,
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
