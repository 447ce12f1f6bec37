"""Evaluation while training: eval/loss in MLflow at the evaluation steps, early stopping when the validation
loss rises, the best step, and the validation sample it runs on."""

from __future__ import annotations

import dataclasses

import pytest
from datasets import Dataset, DatasetDict

from qwen_pipeline.config import ConfigError, ModelConfig, TrainConfig, parse_config
from qwen_pipeline.training.evaluating import eval_sample, eval_summary
from qwen_pipeline.training.recipe import run_sft

IM_END = 151645
QUESTIONS = ("hi", "what is 2 + 2?", "name a colour", "say something", "tell a joke", "你好", "why?", "how?")


def rows(tokenizer, answer: str) -> list[dict]:
    """Every question answered with ``answer``, masked as the format stage masks it."""
    target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [IM_END, 198]
    out = []
    for question in QUESTIONS:
        prompt = tokenizer(
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
        )["input_ids"]
        ids = prompt + target
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + target})
    return out


@pytest.fixture
def mlflow_run(tmp_path, monkeypatch):
    """An MLflow run in a store of its own, which the recipe's LiveMetrics logs into (as under kedro-mlflow)."""
    from mlflow import MlflowClient

    from qwen_pipeline.tracking.workers import RUN_ID_ENV

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("eval"))
    monkeypatch.setenv(RUN_ID_ENV, run.info.run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return client, run.info.run_id


def train(tokenizer, tmp_path, train_answer: str, eval_answer: str, **settings):
    data = DatasetDict(
        {
            "train": Dataset.from_list(rows(tokenizer, train_answer)),
            "validation": Dataset.from_list(rows(tokenizer, eval_answer)),
        }
    )
    settings = {"learning_rate": 2e-2, **settings}
    config = TrainConfig(
        per_device_train_batch_size=4, per_device_eval_batch_size=4, gradient_accumulation_steps=1,
        lr_scheduler_type="constant", shuffle=False, output_dir=str(tmp_path / "ckpt"), **settings,
    )  # fmt: skip
    return run_sft(data, ModelConfig(), config)


def test_eval_loss_is_logged_at_each_evaluation_beside_the_train_loss(tokenizer, tmp_path, mlflow_run, embedded_dir):
    client, run_id = mlflow_run
    result = train(tokenizer, tmp_path, "OK", "OK", max_steps=6, eval_strategy="steps", eval_steps=2)
    history = client.get_metric_history(run_id, "eval/loss")
    assert sorted(m.step for m in history) == [2, 4, 6]  # the final evaluation of the trained model is not a point
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3, 4, 5, 6]
    by_step = {m.step: m.value for m in history}
    assert by_step[6] < by_step[2]  # it learns what it is evaluated on
    summary = result.summary
    assert (summary["evaluations"], summary["best_step"], summary["stopped_by"]) == (3, 6, "schedule")
    assert summary["best_eval_loss"] == pytest.approx(by_step[6])
    assert summary["eval_loss"] == by_step[6]  # the last evaluation, at the last step: not run again


@pytest.mark.parametrize("layout", [{"packing": True, "pack_length": 64}, {"neat_packing": True, "pack_length": 64},
                                    {"padding_free": True}])  # fmt: skip
def test_eval_under_packed_layouts_is_the_eval_of_unpacked_examples(tokenizer, tmp_path, embedded_dir, layout):
    """With the weights left as they are (learning rate 0), the eval loss is the same whatever the training
    layout: the validation examples are evaluated one per segment, never packed together."""
    settings = {"learning_rate": 0.0, "max_steps": 1, "eval_strategy": "steps", "eval_steps": 1}
    plain = train(tokenizer, tmp_path / "plain", "OK", "OK then", **settings).summary["eval_loss"]
    packed = train(tokenizer, tmp_path / "packed", "OK", "OK then", **settings, **layout).summary["eval_loss"]
    assert packed == pytest.approx(plain, rel=1e-5)


def test_early_stopping_stops_a_run_whose_validation_loss_rises(tokenizer, tmp_path, mlflow_run, embedded_dir):
    """Trained to answer "OK", evaluated on "No way": the validation loss rises as it learns, and the run stops
    after two evaluations without improvement; with load_best_model_at_end the trained model is the best step's."""
    client, run_id = mlflow_run
    settings = {"eval_strategy": "steps", "eval_steps": 1, "early_stopping_patience": 2, "load_best_model_at_end": True}
    result = train(tokenizer, tmp_path, "OK", "No way", max_steps=30, **settings)
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "eval/loss")}
    summary = result.summary
    assert summary["stopped_by"] == "early_stopping" and summary["global_steps"] < 30
    best = min(losses, key=losses.get)
    assert summary["best_step"] == best and summary["best_eval_loss"] == pytest.approx(losses[best])
    assert sorted(losses) == list(range(1, summary["global_steps"] + 1))
    assert summary["global_steps"] == best + 2  # two evaluations without improvement after the best
    assert summary["eval_loss"] == pytest.approx(losses[best], rel=1e-4)  # the best checkpoint was loaded back


def test_best_step_is_the_lowest_eval_loss_and_the_first_of_equals():
    history = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "eval_loss": 2.5},
        {"step": 4, "eval_loss": 2.0},
        {"step": 6, "eval_loss": 2.0},
        {"step": 8, "eval_loss": 2.2},
    ]
    assert eval_summary(history, None) == {
        "evaluations": 4,
        "best_step": 4,
        "best_eval_loss": 2.0,
        "stopped_by": "schedule",
    }
    assert eval_summary([{"step": 1, "loss": 3.0}], None) == {}


def test_the_validation_sample_is_seeded_bounded_and_in_order():
    validation = Dataset.from_dict({"x": list(range(100))})
    config = TrainConfig(eval_max_samples=10, seed=7)
    sample = eval_sample(validation, config)
    assert len(sample) == 10 and sample["x"] == sorted(sample["x"])
    assert eval_sample(validation, config)["x"] == sample["x"]  # the same examples at every evaluation
    assert eval_sample(validation, TrainConfig(eval_max_samples=10, seed=8))["x"] != sample["x"]
    assert eval_sample(validation, TrainConfig())["x"] == list(range(100))


def test_eval_settings_are_checked_together():
    with pytest.raises(ConfigError) as error:
        parse_config(
            TrainConfig,
            {"early_stopping_patience": 2, "eval_steps": 0, "eval_max_samples": -1, "load_best_model_at_end": True},
            "train",
        )
    assert error.value.problems == [
        "train.eval_steps: must be positive, got 0",
        "train.eval_max_samples: must be positive, got -1",
        "train.load_best_model_at_end: needs evaluations while training; set eval_strategy: steps (or epoch)",
    ]
    with pytest.raises(ConfigError) as error:
        parse_config(
            TrainConfig,
            {"eval_strategy": "steps", "eval_steps": 3, "save_steps": 4, "load_best_model_at_end": True},
            "train",
        )
    assert str(error.value) == (
        "invalid configuration: train.save_steps: 4 is not a multiple of eval_steps 3: load_best_model_at_end can "
        "only return a checkpoint saved at an evaluation (or set save_steps: 0 to save the best one only)"
    )


def test_evaluating_while_training_needs_a_validation_split(tokenizer):
    from helpers import base_model_of, stage_output

    from qwen_pipeline.errors import DataError
    from qwen_pipeline.pipelines.train.nodes import train_model

    data = stage_output(DatasetDict({"train": Dataset.from_list(rows(tokenizer, "OK"))}), cutoff_len=64)
    with pytest.raises(DataError) as error:
        train_model(data, base_model_of(), {"eval_strategy": "steps"})
    assert str(error.value) == (
        "sft_dataset cannot be trained on: train.eval_strategy=steps evaluates on the validation split, and it has "
        "none: set format.val_size (e.g. 0.1) or ingest.eval_dataset, then run kedro run --pipelines format"
    )


def test_generation_eval_logs_scores_and_one_table_per_evaluation(tokenizer, tmp_path, mlflow_run, embedded_dir):
    import json
    from pathlib import Path

    client, run_id = mlflow_run
    settings = {"eval_strategy": "steps", "eval_steps": 2, "generation_eval": {"samples": 3, "max_new_tokens": 4}}
    config = parse_config(TrainConfig, settings, "train")
    result = train(
        tokenizer, tmp_path, "OK", "OK", max_steps=4, **{**settings, "generation_eval": config.generation_eval}
    )
    for name in ("eval/bleu-4", "eval/rouge-1", "eval/rouge-2", "eval/rouge-l", "eval/generation_seconds"):
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == [2, 4], name
    tables = sorted(a.path for a in client.list_artifacts(run_id, "generation_eval"))
    assert tables == ["generation_eval/step_000002.json", "generation_eval/step_000004.json"]
    table = json.loads(Path(client.download_artifacts(run_id, tables[1], str(tmp_path))).read_text())
    assert table["columns"] == ["step", "prompt", "reference", "answer"] and len(table["data"]) == 3
    steps, prompts, references, answers = zip(*table["data"])
    assert set(steps) == {4} and all(p.startswith("<|im_start|>user\n") and p.endswith("assistant\n") for p in prompts)
    assert set(references) == {"OK\n"} and all(len(tokenizer(a)["input_ids"]) <= 4 for a in answers)
    assert result.summary["generation_eval_seconds"] > 0


def test_generation_eval_settings_are_a_block_of_their_own():
    with pytest.raises(ConfigError) as error:
        parse_config(TrainConfig, {"generation_eval": {"sample": 8, "max_new_tokens": 0}}, "train")
    assert error.value.problems == ["train.generation_eval.sample: unknown parameter (did you mean 'samples'?)"]
    with pytest.raises(ConfigError) as error:
        parse_config(TrainConfig, {"generation_eval": {"samples": 8, "max_new_tokens": 0}}, "train")
    assert error.value.problems == ["train.generation_eval.max_new_tokens: must be positive, got 0"]
    with pytest.raises(ConfigError) as error:
        parse_config(TrainConfig, {"generation_eval": {"samples": 8}}, "train")
    assert error.value.problems == [
        "train.generation_eval: needs evaluations while training; set eval_strategy: steps (or epoch)"
    ]
    with pytest.raises(ConfigError, match=r"train.generation_eval: expected a mapping of samples, max_new_tokens, "):
        parse_config(TrainConfig, {"generation_eval": 8}, "train")


def test_generation_eval_under_zero3_with_several_processes_is_refused_before_loading():
    from qwen_pipeline.training.checks import environment_problems

    config = parse_config(
        TrainConfig,
        {
            "deepspeed": "conf/base/deepspeed/zero3.json",
            "nproc_per_node": 2,
            "eval_strategy": "steps",
            "generation_eval": {"samples": 4},
        },
        "train",
    )
    found = [p for p in environment_problems(config, cuda=False, environ={}) if p.startswith("train.generation_eval")]
    assert found == [
        "train.generation_eval: answers while training are not supported under ZeRO-3 with several processes yet "
        "(each rank holds a shard; generate would need every rank in step): set generation_eval.samples: 0, or "
        "use ZeRO-2"
    ]
    one = dataclasses.replace(config, nproc_per_node=1)
    assert not [p for p in environment_problems(one, cuda=False, environ={}) if p.startswith("train.generation_eval")]


def test_the_run_summary_names_the_best_step_and_why_training_stopped(tmp_path):
    from kedro.io import DataCatalog, MemoryDataset

    from qwen_pipeline.datasets import ModelDataset
    from qwen_pipeline.summary import summary_lines

    summary = {"global_steps": 9, "first_loss": 3.0, "last_loss": 1.5, "eval_loss": 2.1, "evaluations": 9,
               "best_step": 7, "best_eval_loss": 2.1, "stopped_by": "early_stopping"}  # fmt: skip
    catalog = DataCatalog(
        {"training_summary": MemoryDataset(summary), "trained_model": ModelDataset(filepath=str(tmp_path / "t"))}
    )
    lines = summary_lines({"training_summary"}, catalog, 1.0)
    assert f"training: 9 steps, loss 3.0000 -> 1.5000, eval loss 2.1000 -> {tmp_path / 't'}" in lines
    assert "evaluations: 9, the best at step 7 (eval loss 2.1000); early stopping ended it" in lines
