"""The format node: over-length policy, report counts, validation split."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import ingest, tokenize, validate

from qwen_pipeline.datasets import DatasetInfoDataset

PARITY = Path(__file__).parent / "data" / "parity"


@pytest.fixture(scope="module")
def conversations():
    raw = DatasetInfoDataset(filepath=str(PARITY / "dataset_info.json")).load()
    kept, _, _, _ = validate(ingest(raw, {"dataset": ["alpaca_parity", "sharegpt_parity"]})[0], {})
    return kept


def run(conversations, tmp_path, **params):
    return tokenize(conversations, params)


def test_drop_sends_overlong_conversations_to_overlength_records(conversations, tmp_path):
    splits, report, dropped = run(conversations, tmp_path, cutoff_len=128, overlength="drop")
    assert [(d["file"], d["index"]) for d in dropped] == [
        ("alpaca_parity.json", 12),
        ("alpaca_parity.json", 15),
        ("sharegpt_parity.json", 3),
        ("sharegpt_parity.json", 4),
        ("sharegpt_parity.json", 6),
        ("sharegpt_parity.json", 8),
    ]
    assert dropped[0]["reason"] == "1382 tokens > format.cutoff_len=128"
    assert report["conversations"] == 28 == report["examples"] + report["dropped"]
    assert (report["dropped"], report["truncated"]) == (6, 0)
    assert max(len(x) for x in splits["train"]["input_ids"]) <= 128


def test_truncate_keeps_everything_and_counts_cuts(conversations, tmp_path):
    splits, report, dropped = run(conversations, tmp_path, cutoff_len=128)
    assert dropped == [] and report["examples"] == 28 and report["truncated"] == 6
    assert report["tokens"] == sum(len(x) for x in splits["train"]["input_ids"])
    assert report["tokenization_mismatches"] == 2


def test_validation_split_by_fraction_and_count(conversations, tmp_path):
    splits, report, _ = run(conversations, tmp_path, val_size=0.25)
    assert report["splits"] == {"train": 21, "validation": 7}
    splits, report, _ = run(conversations, tmp_path, val_size=5)
    assert report["splits"] == {"train": 23, "validation": 5}


def test_eval_dataset_becomes_the_validation_split_whole(tmp_path, caplog):
    raw = DatasetInfoDataset(filepath=str(PARITY / "dataset_info.json")).load()
    records, ingest_report = ingest(raw, {"dataset": ["alpaca_parity"], "eval_dataset": ["sharegpt_parity"]})
    kept, rejected, _, _ = validate(records, {})
    sharegpt = [r for r in kept if r["dataset"] == "sharegpt_parity"]
    assert sharegpt and all(r["split"] == "validation" for r in sharegpt)
    assert all(r["split"] is None for r in kept if r["dataset"] == "alpaca_parity")
    assert ingest_report["datasets"]["sharegpt_parity"]["eval"] == len([r for r in records if r["split"]])
    with caplog.at_level(logging.WARNING):
        splits, report, _ = run(kept, tmp_path, val_size=0.2)
    assert "format.val_size=0.2 ignored: ingest.eval_dataset is the validation split" in caplog.text
    assert report["splits"] == {"train": len(kept) - len(sharegpt), "validation": len(sharegpt)}
    # the validation split is the sharegpt conversations, in order: the same ids as tokenizing them alone
    alone, _, _ = run([{k: v for k, v in r.items() if k != "split"} for r in sharegpt], tmp_path / "alone")
    assert list(alone) == ["train"] and len(alone["train"]) == len(sharegpt)
    assert list(splits["validation"]["input_ids"]) == list(alone["train"]["input_ids"])


def test_a_dataset_cannot_train_and_evaluate():
    from qwen_pipeline.config import ConfigError

    raw = DatasetInfoDataset(filepath=str(PARITY / "dataset_info.json")).load()
    with pytest.raises(ConfigError, match="eval_dataset: alpaca_parity also in dataset"):
        ingest(raw, {"dataset": ["alpaca_parity"], "eval_dataset": ["alpaca_parity"]})
