"""The launcher's work folder: a file-backed dataset is handed to the workers as its Arrow files, anything else
as a copy, and the worker reads back exactly what was written. One process hands a saved folder on too."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict, load_from_disk

from qwen_pipeline.config import ModelConfig, TrainConfig
from qwen_pipeline.training.launcher import read_work_folder, write_work_folder

ROWS = {"input_ids": [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]] * 5, "labels": [[-100, 2, 3], [4, 5], [6], [-100] * 4] * 5}


@pytest.fixture
def on_disk(tmp_path) -> DatasetDict:
    """A DatasetDict as the catalog loads it: memory-mapped from several Arrow shards."""
    DatasetDict({"train": Dataset.from_dict(ROWS)}).save_to_disk(str(tmp_path / "sft"), num_shards={"train": 3})
    return load_from_disk(str(tmp_path / "sft"))


def test_file_backed_splits_are_passed_as_their_files(on_disk, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    config = TrainConfig(learning_rate=1e-3, nproc_per_node=2)
    write_work_folder(work, on_disk, ModelConfig(), config)
    shards = [str((tmp_path / "sft" / "train" / f"data-0000{i}-of-00003.arrow").resolve()) for i in range(3)]
    assert json.loads((work / "config.json").read_text())["dataset"] == {"train": {"files": shards, "indices": None}}
    assert not (work / "dataset").exists()  # nothing copied
    dataset, model_config, train_config = read_work_folder(work)
    assert dataset["train"].to_dict() == ROWS
    assert (model_config, train_config) == (ModelConfig(), config)


def test_a_split_whose_order_datasets_wrote_to_a_file_is_referenced_too(on_disk, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    validation = on_disk["train"].train_test_split(test_size=4, seed=0)["test"]  # as val_size splits
    assert validation._indices is not None
    dataset = DatasetDict({"train": on_disk["train"], "validation": validation})
    write_work_folder(work, dataset, ModelConfig(), TrainConfig())
    files = json.loads((work / "config.json").read_text())["dataset"]
    assert len(files["train"]["files"]) == 3 and files["train"]["indices"] is None
    assert files["validation"]["files"] == files["train"]["files"]
    assert files["validation"]["indices"].startswith(str(tmp_path / "sft" / "train" / "cache-"))
    assert not (work / "dataset").exists()
    back, _, _ = read_work_folder(work)
    assert back["train"].to_dict() == ROWS
    assert back["validation"].to_dict() == validation.to_dict()


def test_a_stored_split_order_is_passed_as_its_indices_file(on_disk, tmp_path):
    """sft_dataset as the format stage stores it: shared Arrow files, each split's order an indices file."""
    from qwen_pipeline.datasets import StageDataset, StageOutput

    base = on_disk["train"]
    splits = DatasetDict({"train": base.select([5, 2, 9, 0]), "validation": base.select([7, 1])})
    StageDataset(path=str(tmp_path / "stage")).save(StageOutput(splits, "fp"))
    stored = StageDataset(path=str(tmp_path / "stage")).load().data
    work = tmp_path / "work"
    work.mkdir()
    write_work_folder(work, stored, ModelConfig(), TrainConfig())
    files = json.loads((work / "config.json").read_text())["dataset"]
    assert files["train"]["indices"] == str((tmp_path / "stage" / "train-indices.arrow").resolve())
    assert files["train"]["files"] == files["validation"]["files"]  # one copy of the rows, two orders
    assert not (work / "dataset").exists()
    back, _, _ = read_work_folder(work)
    assert back["train"].to_dict() == splits["train"].to_dict()
    assert back["validation"].to_dict() == splits["validation"].to_dict()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: Dataset.from_dict(ROWS), id="in_memory"),
        pytest.param(lambda d: d.add_column("extra", list(range(len(d)))), id="column_added_in_memory"),
        pytest.param(lambda d: d.select_columns(["input_ids"]), id="select_recorded_on_the_files"),
        pytest.param(lambda d: d.select([3, 0, 7], keep_in_memory=True), id="indices_mapping_in_memory"),
    ],
)
def test_a_split_that_is_not_exactly_its_files_is_copied(change, on_disk, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    changed = change(on_disk["train"])
    write_work_folder(work, DatasetDict({"train": changed}), ModelConfig(), TrainConfig())
    assert json.loads((work / "config.json").read_text())["dataset"] == {"train": None}
    assert read_work_folder(work)[0]["train"].to_dict() == changed.to_dict()


def test_copy_data_copies_even_file_backed_splits(on_disk, tmp_path):
    """Multi-node: other nodes see the work folder, not necessarily the dataset's own files."""
    work = tmp_path / "work"
    work.mkdir()
    write_work_folder(work, on_disk, ModelConfig(), TrainConfig(), copy_data=True)
    assert json.loads((work / "config.json").read_text())["dataset"] == {"train": None}
    assert read_work_folder(work)[0]["train"].to_dict() == ROWS


TOKENIZER = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize(
    ("finetuning_type", "kind", "model_files"),
    [
        ("lora", "adapter", ["README.md", "adapter_config.json", "adapter_model.safetensors"]),
        ("full", "causal_lm", ["config.json", "generation_config.json", "model.safetensors"]),
    ],
)
def test_one_process_also_hands_a_saved_folder_to_the_catalog(finetuning_type, kind, model_files, tokenizer, tmp_path):
    """In-process training saves like rank 0 does, so the train node has one path: files, then a move."""
    from helpers import base_model_of, demo_sft_dataset, stage_output

    from qwen_pipeline.datasets import ModelDataset
    from qwen_pipeline.pipelines.train.nodes import train_model

    params = {"finetuning_type": finetuning_type, "max_steps": 1, "output_dir": str(tmp_path / "checkpoints")}
    files, *_ = train_model(
        stage_output(demo_sft_dataset(tokenizer, max_samples=4), cutoff_len=128), base_model_of(), params
    )
    assert files.kind == kind and files.path.parent == tmp_path / "checkpoints"
    trained = tmp_path / "trained"
    ModelDataset(filepath=str(trained), lazy=True).save(files)
    assert not files.path.exists()  # moved, not copied
    # no training_args.bin: the Trainer's pickled arguments are removed, the manifest records the config
    assert sorted(p.name for p in trained.iterdir()) == sorted(model_files + TOKENIZER + ["qwen_pipeline.json"])
    assert ModelDataset(filepath=str(trained), lazy=True).load().kind == kind
