"""Packing and padding-free batching.

- ``packing``: examples are put into bins of ``pack_length`` tokens, first-fit decreasing over the
  whole dataset (not per map batch as LLaMA-Factory does); inside a bin, examples attend to each other
  (position ids run on), as LLaMA-Factory's ``packing``.
- ``neat_packing``: the same bins, but position ids restart at each example, so attention restarts too
  (contamination-free).
- ``padding_free``: no bins; each batch is laid out as one row with position ids restarting per example.

All three feed the model one flattened row per batch with ``position_ids`` and no attention mask, from
which transformers builds the block-diagonal causal mask (sdpa, eager) or varlen calls (fa2). That needs
the KV cache off during training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

IGNORE_INDEX = -100


def pack(dataset: Dataset, pack_length: int, neat: bool) -> tuple[Dataset, dict[str, float]]:
    """Bins of at most ``pack_length`` tokens, first-fit decreasing over the whole dataset."""
    lengths = [min(len(ids), pack_length) for ids in dataset["input_ids"]]
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, room in enumerate(free):
            if room >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(pack_length - lengths[i])
    input_ids, labels, position_ids = [], [], []
    ids_column, labels_column = dataset["input_ids"], dataset["labels"]
    for members in bins:
        row_ids, row_labels, row_positions = [], [], []
        for i in members:
            n = lengths[i]
            row_ids += ids_column[i][:n]
            row_labels += [IGNORE_INDEX] + list(labels_column[i][1:n])  # never learn across a boundary
            row_positions += list(range(n)) if neat else list(range(len(row_positions), len(row_positions) + n))
        input_ids.append(row_ids)
        labels.append(row_labels)
        position_ids.append(row_positions)
    stats = {"examples": len(lengths), "bins": len(bins), "bin_fill": sum(lengths) / (len(bins) * pack_length)}
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels, "position_ids": position_ids}), stats


@dataclass
class FlatCollator:
    """A batch as one row: rows concatenated, position ids restarting per row (or as given), no padding."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, labels, positions = [], [], []
        for f in features:
            n = len(f["input_ids"])
            input_ids += list(f["input_ids"])
            labels += [IGNORE_INDEX] + list(f["labels"][1:])
            positions += list(f["position_ids"]) if "position_ids" in f else list(range(n))
        labels_t = torch.tensor([labels])
        # Only positions whose next token is learned need logits: over a 151,936-token vocabulary the
        # output layer and its loss dominate a small model's step, and most positions are prompt.
        keep = (labels_t[0, 1:] != IGNORE_INDEX).nonzero().flatten()
        return {
            "input_ids": torch.tensor([input_ids]),
            "labels": labels_t,
            "position_ids": torch.tensor([positions]),
            "logits_to_keep": keep,
        }


def padding_share(dataset: Dataset, batch_size: int, flat: bool) -> float:
    """Share of the positions fed to the model that are padding, over the dataset in order."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    if flat:
        return 0.0
    total = real = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        total += max(batch) * len(batch)
        real += sum(batch)
    return 1 - real / total if total else 0.0
