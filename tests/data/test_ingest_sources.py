"""Ingest sources: folders and file types, num_samples / max_samples, hub ids offline, ignored fields."""

from __future__ import annotations

import json
import logging

import pytest
from helpers import ingest as run_ingest
from kedro.io import DatasetError

from qwen_pipeline.config import ConfigError
from qwen_pipeline.datasets import DatasetInfoDataset

ROWS = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]


def load(tmp_path, entry):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": entry}))
    return DatasetInfoDataset(filepath=str(tmp_path / "dataset_info.json")).load()


def ingest(raw, **params):
    return run_ingest(raw, {"dataset": ["d"], **params})


def prompts(records):
    return [r["messages"][-2]["content"] for r in records]


def test_folder_of_jsonl_files_is_read_in_name_order(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[3:]))
    (tmp_path / "parts" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:3]))
    records, report = ingest(load(tmp_path, {"file_name": "parts"}))
    assert prompts(records) == ["q0", "q1", "q2", "q3", "q4"]
    assert [(r["file"], r["index"]) for r in records][2:4] == [("parts/a.jsonl", 2), ("parts/b.jsonl", 0)]
    assert report["datasets"]["d"] == {
        "read": 5,
        "selected": 5,
        "formatting": "alpaca",
        "in_mix": 5,
        "files": ["parts/a.jsonl", "parts/b.jsonl"],
        "skipped_files": [],
        "numbers_as_text": 0,
    }


@pytest.mark.parametrize("kind", ["csv", "parquet", "arrow"])
def test_table_files_are_read_through_datasets(tmp_path, kind):
    from datasets import Dataset

    data = Dataset.from_list(ROWS)
    path = tmp_path / f"rows.{kind}"
    if kind == "csv":
        data.to_csv(str(path), index=False)
    elif kind == "parquet":
        data.to_parquet(str(path))
    else:
        import pyarrow as pa

        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, data.data.table.schema) as writer:
            writer.write_table(data.data.table)
    records, _ = ingest(load(tmp_path, {"file_name": path.name}))
    assert prompts(records) == ["q0", "q1", "q2", "q3", "q4"]
    assert records[0]["messages"][-1]["content"] == "a0"


def test_folder_mixing_file_types_is_refused(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "a.json").write_text("[]")
    (tmp_path / "parts" / "b.csv").write_text("instruction,output\n")
    with pytest.raises(DatasetError, match=r"dataset 'd': folder .*parts mixes file types \.csv, \.json; use one"):
        ingest(load(tmp_path, {"file_name": "parts"}))


def test_unsupported_file_type_is_refused(tmp_path):
    (tmp_path / "rows.txt").write_text("plain text")
    with pytest.raises(DatasetError, match=r"unsupported file type \.txt \(use \.json, \.jsonl, \.csv"):
        ingest(load(tmp_path, {"file_name": "rows.txt"}))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset 'd': .*nope.json not found"):
        ingest(load(tmp_path, {"file_name": "nope.json"}))


def test_hub_dataset_without_network_fails_clearly(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # The libraries read these variables when imported: set them, and their flags (else: 23 s of retries).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        DatasetError,
        match=r"could not load 'someone/no-such-set' from the Hugging Face Hub .* "
        r"Without a network, download it elsewhere",
    ):
        ingest(load(tmp_path, {"hf_hub_url": "someone/no-such-set"}))


def test_num_samples_takes_every_record_once_then_repeats(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    fewer, _ = ingest(load(tmp_path, {"file_name": "rows.json", "num_samples": 3}))
    assert len(fewer) == 3 and len(set(prompts(fewer))) == 3
    more, report = ingest(load(tmp_path, {"file_name": "rows.json", "num_samples": 12}))
    assert len(more) == 12 and set(prompts(more)) == {f"q{i}" for i in range(5)}
    assert sorted(prompts(more)[:5]) == [f"q{i}" for i in range(5)]  # all once before any repeat
    assert report["datasets"]["d"]["selected"] == 12
    again, _ = ingest(load(tmp_path, {"file_name": "rows.json", "num_samples": 12}))
    assert prompts(again) == prompts(more)  # seeded


def test_max_samples_keeps_the_first_records(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    records, _ = ingest(load(tmp_path, {"file_name": "rows.json"}), max_samples=2)
    assert prompts(records) == ["q0", "q1"]


def test_unmapped_system_field_warns(tmp_path, caplog):
    (tmp_path / "rows.json").write_text(json.dumps([{**r, "system": "S"} for r in ROWS]))
    with caplog.at_level(logging.WARNING):
        records, _ = ingest(
            load(tmp_path, {"file_name": "rows.json", "columns": {"prompt": "instruction", "response": "output"}})
        )
    assert "5 records have a 'system' field, but dataset_info.json maps no 'system' column" in caplog.text
    assert records[0]["system"] is None


def test_columns_without_the_needed_column_fail_naming_it(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    with pytest.raises(ValueError, match=r"dataset 'd': 'columns' maps no 'messages' column"):
        ingest(load(tmp_path, {"file_name": "rows.json", "formatting": "sharegpt", "columns": {"system": "s"}}))


def test_interleave_probs_are_checked(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    raw = load(tmp_path, {"file_name": "rows.json"})
    with pytest.raises(ConfigError) as info:
        ingest(raw, interleave_probs=[0.5, 0.6])
    assert info.value.problems == [
        "ingest.interleave_probs: only used with mix_strategy interleave_under / interleave_over",
        "ingest.interleave_probs: 2 weights for 1 datasets",
    ]
