"""Helpers shared by the tests: a copy of the project to run kedro in, and small SFT datasets."""

from __future__ import annotations

import shutil
from pathlib import Path

from datasets import Dataset, DatasetDict

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_INFO = PROJECT_ROOT / "data" / "01_raw" / "dataset_info.json"


def copy_project(root: Path, *, demo_data: bool = True) -> Path:
    """The project's config, code and (optionally) demo data in ``root``, with an empty conf/local."""
    names = ("pyproject.toml", ".telemetry", "conf", "src") + (("data/01_raw",) if demo_data else ())
    for name in names:
        src, dst = PROJECT_ROOT / name, root / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "local"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    (root / "conf" / "local").mkdir(exist_ok=True)
    return root


def demo_examples(tokenizer, datasets=("alpaca_demo",), max_samples: int | None = None, cutoff_len: int = 128):
    """Demo conversations through ingest, validate and the qwen template, as a datasets.Dataset."""
    from qwen_pipeline.conversation import Conversation
    from qwen_pipeline.datasets import DatasetInfoDataset
    from qwen_pipeline.pipelines.ingest.nodes import ingest_datasets
    from qwen_pipeline.pipelines.validate.nodes import validate_conversations
    from qwen_pipeline.template import TemplateOptions, encode_conversations

    params = {"dataset": list(datasets), **({"max_samples": max_samples} if max_samples else {})}
    records, _ = ingest_datasets(DatasetInfoDataset(filepath=str(DEMO_INFO)).load(), params)
    kept, _, _, _ = validate_conversations(records, {})
    encoded = encode_conversations(
        [Conversation.from_dict(c) for c in kept], tokenizer, TemplateOptions(cutoff_len=cutoff_len)
    )
    return Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in encoded],
            "attention_mask": [[1] * len(e.input_ids) for e in encoded],
            "labels": [e.labels for e in encoded],
        }
    )


def demo_sft_dataset(tokenizer, max_samples: int, cutoff_len: int = 128) -> DatasetDict:
    return DatasetDict({"train": demo_examples(tokenizer, max_samples=max_samples, cutoff_len=cutoff_len)})
