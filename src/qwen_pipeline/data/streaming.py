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

import gc
import multiprocessing
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import Dataset, concatenate_datasets
from datasets.table import ConcatenationTable, InMemoryTable, MemoryMappedTable

# A chunk's work: (rows, position of the first row in the dataset) -> (output rows, result).
ChunkFn = Callable[[pa.Table, int], tuple[pa.Table, Any]]


def default_num_proc() -> int:
    """The cores this process may use, at most 16 (each process holds a tokenizer and one chunk)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 16))


class Staging:
    """A fresh folder for a stage's Arrow files until its catalog dataset moves them into place
    (``StageDataset``). What is left in it is removed when the object is dropped, or at exit, so a failed
    run leaves nothing behind; whoever holds the data holds this object (``StageOutput.staging``)."""

    def __init__(self, stage: str):
        self.path = Path(tempfile.mkdtemp(prefix=f"qwen-{stage}-"))
        self._remove = weakref.finalize(self, shutil.rmtree, self.path, True)

    def folder(self) -> Path:
        """A fresh subfolder, for one map's files."""
        return Path(tempfile.mkdtemp(dir=self.path))

    def holds(self, file: str) -> bool:
        """Whether ``file`` lies in this staging folder (it may be moved, not copied)."""
        return Path(file).resolve().is_relative_to(self.path.resolve())


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


def _run_range(job: _Job, part: int, start: int, stop: int) -> tuple[str, list[Any]]:
    path = job.out / f"part-{part:05d}.arrow"
    results = []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, job.schema) as writer:
        chunks = iter_chunks(job.dataset, job.batch_size, start, stop)
        for offset, chunk in zip(range(start, stop, job.batch_size), chunks):
            rows, result = job.fn(chunk, offset)
            writer.write_table(rows.cast(job.schema) if rows.schema != job.schema else rows)
            results.append(result)
    return str(path), results


def _forked_range(job: _Job, part: int, start: int, stop: int, answer) -> None:
    # The Rust tokenizer's thread pool does not survive a fork: with TOKENIZERS_PARALLELISM=true
    # inherited, a worker's first batch would wait forever on it. The processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        answer.send((True, _run_range(job, part, start, stop)))
    except BaseException as error:  # noqa: BLE001 - raised again in the parent
        answer.send((False, error))
    finally:
        answer.close()


def _run_forked(job: _Job, ranges: list[tuple[int, int, int]]) -> list[tuple[str, list[Any]]]:
    """One forked process per range: each inherits the job (dataset, function and its closure, e.g. the
    tokenizer) without pickling it, and sends back its file and results; a worker's error is raised here."""
    context = multiprocessing.get_context("fork")
    workers = []
    for part in ranges:
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_forked_range, args=(job, *part, send), daemon=True)
        process.start()
        send.close()
        workers.append((process, receive))
    parts = []
    try:
        for process, receive in workers:
            try:
                done, value = receive.recv()
            except EOFError:
                process.join()
                raise ChildProcessError(f"a data worker died (exit code {process.exitcode})") from None
            if not done:
                raise value
            parts.append(value)
    finally:
        for process, _ in workers:
            if process.is_alive() and len(parts) < len(workers):
                process.terminate()
            process.join()
    return parts


def parallel_map(
    dataset: Dataset, fn: ChunkFn, *, schema: pa.Schema, out: Path, num_proc: int, batch_size: int
) -> tuple[Dataset, list[Any]]:
    """``fn`` over every chunk of ``dataset``: the output rows as a dataset backed by Arrow files in
    ``out`` (in input order whatever ``num_proc``), and each chunk's result, in order."""
    n = len(dataset)
    procs = max(1, min(num_proc, -(-n // batch_size)))
    # Contiguous ranges on chunk boundaries, so the chunks are those of one process.
    chunks = -(-n // batch_size) if n else 0
    bounds = [min(n, batch_size * (chunks * k // procs)) for k in range(procs + 1)]
    ranges = [(k, bounds[k], bounds[k + 1]) for k in range(procs)]
    out.mkdir(parents=True, exist_ok=True)
    job = _Job(dataset, fn, batch_size, schema, out)
    if procs == 1:
        parts = [_run_range(job, *ranges[0])]
    else:
        # With the parent's objects frozen, the workers' garbage collector leaves their pages shared.
        gc.freeze()
        try:
            parts = _run_forked(job, ranges)
        finally:
            gc.unfreeze()
    files = [path for path, _ in parts]
    results = [r for _, part_results in parts for r in part_results]
    return open_files(files, schema), results


def map_stage(
    dataset: Dataset, fn: ChunkFn, schema: pa.Schema, work: Any, staging: Staging
) -> tuple[Dataset, list[Any]]:
    """``parallel_map`` for a data stage: its files in a fresh folder of ``staging``, ``processing`` settings."""
    return parallel_map(
        dataset, fn, schema=schema, out=staging.folder(), num_proc=work.processes, batch_size=work.batch_size
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
