"""Train takes the cutoff_len and template from the tokenized data it reads (what format recorded), not from
params:format, and refuses data it cannot learn from before any model loads (issue 15, "The data decides")."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from datasets import Dataset, DatasetDict
from datasets.table import InMemoryTable
from helpers import base_model_of, conversation_rows, copy_project, stage_output, validate

from qwen_pipeline.config import FormatConfig, run_problems
from qwen_pipeline.data.tokenizing import SFT_SCHEMA
from qwen_pipeline.datasets import StageDataset, StageOutput
from qwen_pipeline.errors import DataError, DataSourceError
from qwen_pipeline.pipelines.format.nodes import data_settings, tokenize_conversations
from qwen_pipeline.pipelines.train import nodes
from qwen_pipeline.pipelines.train.nodes import train_model
from qwen_pipeline.training.launcher import TrainedModel
from qwen_pipeline.training.packing import pack, row_lengths

FORMAT_DEFAULTS = {
    "template": "qwen",
    "cutoff_len": 2048,
    "train_on_prompt": False,
    "mask_history": False,
    "tokenization": "turns",
    "overlength": "truncate",
    "control_tokens": "keep",
}


def examples(lengths: list[int], learned: list[int]) -> Dataset:
    """Tokenized examples as format writes them: example i has ``lengths[i]`` tokens, the last ``learned[i]``
    of them labelled."""
    rows = [
        {"input_ids": list(range(n)), "attention_mask": [1] * n, "labels": [-100] * (n - k) + list(range(n - k, n))}
        for n, k in zip(lengths, learned)
    ]
    return Dataset(InMemoryTable(pa.Table.from_pylist(rows, schema=SFT_SCHEMA)))


def sft(lengths: list[int], learned: list[int], **format_params) -> StageOutput:
    return stage_output(DatasetDict({"train": examples(lengths, learned)}), **format_params)


@pytest.fixture
def nothing_loads(monkeypatch):
    """The data checks come first: the environment check and training must not be reached."""

    def refuse(*args, **kwargs):
        raise AssertionError("reached past the data checks")

    monkeypatch.setattr(nodes, "environment_problems", refuse)
    monkeypatch.setattr(nodes, "train", refuse)


@pytest.fixture
def trained(monkeypatch, tmp_path):
    """Training stood in for: records the dataset and config the node passes on."""
    calls = []

    def fake_train(dataset, model_config, config):
        calls.append((dataset, config))
        summary = {"data_fingerprint": "abc", "first_loss": 2.5, "last_loss": 2.0, "global_steps": 1}
        history = [{"step": 1.0, "loss": 2.5}]
        return TrainedModel(path=tmp_path / "model", kind="adapter", history=history, summary=summary)

    monkeypatch.setattr(nodes, "environment_problems", lambda config: [])
    monkeypatch.setattr(nodes, "train", fake_train)
    return calls


def message(error: pytest.ExceptionInfo) -> str:
    return str(error.value)


# --- (b) examples longer than pack_length -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["packing", "neat_packing"])
def test_examples_longer_than_pack_length_stop_the_run_before_anything_loads(nothing_loads, mode):
    with pytest.raises(DataError) as error:
        train_model(sft([10, 40, 50], [3, 5, 5], cutoff_len=64), base_model_of(), {mode: True, "pack_length": 32})
    assert message(error) == (
        "sft_dataset cannot be trained on: 2 of 3 training examples are longer than train.pack_length=32 "
        "(the longest: 50 tokens; the data was made with cutoff_len=64): packing would cut them. Raise "
        "train.pack_length to at least 50 or leave it unset (it then follows the data's cutoff_len), or make the "
        "data with format.cutoff_len=32 (run kedro run --pipelines format)"
    )


def test_pack_length_follows_the_data_not_params_format(trained):
    """The issue's run: data made with cutoff_len 64; params:format is not even an input of the node now."""
    data = sft([10, 40, 50], [3, 5, 5], cutoff_len=64)
    model, history, summary, metrics, _ = train_model(data, base_model_of(), {"packing": True, "max_steps": 2})
    [(dataset, config)] = trained
    assert dataset is data.data  # the splits, as before: the launcher is unchanged
    assert config.pack_length == 64
    assert (summary["pack_length"], summary["data_cutoff_len"], summary["data_template"]) == (64, 64, "qwen")
    assert model.manifest["data"] == {"template": "qwen", "cutoff_len": 64}
    assert model.manifest["train_config"]["pack_length"] == 64 and model.manifest["training"] == summary
    assert metrics["pack_length"] == {"value": 64.0, "step": 0}
    assert metrics["data_cutoff_len"] == {"value": 64.0, "step": 0} and "data_template" not in metrics


def test_without_packing_long_examples_are_no_problem_and_pack_length_is_left_alone(trained):
    _, _, summary, _, _ = train_model(sft([10, 40, 50], [3, 5, 5], cutoff_len=64), base_model_of(), {"pack_length": 32})
    [(_, config)] = trained
    assert config.pack_length == 32 and "pack_length" not in summary and summary["data_cutoff_len"] == 64


def test_pack_refuses_to_cut_an_example():
    data = examples([10, 40, 50], [3, 5, 5])
    expected = "2 examples are longer than pack_length=32 (the longest: 50 tokens); packing does not cut them: raise"
    with pytest.raises(ValueError, match=re.escape(expected)):
        pack(data, 32, neat=False)
    packed, stats = pack(data, 50, neat=False)  # exactly as long as the longest: no error, nothing cut
    assert row_lengths(packed).tolist() == [50, 50] and stats["examples"] == 3 and stats["bins"] == 2


# --- (c) no labelled token ------------------------------------------------------------------------------------


def test_a_train_split_without_a_label_stops_the_run_before_anything_loads(nothing_loads):
    with pytest.raises(DataError) as error:
        train_model(sft([10, 40], [0, 0], cutoff_len=64, train_on_prompt=False), base_model_of(), {})
    assert message(error) == (
        "sft_dataset cannot be trained on: its train split holds no labelled token (2 examples, 50 tokens, every "
        "label -100): there is nothing to learn. It was made with cutoff_len=64, train_on_prompt=False, "
        "mask_history=False: raise format.cutoff_len if prompts fill it, or set format.train_on_prompt: true, or "
        "check the answers in the data; then run kedro run --pipelines format"
    )


def test_an_empty_train_split_is_training_on_nothing(nothing_loads):
    with pytest.raises(DataError, match=re.escape("no labelled token (0 examples, 0 tokens, every label -100)")):
        train_model(sft([], [], cutoff_len=64), base_model_of(), {"packing": True})


# --- (a) no recorded settings, and all problems at once ---------------------------------------------------------


def test_data_without_recorded_settings_is_refused(nothing_loads):
    with pytest.raises(DataError) as error:
        train_model(StageOutput(DatasetDict({"train": examples([10], [3])}), "fp"), base_model_of(), {"packing": True})
    assert message(error) == (
        "sft_dataset cannot be trained on: it does not record the cutoff_len and template it was made with (made "
        "by an older version of the format stage): run kedro run --pipelines format"
    )


def test_every_data_problem_is_listed_at_once(nothing_loads):
    data = StageOutput(DatasetDict({"train": examples([10, 40], [0, 0])}), "fp")
    with pytest.raises(DataError) as error:
        train_model(data, base_model_of(), {"packing": True, "pack_length": 32})
    assert message(error).splitlines() == [
        "sft_dataset cannot be trained on:",
        "  - it does not record the cutoff_len and template it was made with (made by an older version of the "
        "format stage): run kedro run --pipelines format",
        "  - 1 of 2 training examples are longer than train.pack_length=32 (the longest: 40 tokens; the data was "
        "made with cutoff_len=unknown): packing would cut them. Raise train.pack_length to at least 40 or leave it "
        "unset (it then follows the data's cutoff_len), or make the data with format.cutoff_len=32 (run kedro run "
        "--pipelines format)",
        "  - its train split holds no labelled token (2 examples, 50 tokens, every label -100): there is nothing to "
        "learn. It was made with unrecorded settings: raise format.cutoff_len if prompts fill it, or set "
        "format.train_on_prompt: true, or check the answers in the data; then run kedro run --pipelines format",
    ]


def test_data_without_a_train_split_is_refused(nothing_loads):
    data = stage_output(DatasetDict({"validation": examples([10], [3])}), cutoff_len=64)
    with pytest.raises(DataError) as error:
        train_model(data, base_model_of(), {})
    assert message(error) == "sft_dataset cannot be trained on: it has no train split: run kedro run --pipelines format"


# --- the settings: made by format, stored by StageDataset ---------------------------------------------------


def test_settings_round_trip_through_the_stage_dataset(tmp_path, nothing_loads):
    settings = data_settings(FormatConfig(cutoff_len=1024, mask_history=True))
    assert settings == {**FORMAT_DEFAULTS, "cutoff_len": 1024, "mask_history": True}
    data = DatasetDict({"train": examples([3, 4], [1, 1]), "validation": examples([5], [2])})
    path = tmp_path / "sft"
    StageDataset(path=str(path)).save(StageOutput(data, "fp1", {"report": 1, "dropped": []}, settings))
    assert json.loads((path / "stage.json").read_text())["settings"] == settings

    loaded = StageDataset(path=str(path)).load()
    assert isinstance(loaded, StageOutput)
    assert (loaded.fingerprint, loaded.outputs, loaded.settings) == ("fp1", {"report": 1, "dropped": []}, settings)
    assert row_lengths(loaded.data["train"]).tolist() == [3, 4] and loaded.data["validation"]["labels"] == [
        [-100, -100, -100, 3, 4]
    ]
    assert StageDataset(path=str(path), previous=True).load().settings == settings

    # Same fingerprint, other settings: stored again (what is on disk must say what the data was made with).
    StageDataset(path=str(path)).save(dataclasses.replace(loaded, settings={**settings, "cutoff_len": 2048}))
    assert StageDataset(path=str(path)).load().settings["cutoff_len"] == 2048

    # A folder written before settings were recorded loads with none, which train refuses.
    layout = json.loads((path / "stage.json").read_text())
    del layout["settings"]
    (path / "stage.json").write_text(json.dumps(layout))
    old = StageDataset(path=str(path)).load()
    assert old.settings == {}
    with pytest.raises(DataError, match=re.escape("made by an older version of the format stage")):
        train_model(old, base_model_of(), {})


def test_a_missing_or_stale_stage_output_is_the_same_error_with_stage_output(tmp_path):
    missing = StageDataset(path=str(tmp_path / "none"))
    with pytest.raises(DataSourceError, match=re.escape("none: no complete stage output here (no stage.json)")):
        missing.load()
    target = StageDataset(path=str(tmp_path / "sft"))
    target.save(stage_output(DatasetDict({"train": examples([3], [1])}), "fp1", cutoff_len=64))
    assert target.mark_stale("the last run stopped in validate") is True
    with pytest.raises(DataSourceError, match="sft is an earlier run's output, not current: the last run stopped"):
        target.load()


def test_format_records_what_the_data_was_made_with_and_a_reuse_keeps_its_own(monkeypatch):
    records = [
        {"dataset": "d", "file": "d.json", "index": 0, "system": None, "tools": None, "split": None, "error": None,
         "messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]}
    ]  # fmt: skip
    conversations = conversation_rows(validate(records, {})[0])
    model, params, processing = base_model_of(), {"cutoff_len": 64, "mask_history": True}, {}
    out, report, _ = tokenize_conversations(conversations, None, model, params, processing)
    assert out.settings == {**FORMAT_DEFAULTS, "cutoff_len": 64, "mask_history": True}
    assert report["reused"] is False

    again, report, _ = tokenize_conversations(conversations, out, model, params, processing)
    assert again is out and report["reused"] is True

    # An output stored before settings were recorded is made again, so train can read them.
    older = dataclasses.replace(out, settings={})
    remade, report, _ = tokenize_conversations(conversations, older, model, params, processing)
    assert report["reused"] is False and remade.settings == out.settings


# --- the rule across stages, and evaluate -------------------------------------------------------------------


def test_pack_length_against_params_format_only_when_format_runs_too():
    params = {"format": {"cutoff_len": 1024}, "train": {"packing": True, "pack_length": 32}}
    assert run_problems(params, {"format", "train"}, {"train"}) == ([], [])  # train checks it against the data
    errors, _ = run_problems(params, {"format", "train"}, {"format", "train"})
    assert errors == [
        "train.pack_length=32 is below format.cutoff_len=1024: with packing every longer example would be cut to "
        "pack_length. Raise pack_length, or leave it unset (it then follows cutoff_len)"
    ]


def test_evaluate_takes_the_data_out_of_the_stage_output():
    from qwen_pipeline.pipelines.evaluate.nodes import evaluate_finetuned

    data = stage_output(DatasetDict({"train": examples([3], [1])}), cutoff_len=64)
    with pytest.raises(DataError, match="sft_dataset has no validation split: set format.val_size above 0"):
        evaluate_finetuned(None, data, {})


# --- the scenario, as a user runs it ---------------------------------------------------------------------


def kedro_run(root: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QWEN_PIPELINE_CACHE": str(cache), "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200"}
    env.pop("QWEN_PIPELINE_TRACEBACK", None)
    command = [sys.executable, "-m", "kedro", "run", *args]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_packs_to_the_cutoff_the_data_was_made_with(tmp_path, model_cache):
    """Format with cutoff_len 1024; a later train run with format.cutoff_len=32 packs to 1024 (not 32, which
    cut every example to prompt tokens and trained on nothing: loss 0, exit 0); train.pack_length=32 stops
    before any model loads, naming 32 and the longest example."""
    root = copy_project(tmp_path / "project")
    made = kedro_run(root, model_cache, "--pipelines", "ingest,validate,format", "--params", "format.cutoff_len=1024")
    assert made.returncode == 0, made.stderr[-3000:]
    train_split = StageDataset(path=str(root / "data" / "03_primary" / "sft_dataset")).load().data["train"]
    lengths = row_lengths(train_split)
    longest, over = int(lengths.max()), int((lengths > 32).sum())
    assert 32 < longest <= 1024

    refused = kedro_run(
        root, model_cache, "--pipelines", "train", "--params", "train.packing=true,train.pack_length=32"
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert (
        f"Error: sft_dataset cannot be trained on: {over} of {len(lengths)} training examples are longer than "
        f"train.pack_length=32 (the longest: {longest} tokens; the data was made with cutoff_len=1024): packing "
        "would cut them. Raise train.pack_length"
    ) in refused.stderr, refused.stderr[-3000:]
    assert not (root / "data" / "06_models").exists()  # no model folder, not even the checkpoints' root
    assert "Training on sft_dataset" not in refused.stderr and "Batching" not in refused.stderr

    scenario = "format.cutoff_len=32,train.packing=true,train.max_steps=2"  # the command
    trained = kedro_run(root, model_cache, "--pipelines", "train", "--params", scenario)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Training on sft_dataset made with template qwen, cutoff_len 1024; pack_length 1024" in trained.stderr
    summary = json.loads((root / "data" / "08_reporting" / "training_summary.json").read_text())
    assert (summary["pack_length"], summary["data_cutoff_len"], summary["data_template"]) == (1024, 1024, "qwen")
    assert summary["global_steps"] == 2 and summary["batching_examples"] == len(lengths)
    assert summary["first_loss"] > 1.0 and summary["last_loss"] > 1.0  # random tiny model: about ln(151936) ~ 12
    history = json.loads((root / "data" / "08_reporting" / "training_history.json").read_text())
    assert [entry["grad_norm"] > 0 for entry in history] == [True, True]
    manifest = json.loads((root / "data" / "06_models" / "trained" / "qwen_pipeline.json").read_text())
    assert manifest["data"] == {"template": "qwen", "cutoff_len": 1024}
    assert manifest["train_config"]["pack_length"] == 1024


# --- the memory plan, before any weights load ---------------------------------------------------------------


def test_a_run_that_cannot_fit_stops_before_loading_with_what_would_fit(trained, monkeypatch):
    from qwen_pipeline.training import memory

    monkeypatch.setattr(memory, "available_memory", lambda placement: 64 * 2**20)  # 64 MiB free
    with pytest.raises(memory.MemoryPlanError) as error:
        train_model(sft([10, 40, 50], [3, 5, 5], cutoff_len=64), base_model_of(), {"finetuning_type": "full"})
    assert trained == []  # training never started
    text = message(error)
    assert re.fullmatch(
        r"memory plan: [\d.]+ GiB per cpu needed, 0\.06 GiB available; biggest: overhead [\d.]+ GiB, .*"
        r"\(train\.memory_check=warn to try anyway\)",
        text,
    ), text


def test_the_plan_is_in_the_summary_and_metrics_and_warn_goes_on(trained, monkeypatch, caplog):
    from qwen_pipeline.training import memory

    monkeypatch.setattr(memory, "available_memory", lambda placement: 64 * 2**20)
    with caplog.at_level("WARNING"):
        _, _, summary, metrics, _ = train_model(
            sft([10, 40], [3, 5], cutoff_len=64), base_model_of(), {"memory_check": "warn"}
        )
    assert len(trained) == 1
    assert summary["plan.available_gb"] == 0.062 and summary["plan.fits"] == 0.0
    assert summary["plan.total_gb"] == pytest.approx(sum(summary[f"plan.{t}_gb"] for t in memory.TERMS), abs=0.01)
    assert metrics["plan.total_gb"]["value"] == summary["plan.total_gb"]
    warned = [m for m in caplog.messages if m.startswith("memory plan: ")]  # the error's one message, logged
    assert len(warned) == 1 and re.fullmatch(
        r"memory plan: [\d.]+ GiB per cpu needed, 0\.06 GiB available; biggest: overhead [\d.]+ GiB, .*"
        r"\(train\.memory_check=warn to try anyway\)",
        warned[0],
    ), caplog.messages


def test_memory_check_off_makes_no_plan(trained):
    _, _, summary, _, _ = train_model(sft([10, 40], [3, 5], cutoff_len=64), base_model_of(), {"memory_check": "off"})
    assert not [k for k in summary if k.startswith("plan.")]
