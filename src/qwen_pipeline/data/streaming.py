"""Records through a stage in bounded chunks, on several processes, Arrow in and Arrow out.

A stage's work is a function from one chunk of rows (a ``pyarrow.Table``) to the chunk's output
rows and a small result (counts, rejected records). ``parallel_map`` runs it over a dataset in
contiguous ranges, one per process, each process writing its own Arrow file; the files in range
order are the output, so any ``num_proc`` gives the rows of one process, in the same order.

Why not ``datasets.Dataset.map``: it reads its input through a memory map, and every page it
touches stays in the process's resident memory until the dataset is closed, so a stage's peak RSS
grows with the data. Here a file-backed input is read as a stream (``pa.OSFile``, chunk after
chunk, each freed after use); only an input with an indices mapping (a random sample or an
interleaved mix) is read through ``datasets``' own memory-mapped iteration.
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import Dataset, concatenate_datasets
from datasets.table import ConcatenationTable, InMemoryTable, MemoryMappedTable

# A chunk's work: (rows, position of the first row in the dataset) -> (output rows, result).
ChunkFn = Callable[[pa.Table, int], tuple[pa.Table, Any]]

_STAGING: list[Path] = []


def default_num_proc() -> int:
    """The cores this process may use, at most 16 (each process holds a tokenizer and one chunk)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 16))


def staging_dir(prefix: str) -> Path:
    """A fresh folder for a stage's output files until a catalog dataset moves them into place
    (removed at exit if still there, so a failed run leaves nothing behind)."""
    path = Path(tempfile.mkdtemp(prefix=f"qwen-{prefix}-"))
    _STAGING.append(path)
    return path


@atexit.register
def _remove_staging() -> None:
    for path in _STAGING:
        shutil.rmtree(path, ignore_errors=True)


def is_staged(path: str) -> bool:
    """Whether ``path`` lies in a staging folder of this process (its file may be moved, not copied)."""
    return any(Path(path).resolve().is_relative_to(folder.resolve()) for folder in _STAGING)


def table_files(table: Any) -> list[str] | None:
    """The Arrow files whose rows, in order, are exactly those of a ``datasets`` table; None if it
    is in memory or sliced."""
    rows = table.blocks if isinstance(table, ConcatenationTable) else [[table]]
    if not all(len(row) == 1 for row in rows):
        return None
    blocks = [row[0] for row in rows]
    # datasets records the features it adds to a file's schema as a replay: that changes no row.
    if not all(
        isinstance(b, MemoryMappedTable) and all(op == "replace_schema_metadata" for op, _, _ in b.replays)
        for b in blocks
    ):
        return None
    return [b.path for b in blocks]


def plain_files(dataset: Dataset) -> list[str] | None:
    """The Arrow files whose rows, in order, are ``dataset``'s rows (None with an indices mapping)."""
    return None if dataset._indices is not None else table_files(dataset.data)


def iter_chunks(dataset: Dataset, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[pa.Table]:
    """Rows ``start:stop`` of ``dataset`` as tables of at most ``batch_size`` rows, in order."""
    stop = len(dataset) if stop is None else stop
    files = plain_files(dataset)
    if files is None:
        view = dataset.with_format("arrow")
        for begin in range(start, stop, batch_size):
            yield view[begin : min(begin + batch_size, stop)]
        return
    position, pending, held = 0, [], 0
    for path in files:
        with pa.OSFile(path) as source:
            for batch in pa.ipc.open_stream(source):
                begin, position = position, position + batch.num_rows
                if position <= start:
                    continue
                if begin >= stop:
                    break
                batch = batch.slice(max(start - begin, 0), min(stop, position) - max(start, begin))
                pending.append(batch)
                held += batch.num_rows
                while held >= batch_size:  # slices share the read buffers: only the yielded rows are copied
                    table = pa.Table.from_batches(pending)
                    yield table.slice(0, batch_size).combine_chunks()
                    rest = table.slice(batch_size)
                    pending, held = rest.to_batches(), rest.num_rows
        if position >= stop:
            break
    if held:
        yield pa.Table.from_batches(pending).combine_chunks()


@dataclass(frozen=True)
class _Job:
    dataset: Dataset
    fn: ChunkFn
    batch_size: int
    schema: pa.Schema
    out: Path


_JOB: _Job | None = None  # set before forking: workers inherit it instead of unpickling it


def _run_range(part: int, start: int, stop: int) -> tuple[str, list[Any]]:
    job = _JOB
    assert job is not None
    path = job.out / f"part-{part:05d}.arrow"
    results = []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, job.schema) as writer:
        chunks = iter_chunks(job.dataset, job.batch_size, start, stop)
        for offset, chunk in zip(range(start, stop, job.batch_size), chunks):
            rows, result = job.fn(chunk, offset)
            writer.write_table(rows.cast(job.schema) if rows.schema != job.schema else rows)
            results.append(result)
    return str(path), results


def _one_thread_each() -> None:
    # The Rust tokenizer's thread pool does not survive a fork: with TOKENIZERS_PARALLELISM=true
    # inherited, a worker's first batch would wait forever on it. The processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def parallel_map(
    dataset: Dataset, fn: ChunkFn, *, schema: pa.Schema, out: Path, num_proc: int, batch_size: int
) -> tuple[Dataset, list[Any]]:
    """``fn`` over every chunk of ``dataset``: the output rows as a dataset backed by Arrow files in
    ``out`` (in input order whatever ``num_proc``), and each chunk's result, in order."""
    global _JOB
    n = len(dataset)
    procs = max(1, min(num_proc, -(-n // batch_size)))
    # Contiguous ranges on chunk boundaries, so the chunks are those of one process.
    chunks = -(-n // batch_size) if n else 0
    bounds = [min(n, batch_size * (chunks * k // procs)) for k in range(procs + 1)]
    ranges = [(k, bounds[k], bounds[k + 1]) for k in range(procs)]
    out.mkdir(parents=True, exist_ok=True)
    _JOB = _Job(dataset, fn, batch_size, schema, out)
    try:
        if procs == 1:
            parts = [_run_range(*ranges[0])]
        else:
            # fork: workers share the tokenizer and the function's closure without pickling them; with
            # the parent's objects frozen, the workers' garbage collector leaves their pages shared.
            gc.freeze()
            with multiprocessing.get_context("fork").Pool(procs, initializer=_one_thread_each) as pool:
                parts = pool.starmap(_run_range, ranges)
    finally:
        _JOB = None
        gc.unfreeze()
    files = [path for path, _ in parts]
    results = [r for _, part_results in parts for r in part_results]
    return open_files(files, schema), results


def map_stage(stage: str, dataset: Dataset, fn: ChunkFn, schema: pa.Schema, work: Any) -> tuple[Dataset, list[Any]]:
    """``parallel_map`` for a data stage: its files in a fresh staging folder, ``processing`` settings."""
    return parallel_map(
        dataset, fn, schema=schema, out=staging_dir(stage), num_proc=work.processes, batch_size=work.batch_size
    )


def open_files(files: list[str], schema: pa.Schema) -> Dataset:
    """The dataset of these Arrow files' rows (memory-mapped; nothing is read until used)."""
    if not files:
        return Dataset(InMemoryTable(schema.empty_table()))
    parts = [Dataset.from_file(f) for f in files]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def write_rows(rows: Iterator[pa.Table | pa.RecordBatch], schema: pa.Schema, path: Path) -> None:
    """Arrow tables, one after another, into one Arrow stream file (the layout ``Dataset.from_file`` reads)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for table in rows:
            writer.write(table.cast(schema) if table.schema != schema else table)
