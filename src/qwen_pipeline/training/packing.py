"""Packing and padding-free batching.

- ``packing``: examples are put into bins of ``pack_length`` tokens, best-fit decreasing over the
  whole dataset (not per map batch as LLaMA-Factory does); inside a bin, examples attend to each other
  (position ids run on), as LLaMA-Factory's ``packing``.
- ``neat_packing``: the same bins, but position ids restart at each example, so attention restarts too
  (contamination-free).
- ``padding_free``: no bins; the examples of each batch are laid out by ``FlatCollator``.

Attention restarts wherever the position ids restart (transformers' rule for packed sequences), so the
bins carry their own boundaries. ``FlatCollator`` lays a batch out the way the attention kernel wants it:
one row plus precomputed varlen boundaries for FlashAttention, or short padded rows for sdpa / eager, whose
per-row block-diagonal masks transformers builds from the position ids. Both need the KV cache off.

Packing reads token counts from the Arrow list offsets and copies tokens straight from the Arrow buffers
(memory-mapped when the dataset is on disk) into a memory-mapped Arrow file, a batch of bins at a time:
no example becomes a Python list, so a million examples pack in seconds and in bounded memory.
"""

from __future__ import annotations

import bisect
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset

from ..template import IGNORE_INDEX

BATCH_TOKENS = 1 << 22  # at most this many tokens per written Arrow batch: pack()'s working memory


def row_lengths(dataset: Dataset, column: str = "input_ids") -> np.ndarray:
    """Tokens per example in the dataset's own row order, from the Arrow offsets alone."""
    lengths = pc.list_value_length(dataset.data.column(column)).to_numpy()
    return lengths if dataset._indices is None else lengths[_table_rows(dataset)]


def labelled_tokens(dataset: Dataset) -> int:
    """Positions with a label (not -100), counted an Arrow chunk at a time."""
    per_row = []
    for chunk in dataset.data.column("labels").chunks:
        learned = np.concatenate([[0], np.cumsum(np.asarray(chunk.flatten()) != IGNORE_INDEX)])
        offsets = np.asarray(chunk.offsets)
        per_row.append(np.diff(learned[offsets - offsets[0]]))
    counts = np.concatenate(per_row or [[]]).astype(np.int64)
    return int((counts if dataset._indices is None else counts[_table_rows(dataset)]).sum())


def _table_rows(dataset: Dataset) -> np.ndarray:
    """Which row of the Arrow table each example is (select/shuffle/sort leave an indices mapping)."""
    return dataset._indices.column("indices").to_numpy()


def _locate(dataset: Dataset, column: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Each Arrow chunk's values as a zero-copy numpy view, and for each example its chunk and the
    offset of its first token in that chunk's values."""
    chunks = dataset.data.column(column).chunks
    views = [chunk.values.to_numpy() for chunk in chunks]  # .values ignores slicing; .offsets do not
    chunk_of = np.concatenate([np.full(len(chunk), c, dtype=np.int32) for c, chunk in enumerate(chunks)] or [[]])
    start_of = np.concatenate([np.asarray(chunk.offsets)[:-1].astype(np.int64) for chunk in chunks] or [[]])
    if dataset._indices is not None:
        rows = _table_rows(dataset)
        chunk_of, start_of = chunk_of[rows], start_of[rows]
    return views, chunk_of, start_of


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Example indices in packed order (bin after bin, longest first inside a bin) and each bin's size.

    Longest first, each example goes into the open bin with the least room that still holds it, or a
    new bin. Room is an integer <= capacity, so bins are kept in one stack per room plus a sorted list of
    the rooms in use: finding the best bin is a bisect over at most capacity + 1 values, O(n log capacity)
    in all, where scanning the bins (first fit) is O(n x bins). Deterministic: ties keep index order and
    among bins with equal room the last one touched is taken.
    """
    order = np.argsort(-lengths, kind="stable")
    rooms: list[int] = []  # sorted, distinct
    bins_by_room: dict[int, list[int]] = {}
    bin_of: list[int] = []
    bins = 0
    for size in lengths[order].tolist():
        i = bisect.bisect_left(rooms, size)
        if i == len(rooms):
            chosen, room = bins, capacity - size
            bins += 1
        else:
            room = rooms[i]
            stack = bins_by_room[room]
            chosen = stack.pop()
            if not stack:
                del rooms[i], bins_by_room[room]
            room -= size
        if room in bins_by_room:
            bins_by_room[room].append(chosen)
        else:
            bisect.insort(rooms, room)
            bins_by_room[room] = [chosen]
        bin_of.append(chosen)
    bin_ids = np.array(bin_of, dtype=np.int64)
    return order[np.argsort(bin_ids, kind="stable")], np.bincount(bin_ids, minlength=bins)


def pack(dataset: Dataset, pack_length: int, neat: bool) -> tuple[Dataset, dict[str, float]]:
    """Bins of at most ``pack_length`` tokens, best-fit decreasing over the whole dataset. An example
    longer than ``pack_length`` is an error, not cut: cutting drops its tail, often all its labels.

    The packed rows (input_ids, labels, position_ids) go to a memory-mapped Arrow file in a temporary
    folder (``TMPDIR``), removed when the returned dataset is garbage-collected or the process exits.
    """
    lengths = row_lengths(dataset)
    if len(lengths) and (longest := int(lengths.max())) > pack_length:
        raise ValueError(
            f"{int((lengths > pack_length).sum())} examples are longer than pack_length={pack_length} "
            f"(the longest: {longest} tokens); packing does not cut them: raise pack_length"
        )
    rows, bin_sizes = best_fit_decreasing(lengths, pack_length)
    first_row = np.concatenate([[0], np.cumsum(bin_sizes)])  # bin b holds rows[first_row[b]:first_row[b + 1]]
    ids, labels = _locate(dataset, "input_ids"), _locate(dataset, "labels")
    schema = pa.schema(
        {
            # the source's token types; int32 offsets suffice for a batch of bins
            "input_ids": pa.list_(dataset.data.column("input_ids").type.value_type),
            "labels": pa.list_(dataset.data.column("labels").type.value_type),
            "position_ids": pa.list_(pa.int32()),
        }
    )
    folder = tempfile.mkdtemp(prefix="qwen_pipeline-pack-")
    path = str(Path(folder) / "packed.arrow")
    bins_per_batch = max(BATCH_TOKENS // pack_length, 1)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for first in range(0, len(bin_sizes), bins_per_batch):
            last = min(first + bins_per_batch, len(bin_sizes))
            members = rows[first_row[first] : first_row[last]]
            writer.write_batch(
                _packed_batch(schema, members, lengths[members], bin_sizes[first:last], ids, labels, neat)
            )
    packed = Dataset.from_file(path)
    weakref.finalize(packed, shutil.rmtree, folder, ignore_errors=True)
    stats = {
        "examples": len(lengths),
        "bins": len(bin_sizes),
        "bin_fill": float(lengths.sum() / (len(bin_sizes) * pack_length)) if len(bin_sizes) else 0.0,
    }
    return packed, stats


def _packed_batch(schema, members, sizes, bin_sizes, ids, labels, neat: bool) -> pa.RecordBatch:
    """The bins holding ``members`` (packed order) as one Arrow batch."""
    ends = np.cumsum(sizes)
    starts = ends - sizes
    total = int(ends[-1]) if len(ends) else 0
    bin_ends = ends[np.cumsum(bin_sizes) - 1]
    bin_starts = np.concatenate([[0], bin_ends[:-1]])
    (id_views, id_chunk, id_start), (label_views, label_chunk, label_start) = ids, labels
    out_ids = np.empty(total, dtype=schema.field("input_ids").type.value_type.to_pandas_dtype())
    out_labels = np.empty(total, dtype=schema.field("labels").type.value_type.to_pandas_dtype())
    # One slice copy per example: faster than a fancy-index gather here, and chunk-agnostic.
    for at, n, ci, si, cl, sl in zip(
        starts.tolist(),
        sizes.tolist(),
        id_chunk[members].tolist(),
        id_start[members].tolist(),
        label_chunk[members].tolist(),
        label_start[members].tolist(),
    ):
        out_ids[at : at + n] = id_views[ci][si : si + n]
        out_labels[at : at + n] = label_views[cl][sl : sl + n]
    out_labels[starts[sizes > 0]] = IGNORE_INDEX  # never learn across a boundary
    if neat:  # restart at each example
        positions = np.arange(total) - np.repeat(starts, sizes)
    else:  # run on through the bin
        positions = np.arange(total) - np.repeat(bin_starts, bin_ends - bin_starts)
    offsets = pa.array(np.concatenate([[0], bin_ends]), type=pa.int32())
    columns = [out_ids, out_labels, positions.astype(np.int32)]
    return pa.record_batch(
        [pa.ListArray.from_arrays(offsets, pa.array(c), type=schema.field(i).type) for i, c in enumerate(columns)],
        schema=schema,
    )


PAD_ID = 0  # padding tokens form their own segment: never attended to by a real token, never learned


def segment_starts(positions: np.ndarray) -> np.ndarray:
    """Where attention restarts: wherever a position id is not the previous one plus 1 (transformers'
    ``find_packed_sequence_indices`` rule), and at the first token (its difference to itself is 0)."""
    return np.flatnonzero(np.diff(positions, prepend=positions[:1]) != 1)


@dataclass(frozen=True)
class FlatCollator:
    """Packed bins (with ``position_ids``) or plain examples (without) as the attention kernel wants them.

    Each feature's segments (where attention restarts) come from its position ids: each example for
    neat_packing and padding_free, each bin for plain packing. The label of each segment's and each
    feature's first token is -100: it would otherwise be learned from the previous segment's last token.

    - ``attention`` a FlashAttention kernel (``flash_attention_2``, ...): one row, no padding, with
      ``cu_seq_lens_q/k`` (int32 segment boundaries) and ``max_length_q/k`` (ints), computed here once on
      the CPU: transformers' varlen path takes them as they are instead of deriving them from the position
      ids in every layer (device-to-host syncs).
    - otherwise (sdpa, eager): the features in rows no longer than the longest one (best-fit decreasing, so
      a bin or the longest example is a row of its own), each row padded to that length with a padding
      segment whose position ids restart at 0 and whose labels are -100. No attention mask: transformers
      builds each row's block-diagonal causal mask from its position ids, [rows, 1, L, L] rather than one
      [1, 1, T, T] over the whole batch.
    """

    attention: str = "sdpa"  # the model's config._attn_implementation

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        ids, labels, positions = [], [], []
        for f in features:
            n = len(f["input_ids"])
            position = np.asarray(f["position_ids"], dtype=np.int64) if "position_ids" in f else np.arange(n)
            label = np.array(f["labels"], dtype=np.int64)
            label[segment_starts(position)] = IGNORE_INDEX  # never learn across a boundary
            ids.append(np.asarray(f["input_ids"], dtype=np.int64))
            labels.append(label)
            positions.append(position)
        if self.attention.startswith("flash_attention"):
            return self._varlen_row(ids, labels, positions)
        return self._padded_rows(ids, labels, positions)

    @staticmethod
    def _varlen_row(ids, labels, positions) -> dict[str, Any]:
        offsets = np.cumsum([0] + [len(p) for p in positions[:-1]])
        starts = np.concatenate([segment_starts(p) + o for p, o in zip(positions, offsets)])
        boundaries = torch.from_numpy(np.append(starts, offsets[-1] + len(positions[-1]))).to(torch.int32)
        longest = int(boundaries.diff().max())
        return {
            "input_ids": torch.from_numpy(np.concatenate(ids))[None],
            "labels": torch.from_numpy(np.concatenate(labels))[None],
            "position_ids": torch.from_numpy(np.concatenate(positions))[None],
            "cu_seq_lens_q": boundaries,
            "cu_seq_lens_k": boundaries,
            "max_length_q": longest,
            "max_length_k": longest,
            "num_tokens": int(boundaries[-1]),  # no padding here; read by the Trainer's token count, not the model
        }

    @staticmethod
    def _padded_rows(ids, labels, positions) -> dict[str, Any]:
        lengths = np.array([len(x) for x in ids])
        width = int(lengths.max())
        order, sizes = best_fit_decreasing(lengths, width)
        rows = np.split(order, np.cumsum(sizes)[:-1])
        out = {
            "input_ids": np.full((len(rows), width), PAD_ID, dtype=np.int64),
            "labels": np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64),
            # the padding tail restarts at 0: a segment of its own
            "position_ids": np.tile(np.arange(width), (len(rows), 1)),
        }
        for r, members in enumerate(rows):
            n = int(lengths[members].sum())
            out["input_ids"][r, :n] = np.concatenate([ids[i] for i in members])
            out["labels"][r, :n] = np.concatenate([labels[i] for i in members])
            out["position_ids"][r, :n] = np.concatenate([positions[i] for i in members])
            out["position_ids"][r, n:] -= n
        # the tokens that are not padding: for the Trainer's token count (training/loss.py), not the model
        return {k: torch.from_numpy(v) for k, v in out.items()} | {"num_tokens": int(lengths.sum())}


def padding_share(dataset: Dataset, batch_size: int, flat: bool) -> float:
    """Share of the positions fed to the model that are padding, over the dataset in order."""
    if flat or len(dataset) == 0:
        return 0.0
    lengths = row_lengths(dataset)
    batch_max = np.maximum.reduceat(lengths, np.arange(0, len(lengths), batch_size))
    batch_rows = np.diff(np.append(np.arange(0, len(lengths), batch_size), len(lengths)))
    total = int((batch_max * batch_rows).sum())
    return 1 - int(lengths.sum()) / total if total else 0.0
