"""A Kedro dataset for a LLaMA-Factory data folder: ``dataset_info.json`` and the files it names."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from ..errors import DataSourceError

# File types LLaMA-Factory reads from a dataset folder, by extension (txt is pre-training only).
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass(frozen=True)
class RawRecord:
    """One record as read: its parsed object, or why it could not be parsed."""

    file: str  # relative to the folder of dataset_info.json (or the hub id)
    index: int  # position in its file
    data: Any
    error: str | None = None


@dataclass(frozen=True)
class RawDatasets:
    """What ``DatasetInfoDataset`` loads: the parsed ``dataset_info.json`` and a reader.

    ``read(name)`` reads the named dataset's files only when asked, so a
    ``dataset_info.json`` listing many large datasets costs nothing for those unused.
    """

    info_path: str
    info: dict[str, dict[str, Any]]
    read: Callable[[str], list[RawRecord]]


class DatasetInfoDataset(AbstractDataset[None, RawDatasets]):
    """Reads a LLaMA-Factory ``dataset_info.json`` and, on demand, the data it names.

    Example catalog entry::

        raw_datasets:
          type: qwen_pipeline.datasets.DatasetInfoDataset
          filepath: data/01_raw/dataset_info.json

    ``file_name`` is a file or a folder (json, jsonl, csv, parquet or arrow; one type per
    folder), resolved against the folder holding ``dataset_info.json``; a name that resolves
    outside that folder is refused. ``hf_hub_url`` (with ``subset``, ``folder``, ``split``) is
    loaded through ``datasets`` where a network exists. A JSON Lines line that is not valid
    JSON becomes a ``RawRecord`` with an ``error`` (its line number), not an exception, so it
    is reported with the rejected records. Nothing here unpickles anything.
    """

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _save(self, data: None) -> None:
        raise DataSourceError(f"{self._filepath}: the raw data folder is read-only")

    def _load(self) -> RawDatasets:
        try:
            info = json.loads(self._filepath.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataSourceError(f"{self._filepath}: no dataset_info.json here") from exc
        except json.JSONDecodeError as exc:
            raise DataSourceError(f"{self._filepath}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
            raise DataSourceError(f"{self._filepath}: expected an object mapping dataset names to objects")
        return RawDatasets(info_path=str(self._filepath), info=info, read=lambda name: self._read(name, info[name]))

    def _read(self, name: str, info: dict[str, Any]) -> list[RawRecord]:
        where = f"{self._filepath}, dataset {name!r}"
        if "hf_hub_url" in info:
            return _read_hub(where, info)
        if "file_name" not in info:
            raise DataSourceError(
                f"{where}: needs 'file_name' or 'hf_hub_url' "
                "(ms_hub_url, om_hub_url, script_url and cloud_file_name are not supported)"
            )
        root = self._filepath.parent.resolve()
        path = (root / info["file_name"]).resolve()
        if not path.is_relative_to(root):
            raise DataSourceError(f"{where}: file_name {info['file_name']!r} resolves outside {root}")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise DataSourceError(f"{where}: folder {path} holds no files")
        elif path.is_file():
            files = [path]
        else:
            raise DataSourceError(f"{where}: {path} not found")
        kinds = {p.suffix: FILE_TYPES.get(p.suffix) for p in files}
        if None in kinds.values():
            bad = sorted(k for k, v in kinds.items() if v is None)
            raise DataSourceError(f"{where}: unsupported file type {', '.join(bad)} (use {', '.join(FILE_TYPES)})")
        if len(set(kinds.values())) > 1:
            raise DataSourceError(f"{where}: folder {path} mixes file types {', '.join(sorted(kinds))}; use one")
        records: list[RawRecord] = []
        for file in files:
            rel = str(file.relative_to(root))
            kind = FILE_TYPES[file.suffix]
            records += _read_json(file, rel) if kind == "json" else _read_table(file, rel, kind)
        return records


def _read_hub(where: str, info: dict[str, Any]) -> list[RawRecord]:
    import datasets

    url = info["hf_hub_url"]
    try:
        data = datasets.load_dataset(
            url, name=info.get("subset"), data_dir=info.get("folder"), split=info.get("split", "train")
        )
    except Exception as exc:  # no network, unknown id, gated dataset...
        raise DataSourceError(
            f"{where}: could not load {url!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "Without a network, download it elsewhere and name the local copy in 'file_name'."
        ) from exc
    return [RawRecord(url, i, row) for i, row in enumerate(data)]


def _read_table(path: Path, rel: str, kind: str) -> list[RawRecord]:
    """csv, parquet and arrow files through ``datasets`` (the loader LLaMA-Factory uses)."""
    import datasets

    try:
        data = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:
        raise DataSourceError(f"{path}: cannot read as {kind}: {type(exc).__name__}: {exc}") from exc
    return [RawRecord(rel, i, row) for i, row in enumerate(data)]


def _read_json(path: Path, rel: str) -> list[RawRecord]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return _read_jsonl(text, path, rel)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        try:  # LLaMA-Factory also accepts JSON Lines saved as .json
            return _read_jsonl(text, path, rel)
        except DataSourceError:
            raise DataSourceError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(data, list):
        raise DataSourceError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [RawRecord(rel, i, record) for i, record in enumerate(data)]


def _read_jsonl(text: str, path: Path, rel: str) -> list[RawRecord]:
    records = []
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    for index, (line_no, line) in enumerate(numbered):
        try:
            records.append(RawRecord(rel, index, json.loads(line)))
        except json.JSONDecodeError as exc:
            records.append(RawRecord(rel, index, None, f"invalid JSON at line {line_no}: {exc.msg}"))
    if numbered and all(r.error for r in records):
        raise DataSourceError(f"{path}: no line is valid JSON (first: {records[0].error})")
    return records
