"""A Kedro dataset for a data stage's output: Arrow files, and the fingerprint of the inputs they came from."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import Dataset, DatasetDict
from datasets.table import MemoryMappedTable
from kedro.io import AbstractDataset, DatasetError

from ..data.streaming import Staging, iter_chunks, open_files, table_files, write_rows
from ..errors import DataSourceError
from ._files import swap_into_place

logger = logging.getLogger(__name__)

LAYOUT = "stage.json"  # written last: its presence means "complete"
OUTPUTS = "outputs.json"
STALE = "stale.json"  # written when a run stopped upstream: the output is an earlier run's, not this one's


@dataclass(frozen=True)
class StageOutput:
    """A stage's main output, with the fingerprint of everything it was made from (the next stage builds its
    own on it), the stage's other (small) outputs by name, so a rerun with unchanged inputs can hand them all
    back without work (``reuse``), and the settings the data was made with (e.g. format's cutoff_len), which
    later stages read from here rather than from this run's parameters. ``staging``: the folder of the new
    files the catalog dataset moves into place (None: data already stored)."""

    data: Dataset | DatasetDict
    fingerprint: str
    outputs: dict[str, Any] = field(default_factory=dict)  # JSON values
    settings: dict[str, Any] = field(default_factory=dict)  # JSON values
    staging: Staging | None = field(default=None, compare=False, repr=False)


def reuse(previous: StageOutput | None, fingerprint: str, overwrite: bool) -> StageOutput | None:
    """The last run's output when it was made from the same inputs (``fingerprint``) and may be reused:
    a stage hands it back, side outputs included, instead of doing the work again."""
    if overwrite or previous is None or previous.fingerprint != fingerprint:
        return None
    return previous


class StageDataset(AbstractDataset[StageOutput, "StageOutput | None"]):
    """A stage's output: a ``datasets.Dataset`` or ``DatasetDict`` stored as Arrow files, with its fingerprint,
    side outputs and settings.

    Example catalog entries (the second is the same folder, read as "what the last run left")::

        conversations:
          type: qwen_pipeline.datasets.StageDataset
          path: data/02_intermediate/conversations

        conversations_previous:
          type: qwen_pipeline.datasets.StageDataset
          path: data/02_intermediate/conversations
          previous: true

    ``load`` gives the ``StageOutput`` (data memory-mapped: nothing is read until used); with
    ``previous: true`` it gives None when nothing complete and current is stored, so a node can pass it
    to ``reuse``. Saving moves the stage's staged Arrow files into place (a rename) and keeps
    a split's row order as an indices file rather than rewriting its rows; saving what is already
    stored, with the same fingerprint and settings, does nothing. The folder is written beside and renamed into
    place, so an interrupted save never leaves one that looks complete. When a run stops before it
    remakes this output (``StaleOutputsHook``), the folder is marked stale: loading it is an error saying
    why, the ``previous`` view gives None, and the next save clears the mark.
    """

    def __init__(
        self,
        *,
        path: str,
        previous: bool = False,
        metadata: dict[str, Any] | None = None,
    ):
        self._path = Path(path)
        self._previous = previous
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "previous": self._previous}

    def _exists(self) -> bool:  # a stale output is missing: --only-missing-outputs remakes it
        return self._complete() and not (self._path / STALE).is_file()

    def _complete(self) -> bool:
        return (self._path / LAYOUT).is_file()

    def _load(self) -> StageOutput | None:
        if not self._complete():
            if self._previous:
                return None
            raise DataSourceError(f"{self._path}: no complete stage output here (no {LAYOUT}); run the stage first")
        if (self._path / STALE).is_file():
            if self._previous:
                return None
            why = json.loads((self._path / STALE).read_text())["reason"]
            raise DataSourceError(f"{self._path} is an earlier run's output, not current: {why}")
        layout = json.loads((self._path / LAYOUT).read_text())
        parts = {name: self._open(part, layout["fingerprint"]) for name, part in layout["parts"].items()}
        data = parts[""] if list(parts) == [""] else DatasetDict(parts)
        outputs = json.loads((self._path / OUTPUTS).read_text())
        if not isinstance(outputs, dict):  # a list: written by a version that stored them by position
            outputs = {}
        # no "settings": written by a version that did not record them (read as none recorded)
        settings = layout.get("settings", {})
        return StageOutput(data=data, fingerprint=layout["fingerprint"], outputs=outputs, settings=settings)

    def _open(self, part: dict[str, Any], fingerprint: str) -> Dataset:
        files = [str(self._path / name) for name in part["files"]]
        dataset = open_files(files, _schema(self._path / part["files"][0]) if files else pa.schema([]))
        if part["indices"]:
            indices = MemoryMappedTable.from_file(str(self._path / part["indices"]))
            dataset = Dataset(dataset.data, indices_table=indices, fingerprint=fingerprint)
        return dataset

    def _save(self, data: StageOutput) -> None:
        if self._previous:
            raise DatasetError(f"{self._path}: a 'previous' view is read-only; save to the stage's own entry")
        if self._is_stored(data):
            logger.info("%s: unchanged (fingerprint %s)", self._path, data.fingerprint[:12])
            (self._path / STALE).unlink(missing_ok=True)
            return
        target = self._path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            parts = data.data if isinstance(data.data, DatasetDict) else {"": data.data}
            names: dict[str, str] = {}  # source file -> its name here (splits may share files)
            layout = {name: self._store(split, name, tmp, names, data.staging) for name, split in parts.items()}
            (tmp / OUTPUTS).write_text(json.dumps(data.outputs, ensure_ascii=False, default=str))
            stored = {"fingerprint": data.fingerprint, "settings": data.settings, "parts": layout}
            (tmp / LAYOUT).write_text(json.dumps(stored, indent=1, ensure_ascii=False))
            swap_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def mark_stale(self, reason: str) -> bool:
        """Mark what is stored here as an earlier run's output (``reason``: why this run did not remake it).
        Returns whether it was marked now (not when there is nothing here, or it was marked before: the first
        reason stays)."""
        if self._previous or not self._exists():
            return False
        (self._path / STALE).write_text(json.dumps({"reason": reason}, ensure_ascii=False) + "\n")
        return True

    def _is_stored(self, data: StageOutput) -> bool:
        if not self._complete():
            return False
        layout = json.loads((self._path / LAYOUT).read_text())
        if layout["fingerprint"] != data.fingerprint or layout.get("settings", {}) != data.settings:
            return False
        parts = data.data.values() if isinstance(data.data, DatasetDict) else [data.data]
        here = self._path.resolve()
        return all(
            (files := table_files(p.data)) is not None and all(Path(f).resolve().parent == here for f in files)
            for p in parts
        )

    def _store(
        self, dataset: Dataset, name: str, tmp: Path, names: dict[str, str], staging: Staging | None
    ) -> dict[str, Any]:
        """One split's files in ``tmp``: staged files moved, others linked, in-memory rows written."""
        prefix = name or "data"
        files = table_files(dataset.data)
        if files is None:  # in memory or sliced: write its rows
            out = f"{prefix}-00000.arrow"
            write_rows(iter_chunks(dataset, 10_000), dataset.data.schema, tmp / out)
            return {"files": [out], "indices": None}
        stored = []
        for source in files:
            if source not in names:
                names[source] = f"{prefix}-{len(names):05d}.arrow"
                if staging is not None and staging.holds(source):
                    shutil.move(source, tmp / names[source])
                else:  # someone else's file (an earlier stage output, a cache): never move it
                    _link_or_copy(Path(source), tmp / names[source])
            stored.append(names[source])
        indices = None
        if dataset._indices is not None:
            indices = f"{prefix}-indices.arrow"
            table = dataset._indices.table
            write_rows(iter(table.to_batches(max_chunksize=1 << 16)), table.schema, tmp / indices)
        return {"files": stored, "indices": indices}


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _schema(path: Path) -> pa.Schema:
    with pa.OSFile(str(path)) as f:
        return pa.ipc.open_stream(f).schema
