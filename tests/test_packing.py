"""Packing: bins across the whole dataset, contamination-free attention, padding share."""

from __future__ import annotations

import pytest
import torch
from helpers import demo_examples
from transformers import DataCollatorForSeq2Seq

from qwen_pipeline.models import EMBEDDED_MODEL, load_causal_lm
from qwen_pipeline.training.packing import FlatCollator, pack, padding_share
from qwen_pipeline.training.recipe import token_mean_loss


@pytest.fixture(scope="module")
def demo(tokenizer):
    return demo_examples(tokenizer, datasets=("alpaca_demo", "sharegpt_demo"), cutoff_len=512)


def test_bins_hold_every_example_once_within_the_length(demo):
    packed, stats = pack(demo, 512, neat=True)
    assert sum(len(r) for r in packed["input_ids"]) == sum(len(r) for r in demo["input_ids"])
    assert max(len(r) for r in packed["input_ids"]) <= 512
    assert stats["examples"] == 360 and stats["bins"] == len(packed)
    # first-fit decreasing over the whole set: only the last bin may be far from full
    assert stats["bin_fill"] > 0.95, stats
    # neat: positions restart at each example; plain packing: they run on
    assert packed[0]["position_ids"][0] == 0 and packed[0]["position_ids"].count(0) > 1
    plain, _ = pack(demo, 512, neat=False)
    assert plain[0]["position_ids"] == list(range(len(plain[0]["input_ids"])))


def test_neat_packing_gives_the_loss_of_the_unpacked_examples(demo, tokenizer, embedded_dir):
    model = load_causal_lm(EMBEDDED_MODEL).eval()
    model.config.use_cache = False
    sample = demo.select(range(6))
    padded = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(
        [{**row, "attention_mask": [1] * len(row["input_ids"])} for row in sample]
    )
    packed, _ = pack(sample, 256, neat=True)
    flat = FlatCollator()(list(packed))
    with torch.no_grad():
        unpacked_loss = token_mean_loss(
            model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]), padded["labels"]
        )
        packed_loss = token_mean_loss(
            model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]), flat["labels"]
        )
    assert float(packed_loss) == pytest.approx(float(unpacked_loss), abs=1e-5)
    with torch.no_grad():  # and with logits only where the next token is learned
        kept = model(
            input_ids=flat["input_ids"], position_ids=flat["position_ids"], logits_to_keep=flat["logits_to_keep"]
        )
    assert kept.logits.shape[1] == int((flat["labels"][0, 1:] != -100).sum()) < flat["input_ids"].shape[1] / 2
    assert float(token_mean_loss(kept, flat["labels"])) == pytest.approx(float(unpacked_loss), abs=1e-5)


def test_second_example_of_a_bin_sees_only_itself(demo, embedded_dir):
    model = load_causal_lm(EMBEDDED_MODEL).eval()
    model.config.use_cache = False
    first, second = demo[0]["input_ids"], demo[1]["input_ids"]
    alone = model(input_ids=torch.tensor([second])).logits[0]
    row = torch.tensor([first + second])
    with torch.no_grad():
        neat = model(
            input_ids=row, position_ids=torch.tensor([list(range(len(first))) + list(range(len(second)))])
        ).logits
        plain = model(input_ids=row, position_ids=torch.tensor([list(range(len(first) + len(second)))])).logits
    assert float((neat[0, len(first) :] - alone).abs().max()) < 1e-4  # contamination-free
    assert float((plain[0, len(first) :] - alone).abs().max()) > 0.1  # plain packing attends across


def test_padding_share_on_the_demo_data(demo):
    packed, _ = pack(demo, 512, neat=True)
    assert padding_share(packed, 8, flat=True) == 0.0  # one row per batch: nothing padded
    unpacked = padding_share(demo, 8, flat=False)
    assert 0.2 < unpacked < 0.7  # dynamic padding of mixed alpaca / sharegpt lengths wastes a lot
