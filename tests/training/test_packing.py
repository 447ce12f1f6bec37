"""Packing: bins across the whole dataset, contamination-free attention, padding share."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Dataset
from helpers import demo_examples
from transformers import DataCollatorForSeq2Seq

from qwen_pipeline.models import EMBEDDED_MODEL, load_causal_lm
from qwen_pipeline.training.loss import token_mean_loss
from qwen_pipeline.training.packing import FlatCollator, labelled_tokens, pack, padding_share, row_lengths

FA2 = "flash_attention_2"


@pytest.fixture(scope="module")
def demo(tokenizer):
    return demo_examples(tokenizer, datasets=("alpaca_demo", "sharegpt_demo"), cutoff_len=512)


def test_bins_hold_every_example_once_within_the_length(demo):
    packed, stats = pack(demo, 512, neat=True)
    assert sum(len(r) for r in packed["input_ids"]) == sum(len(r) for r in demo["input_ids"])
    assert max(len(r) for r in packed["input_ids"]) <= 512
    assert stats["examples"] == 360 and stats["bins"] == len(packed)
    # 22,816 tokens: 46 bins (fill 0.96875) with the first-fit decreasing this replaced; 45 is the floor
    assert stats["bin_fill"] >= 0.96875, stats
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
    for attention in ("sdpa", FA2):  # FA2's single row run through sdpa: its [1, 1, T, T] mask from positions
        flat = FlatCollator(attention)(list(packed))
        with torch.no_grad():
            unpacked = model.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])
            unpacked_loss = token_mean_loss(model.lm_head, unpacked.last_hidden_state, padded["labels"])
            packed_hidden = model.model(
                input_ids=flat["input_ids"], position_ids=flat["position_ids"]
            ).last_hidden_state
            packed_loss = token_mean_loss(model.lm_head, packed_hidden, flat["labels"])
        assert float(packed_loss) == pytest.approx(float(unpacked_loss), abs=1e-5)


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


def test_padding_share_counts_each_batch_up_to_its_longest_row():
    rows = Dataset.from_dict({"input_ids": [[1] * n for n in (3, 5, 2, 2, 1)]})
    # batches (3, 5) (2, 2) (1): 10 + 4 + 1 positions for 13 tokens
    assert padding_share(rows, 2, flat=False) == pytest.approx(1 - 13 / 15)
    assert padding_share(rows.select([4, 1]), 2, flat=False) == pytest.approx(1 - 6 / 10)  # indices mapping


def test_token_counts_come_from_the_arrow_buffers():
    rows = {"input_ids": [[5, 6, 7], [8], [9, 10]], "labels": [[-100, 6, 7], [-100], [-100, 10]]}
    table = Dataset.from_dict(rows).data.table
    chunked = Dataset(pa.Table.from_batches(table.to_batches(max_chunksize=2)))  # a sliced second chunk
    assert row_lengths(chunked).tolist() == [3, 1, 2] and labelled_tokens(chunked) == 3
    subset = chunked.select([2, 2, 1])  # an indices mapping
    assert row_lengths(subset).tolist() == [2, 2, 1] and labelled_tokens(subset) == 2


def synthetic(lengths: np.ndarray, seed: int = 0) -> Dataset:
    """Example i's first token is i (the rest random, labels half -100), in Arrow chunks of 1,000 rows that
    are slices of one array (non-zero offsets), as datasets' memory-mapped files give."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = rng.integers(len(lengths), 151_643, offsets[-1], dtype=np.int32)
    ids[offsets[:-1]] = np.arange(len(lengths))
    labels = np.where(rng.random(len(ids)) < 0.5, -100, ids).astype(np.int32)
    columns = {"input_ids": ids, "labels": labels}
    table = pa.table({k: pa.ListArray.from_arrays(pa.array(offsets), pa.array(v)) for k, v in columns.items()})
    return Dataset(pa.Table.from_batches(table.to_batches(max_chunksize=1000)))


def first_fit_decreasing_bins(lengths: np.ndarray, capacity: int) -> int:
    """The reference: longest first, each into the first bin with room (what pack() did before)."""
    room = np.full(len(lengths) + 1, capacity)
    used = 0
    for size in sorted(lengths.tolist(), reverse=True):
        b = int(np.argmax(room[: used + 1] >= size))
        room[b] -= size
        used = max(used, b + 1)
    return used


def flat(dataset: Dataset, name: str) -> np.ndarray:
    """A list column's tokens end to end, in table order."""
    return np.concatenate([np.asarray(chunk.flatten()) for chunk in dataset.data.column(name).chunks])


def bin_lengths(dataset: Dataset) -> np.ndarray:
    return np.concatenate([np.diff(np.asarray(chunk.offsets)) for chunk in dataset.data.column("input_ids").chunks])


@pytest.fixture(scope="module")
def random_set():
    # up to 699 tokens, cut to 512 as the format stage's cutoff_len would (pack() refuses longer examples)
    lengths = np.minimum(np.random.default_rng(7).integers(1, 700, 100_000), 512)
    return lengths, synthetic(lengths)


def test_100k_random_examples_are_packed_exactly(random_set):
    lengths, source = random_set
    cap, kept = 512, lengths
    packed, stats = pack(source, cap, neat=True)
    assert stats["examples"] == 100_000 and stats["bins"] == len(packed)
    sizes = bin_lengths(packed)
    assert sizes.max() <= cap and sizes.sum() == kept.sum()  # within the length; no token lost or added
    ids, labels, positions = (flat(packed, name) for name in ("input_ids", "labels", "position_ids"))
    heads = np.flatnonzero(positions == 0)  # neat: each example starts at position 0
    assert np.isin(np.concatenate([[0], np.cumsum(sizes)[:-1]]), heads).all()  # no example crosses a bin edge
    order = ids[heads]  # example i's first token is i
    assert (np.sort(order) == np.arange(100_000)).all()  # every example exactly once
    spans = np.diff(np.append(heads, len(ids)))
    assert (spans == kept[order]).all()
    # token by token: each example's tokens, its first label masked, positions 0..n-1
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    source_at = np.repeat(starts[order] - heads, spans) + np.arange(len(ids))
    assert (ids == flat(source, "input_ids")[source_at]).all()
    expected_labels = flat(source, "labels")[source_at]
    expected_labels[heads] = -100  # never learn across a boundary
    assert (labels == expected_labels).all()
    assert (positions == np.arange(len(ids)) - np.repeat(heads, spans)).all()
    # at least first-fit decreasing's fill: both 63,592 bins here, 45 over ceil(tokens / 512)
    assert stats["bins"] == 63_592 <= first_fit_decreasing_bins(kept, cap)
    assert stats["bin_fill"] == pytest.approx(kept.sum() / (stats["bins"] * cap))


def test_packing_is_deterministic_and_follows_an_indices_mapping(random_set):
    _, source = random_set
    subset = source.select(np.random.default_rng(1).permutation(len(source))[:20_000])  # an indices mapping
    assert subset._indices is not None
    packed, stats = pack(subset, 512, neat=False)
    again, _ = pack(subset, 512, neat=False)
    materialised, _ = pack(subset.flatten_indices(), 512, neat=False)
    for name in ("input_ids", "labels", "position_ids"):
        assert (flat(packed, name) == flat(again, name)).all()
        assert (flat(packed, name) == flat(materialised, name)).all()
    # plain packing: positions run on through each bin
    sizes = bin_lengths(packed)
    bin_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    assert (flat(packed, "position_ids") == np.arange(sizes.sum()) - np.repeat(bin_starts, sizes)).all()
    assert stats["bins"] == len(packed)


# Two bins as pack() writes them (each example's first label already -100): 11..15 holds two examples
# (3 + 2 tokens), 21..23 one. Plain packing runs the positions on through a bin; neat restarts them.
BINS = [([11, 12, 13, 14, 15], [-100, 12, 13, -100, 15]), ([21, 22, 23], [-100, 22, 23])]
PLAIN = [{"input_ids": i, "labels": lab, "position_ids": list(range(len(i)))} for i, lab in BINS]
NEAT = [{**PLAIN[0], "position_ids": [0, 1, 2, 0, 1]}, {**PLAIN[1]}]
# padding_free: plain examples; the first one's first token labelled (train_on_prompt)
EXAMPLES = [
    {"input_ids": [31, 32, 33], "labels": [31, 32, 33]},
    {"input_ids": [41, 42, 43, 44, 45], "labels": [-100, -100, 43, 44, 45]},
    {"input_ids": [51, 52], "labels": [51, 52]},
]
M = -100
COLLATED = {
    ("packing", "sdpa"): {  # a bin a row, the short one padded by a segment restarting at 0
        "input_ids": [[11, 12, 13, 14, 15], [21, 22, 23, 0, 0]],
        "labels": [[M, 12, 13, M, 15], [M, 22, 23, M, M]],
        "position_ids": [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]],
    },
    ("neat_packing", "sdpa"): {
        "input_ids": [[11, 12, 13, 14, 15], [21, 22, 23, 0, 0]],
        "labels": [[M, 12, 13, M, 15], [M, 22, 23, M, M]],
        "position_ids": [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]],
    },
    ("padding_free", "sdpa"): {  # rows of at most 5 (the longest): 41..45, then 31..33 + 51..52
        "input_ids": [[41, 42, 43, 44, 45], [31, 32, 33, 51, 52]],
        "labels": [[M, M, 43, 44, 45], [M, 32, 33, M, 52]],
        "position_ids": [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]],
    },
    ("packing", FA2): {  # one row; attention restarts per bin
        "input_ids": [[11, 12, 13, 14, 15, 21, 22, 23]],
        "labels": [[M, 12, 13, M, 15, M, 22, 23]],
        "position_ids": [[0, 1, 2, 3, 4, 0, 1, 2]],
        "cu_seq_lens": [0, 5, 8],
        "max_length": 5,
    },
    ("neat_packing", FA2): {  # ... per example
        "input_ids": [[11, 12, 13, 14, 15, 21, 22, 23]],
        "labels": [[M, 12, 13, M, 15, M, 22, 23]],
        "position_ids": [[0, 1, 2, 0, 1, 0, 1, 2]],
        "cu_seq_lens": [0, 3, 5, 8],
        "max_length": 3,
    },
    ("padding_free", FA2): {
        "input_ids": [[31, 32, 33, 41, 42, 43, 44, 45, 51, 52]],
        "labels": [[M, 32, 33, M, M, 43, 44, 45, M, 52]],
        "position_ids": [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]],
        "cu_seq_lens": [0, 3, 8, 10],
        "max_length": 5,
    },
}
FEATURES = {"packing": PLAIN, "neat_packing": NEAT, "padding_free": EXAMPLES}


@pytest.mark.parametrize(("layout", "attention"), list(COLLATED))
def test_collator_lays_out_each_mode_for_each_kernel(layout, attention):
    out = FlatCollator(attention)(FEATURES[layout])
    expected = COLLATED[layout, attention]
    for name in ("input_ids", "labels", "position_ids"):
        assert out[name].dtype == torch.int64 and out[name].tolist() == expected[name], name
    # the tokens that are not padding, for the Trainer's tokens/s (rows may end in padding)
    assert out["num_tokens"] == sum(len(f["input_ids"]) for f in FEATURES[layout])
    if attention == FA2:
        assert set(out) == {"input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"} | {
            "max_length_q",
            "max_length_k",
            "num_tokens",
        }
        for name in ("cu_seq_lens_q", "cu_seq_lens_k"):  # int32, as flash_attn_varlen_func takes them
            assert out[name].dtype == torch.int32 and out[name].tolist() == expected["cu_seq_lens"]
        # python ints: a tensor would be read back from the device in every layer
        assert type(out["max_length_q"]) is type(out["max_length_k"]) is int
        assert out["max_length_q"] == out["max_length_k"] == expected["max_length"]
    else:
        assert set(out) == {"input_ids", "labels", "position_ids", "num_tokens"}  # no mask: built from positions


@pytest.fixture(scope="module")
def mixed(demo):
    """Eight examples of 39 to 84 tokens (alpaca and sharegpt), so rows hold several and need padding."""
    sample = demo.select([0, 200, 5, 300, 15, 250, 195, 330])
    assert sorted(len(r) for r in sample["input_ids"]) == [39, 40, 46, 47, 74, 76, 79, 84]
    return sample


def summed_loss(model, batch) -> tuple[float, int]:
    """The loss summed over labelled tokens (not averaged), and their count."""
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "num_tokens")}
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], **extra).last_hidden_state
        total = token_mean_loss(model.lm_head, hidden, batch["labels"], num_items_in_batch=1)
    return float(total), int((batch["labels"][:, 1:] != -100).sum())


def one_by_one(model, sequences) -> tuple[float, int]:
    """Each sequence alone in a row of its own: the reference."""
    results = [
        summed_loss(model, {"input_ids": torch.tensor([s["input_ids"]]), "labels": torch.tensor([s["labels"]])})
        for s in sequences
    ]
    return sum(r[0] for r in results), sum(r[1] for r in results)


def tiny_model(attention: str):
    from transformers import AutoModelForCausalLM

    from qwen_pipeline.models import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(EMBEDDED_MODEL), dtype=torch.float32, attn_implementation=attention
    )
    model.config.use_cache = False
    return model.eval()


def masks_reaching_attention(model) -> list:
    masks = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True
    )
    return masks


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["packing", "neat_packing", "padding_free"])
def test_rows_give_the_loss_of_each_sequence_alone_with_a_mask_per_row(mixed, embedded_dir, attention, layout):
    """neat_packing and padding_free: each example alone; plain packing: each bin alone (its examples see
    each other). The mask that reaches attention is [rows, 1, L, L], never [1, 1, T, T]."""
    model = tiny_model(attention)
    masks = masks_reaching_attention(model)
    if layout == "padding_free":
        features = alone = list(mixed)
    else:
        features = list(pack(mixed, 256, neat=layout == "neat_packing")[0])
        alone = list(mixed) if layout == "neat_packing" else [{**f, "position_ids": None} for f in features]
    batch = FlatCollator(attention)(features)
    total, tokens = summed_loss(model, batch)
    expected, expected_tokens = one_by_one(model, alone)
    assert tokens == expected_tokens == labelled_tokens(mixed)
    assert total == pytest.approx(expected, rel=1e-5)
    rows, width = batch["input_ids"].shape
    tokens_in = sum(len(r) for r in mixed["input_ids"])
    assert rows > 1 and rows * width < tokens_in * 1.5  # several rows, little padding
    mask = masks[0]  # the batch's (then the references')
    assert tuple(mask.shape) == (rows, 1, width, width) and mask.dtype == (
        torch.bool if attention == "sdpa" else torch.float32
    )
    if layout == "packing":  # the bins' examples see each other: 2.9e-4 off one by one, 29x the tolerance
        assert abs(total - one_by_one(model, list(mixed))[0]) > 1e-4 * total


def test_varlen_kwargs_reach_attention_and_give_the_loss_of_each_sequence_alone(mixed, embedded_dir):
    """What FlashAttention-2's varlen path does with the collator's kwargs, done with sdpa segment by segment
    (flash-attn needs CUDA; benchmarks/gpu_check.py checks the real kernel on a GPU): Qwen2 hands
    cu_seq_lens_q/k and max_length_q/k through to the attention function, and attention restarting at
    those boundaries gives each example's (each bin's, for plain packing) loss alone."""
    from transformers import AttentionInterface

    seen = []

    def varlen_reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        assert attention_mask is None and query.shape[0] == 1
        bounds = [0, query.shape[2]]  # a sequence alone (the references)
        if "cu_seq_lens_q" in kwargs:
            seen.append({k: kwargs[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")})
            bounds = kwargs["cu_seq_lens_q"].tolist()
            assert kwargs["max_length_q"] == max(b - a for a, b in zip(bounds, bounds[1:]))
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        out = torch.cat(
            [
                torch.nn.functional.scaled_dot_product_attention(
                    query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling
                )
                for a, b in zip(bounds, bounds[1:])
            ],
            dim=2,
        )
        return out.transpose(1, 2), None

    AttentionInterface.register("varlen_reference", varlen_reference)
    model = tiny_model("varlen_reference")
    for layout in ("packing", "neat_packing", "padding_free"):
        seen.clear()
        if layout == "padding_free":
            features = alone = list(mixed)
        else:
            features = list(pack(mixed, 256, neat=layout == "neat_packing")[0])
            alone = list(mixed) if layout == "neat_packing" else features
        batch = FlatCollator(FA2)(features)
        total, tokens = summed_loss(model, batch)
        expected, expected_tokens = one_by_one(model, alone)
        assert tokens == expected_tokens and total == pytest.approx(expected, rel=1e-5), layout
        assert len(seen) == model.config.num_hidden_layers  # every layer got the collator's tensors as made
        assert all(s["cu_seq_lens_q"] is batch["cu_seq_lens_q"] for s in seen)
        assert len(batch["cu_seq_lens_q"]) == len(alone) + 1
