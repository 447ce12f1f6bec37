"""Golden test: our format stage gives LLaMA-Factory 0.9.5's input_ids and labels, token for token.

tests/data/parity/golden.json was made by benchmarks/llamafactory_reference/make_golden.py with
llamafactory==0.9.5 (template qwen, stage sft) over the same files and the same tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_pipeline.conversation import Conversation
from qwen_pipeline.datasets import DatasetInfoDataset
from qwen_pipeline.pipelines.ingest.nodes import ingest_datasets
from qwen_pipeline.pipelines.validate.nodes import validate_conversations
from qwen_pipeline.template import TemplateOptions, encode_conversations, tokenizer_batch_encoder

PARITY = Path(__file__).parent / "data" / "parity"
GOLDEN = json.loads((PARITY / "golden.json").read_text())


@pytest.fixture(scope="module")
def conversations():
    raw = DatasetInfoDataset(filepath=str(PARITY / "dataset_info.json")).load()
    kept, rejected, _, _ = validate_conversations(ingest_datasets(raw, {"dataset": GOLDEN["datasets"]}), {})
    assert not rejected
    return [Conversation.from_dict(c) for c in kept]


def test_golden_file_is_from_llamafactory_095():
    assert GOLDEN["llamafactory"] == "0.9.5" and GOLDEN["template"] == "qwen"


@pytest.mark.parametrize("setting", list(GOLDEN["settings"]))
def test_ids_and_labels_equal_llamafactory(setting, conversations, tokenizer):
    expected = GOLDEN["settings"][setting]
    options = TemplateOptions(**expected["args"])
    ours = encode_conversations(conversations, tokenizer_batch_encoder(tokenizer), options)
    assert len(ours) == len(expected["examples"])
    for i, (mine, theirs) in enumerate(zip(ours, expected["examples"])):
        where = f"{conversations[i].source.describe()} ({setting})"
        assert mine.input_ids == theirs["input_ids"], where
        assert mine.labels == theirs["labels"], where
