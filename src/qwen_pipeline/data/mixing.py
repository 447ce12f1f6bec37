"""Which records of each dataset are used, and how datasets combine (LLaMA-Factory's rules).

Only row numbers are computed here (8 bytes a record); the records stay on disk.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, concatenate_datasets, interleave_datasets

from ..errors import DataError


def selected_rows(count: int, num_samples: int | None, max_samples: int | None, seed: int, where: str):
    """Row numbers to use, or None for "all, in order": LLaMA-Factory's num_samples (every record
    once in random order, then random repeats if more), then the first max_samples."""
    rows = None
    if num_samples is not None:
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise DataError(f"{where}: num_samples must be a positive integer, got {num_samples!r}")
        rng = np.random.default_rng(seed)
        rows = rng.permutation(count)[:num_samples]
        if num_samples > count:
            rows = np.concatenate([rows, rng.choice(count, num_samples - count)])
    if max_samples is not None:
        rows = np.arange(min(count, max_samples)) if rows is None else rows[:max_samples]
    return rows


def mix(
    datasets: list[Dataset], strategy: str, probabilities: list[float] | None, seed: int
) -> tuple[Dataset, list[int]]:
    """The datasets concatenated, or interleaved exactly as ``datasets.interleave_datasets`` (what
    LLaMA-Factory calls); and how many rows of each the mix holds."""
    if strategy == "concat" or len(datasets) == 1:
        return (datasets[0] if len(datasets) == 1 else concatenate_datasets(datasets)), [len(d) for d in datasets]
    stopping = "first_exhausted" if strategy == "interleave_under" else "all_exhausted"
    mixed = interleave_datasets(datasets, probabilities=probabilities, seed=seed, stopping_strategy=stopping)
    # The mix is the concatenation read through an indices mapping: count each dataset's share there.
    bounds = np.cumsum([len(d) for d in datasets])
    rows = mixed._indices.column(0).to_numpy() if mixed._indices is not None else np.arange(len(mixed))
    return mixed, np.bincount(np.searchsorted(bounds, rows, side="right"), minlength=len(datasets)).tolist()
