"""A Kedro dataset for a LLaMA-Factory data folder: ``dataset_info.json`` and the files it names."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError


@dataclass(frozen=True)
class RawRecord:
    """One record as read: its parsed object, or why it could not be parsed."""

    index: int
    data: Any
    error: str | None = None


@dataclass(frozen=True)
class RawDatasets:
    """What ``DatasetInfoDataset`` loads: the parsed ``dataset_info.json`` and a reader.

    ``read(name)`` reads the named dataset's file only when asked, so a
    ``dataset_info.json`` listing many large datasets costs nothing for those unused.
    """

    info_path: str
    info: dict[str, dict[str, Any]]
    read: Callable[[str], tuple[str, list[RawRecord]]]


class DatasetInfoDataset(AbstractDataset[None, RawDatasets]):
    """Reads a LLaMA-Factory ``dataset_info.json`` and, on demand, the data files it names.

    Example catalog entry::

        raw_datasets:
          type: qwen_pipeline.datasets.DatasetInfoDataset
          filepath: data/01_raw/dataset_info.json

    File names are resolved against the folder holding ``dataset_info.json``; a name
    that resolves outside that folder is refused. A JSON Lines line that is not valid
    JSON becomes a ``RawRecord`` with an ``error`` (its line number), not an exception,
    so it can be reported with the rejected records.
    """

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _save(self, data: None) -> None:
        raise DatasetError(f"{self._filepath}: the raw data folder is read-only")

    def _load(self) -> RawDatasets:
        try:
            info = json.loads(self._filepath.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DatasetError(f"{self._filepath}: no dataset_info.json here") from exc
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{self._filepath}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
            raise DatasetError(f"{self._filepath}: expected an object mapping dataset names to objects")
        return RawDatasets(info_path=str(self._filepath), info=info, read=self._read)

    def _read(self, name: str) -> tuple[str, list[RawRecord]]:
        info = json.loads(self._filepath.read_text(encoding="utf-8"))[name]
        where = f"{self._filepath}, dataset {name!r}"
        if "file_name" not in info:
            raise DatasetError(f"{where}: only local files ('file_name') are supported so far")
        root = self._filepath.parent.resolve()
        path = (root / info["file_name"]).resolve()
        if not path.is_relative_to(root):
            raise DatasetError(f"{where}: file_name {info['file_name']!r} resolves outside {root}")
        if not path.is_file():
            raise DatasetError(f"{where}: file {path} not found")
        rel = str(path.relative_to(root))
        if path.suffix == ".json":
            return rel, _read_json(path)
        if path.suffix == ".jsonl":
            return rel, _read_jsonl(path)
        raise DatasetError(f"{where}: unsupported file type {path.suffix!r} (json and jsonl so far)")


def _read_json(path: Path) -> list[RawRecord]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        try:  # LLaMA-Factory also accepts JSON Lines saved as .json
            return _read_jsonl(path)
        except DatasetError:
            raise DatasetError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [RawRecord(i, record) for i, record in enumerate(data)]


def _read_jsonl(path: Path) -> list[RawRecord]:
    records = []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines()]
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    for index, (line_no, line) in enumerate(numbered):
        try:
            records.append(RawRecord(index, json.loads(line)))
        except json.JSONDecodeError as exc:
            records.append(RawRecord(index, None, f"invalid JSON at line {line_no}: {exc.msg}"))
    if numbered and all(r.error for r in records):
        raise DatasetError(f"{path}: no line is valid JSON (first: {records[0].error})")
    return records
