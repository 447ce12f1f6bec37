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


def conversation_rows(records: list[dict], fingerprint: str = "test"):
    """Conversation dicts as the data stages pass them on: a StageOutput of Arrow rows (missing keys null)."""
    import pyarrow as pa
    from datasets.table import InMemoryTable

    from qwen_pipeline.conversation import CONVERSATION_SCHEMA
    from qwen_pipeline.datasets import StageOutput

    return StageOutput(Dataset(InMemoryTable(pa.Table.from_pylist(records, schema=CONVERSATION_SCHEMA))), fingerprint)


def ingest(raw, params: dict, **processing) -> tuple[list[dict], dict]:
    """The ingest node without a previous run: converted records as dicts, and the report."""
    from qwen_pipeline.pipelines.ingest.nodes import ingest_datasets

    out, report = ingest_datasets(raw, None, params, processing)
    return out.data.to_list(), report


def validate(records: list[dict], params: dict, **processing):
    """The validate node without a previous run: kept conversations as dicts, rejected, report, metrics."""
    from qwen_pipeline.pipelines.validate.nodes import accept_conversations, validate_conversations

    out, rejected, report, metrics = validate_conversations(conversation_rows(records), None, params, processing)
    out = accept_conversations(out, params)
    return out.data.to_list(), rejected, report, metrics


def tokenize(conversations: list[dict], params: dict, **processing):
    """The format node on the embedded model's tokenizer, without a previous run: splits, report, dropped."""
    from qwen_pipeline.pipelines.format.nodes import tokenize_conversations

    out, report, dropped = tokenize_conversations(
        conversation_rows(conversations), None, base_model_of(), params, processing
    )
    return out.data, report, dropped


def demo_examples(tokenizer, datasets=("alpaca_demo",), max_samples: int | None = None, cutoff_len: int = 128):
    """Demo conversations through ingest, validate and the qwen template, as a datasets.Dataset."""
    from qwen_pipeline.conversation import Conversation
    from qwen_pipeline.datasets import DatasetInfoDataset
    from qwen_pipeline.template import TemplateOptions, encode_conversations

    params = {"dataset": list(datasets), **({"max_samples": max_samples} if max_samples else {})}
    records, _ = ingest(DatasetInfoDataset(filepath=str(DEMO_INFO)).load(), params)
    kept, _, _, _ = validate(records, {})
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


def stage_output(data: DatasetDict, fingerprint: str = "test", **format_params):
    """``data`` as the catalog's ``sft_dataset`` gives it to train: a StageOutput with the settings the format
    stage records (params:format's defaults, overridden by ``format_params``, e.g. cutoff_len=128)."""
    from qwen_pipeline.config import FormatConfig
    from qwen_pipeline.datasets import StageOutput
    from qwen_pipeline.pipelines.format.nodes import data_settings

    return StageOutput(data, fingerprint, settings=data_settings(FormatConfig(**format_params)))


def max_relative_logit_diff(reference, got) -> float:
    """max |reference - got| as a share of the largest |reference| logit: float32 rounding grows with
    the logits, so a bound on this (not on the absolute difference) holds on any thread count."""
    return float((reference - got).abs().max() / reference.abs().max())


def base_model_of(name: str = "embedded:tiny-qwen2.5"):
    """What the base_model dataset loads for this model (default: the embedded one, the catalog's default)."""
    from qwen_pipeline.config import ModelConfig
    from qwen_pipeline.datasets import BaseModel

    return BaseModel(ModelConfig(name))
