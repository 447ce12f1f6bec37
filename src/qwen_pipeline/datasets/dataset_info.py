"""A Kedro dataset for a LLaMA-Factory data folder: ``dataset_info.json`` and the files it names."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from ..data.sources import FILE_TYPES, RawTable, file_digest, read_files, read_hub
from ..data.streaming import Staging
from ..errors import DataSourceError

# Files operating systems leave in folders: skipped in a dataset folder (and named in the ingest report).
HIDDEN_NAMES = {"Thumbs.db", "desktop.ini", "Icon\r"}


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in HIDDEN_NAMES


@dataclass(frozen=True)
class RawDatasets:
    """What ``DatasetInfoDataset`` loads: the parsed ``dataset_info.json``, a reader and a fingerprint.

    ``read(name)`` reads the named dataset's files only when asked, so a ``dataset_info.json``
    listing many large datasets costs nothing for those unused; ``fingerprint(name)`` hashes its
    entry and its files' names, sizes and contents, without parsing them.
    """

    info_path: str
    info: dict[str, dict[str, Any]]
    read: Callable[[str], RawTable]
    fingerprint: Callable[[str], str]


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
    JSON becomes a record with an ``error`` (its line number), not an exception, so it is
    reported with the rejected records. Files are read in bounded memory (``data/sources.py``).
    Nothing here unpickles anything.
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
        return RawDatasets(
            info_path=str(self._filepath),
            info=info,
            read=lambda name: self._read(name, info[name]),
            fingerprint=lambda name: self._fingerprint(name, info[name]),
        )

    def _read(self, name: str, info: dict[str, Any]) -> RawTable:
        where = f"{self._filepath}, dataset {name!r}"
        if "hf_hub_url" in info:
            return read_hub(where, info)
        root, files, kind, skipped = self._files(name, info)
        return dataclasses.replace(read_files(files, root, kind, Staging("raw")), skipped=tuple(skipped))

    def _fingerprint(self, name: str, info: dict[str, Any]) -> str:
        """The entry and each file's name, size and content hash (a hub dataset: its entry only)."""
        digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode())
        if "hf_hub_url" not in info:
            root, files, _, _ = self._files(name, info)
            for path in files:
                digest.update(f"{path.relative_to(root)}\0{path.stat().st_size}\0{file_digest(path)}\0".encode())
        return digest.hexdigest()

    def _files(self, name: str, info: dict[str, Any]) -> tuple[Path, list[Path], str, list[str]]:
        """The folder of dataset_info.json, the entry's files in order, their one kind, and the hidden
        files of a folder that were skipped."""
        where = f"{self._filepath}, dataset {name!r}"
        if "file_name" not in info:
            raise DataSourceError(
                f"{where}: needs 'file_name' or 'hf_hub_url' "
                "(ms_hub_url, om_hub_url, script_url and cloud_file_name are not supported)"
            )
        root = self._filepath.parent.resolve()
        path = (root / info["file_name"]).resolve()
        if not path.is_relative_to(root):
            raise DataSourceError(f"{where}: file_name {info['file_name']!r} resolves outside {root}")
        skipped: list[str] = []
        if path.is_dir():
            files = []
            for entry in sorted(path.iterdir()):
                if is_hidden(entry.name):
                    skipped.append(str(entry.relative_to(root)))
                    continue
                target = entry.resolve()  # a link inside the folder may point anywhere
                if not target.is_relative_to(root):
                    raise DataSourceError(f"{where}: {entry.relative_to(root)} links to {target}, outside {root}")
                if target.is_file():
                    files.append(entry)
            if not files:
                raise DataSourceError(f"{where}: folder {path} holds no data files")
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
        return root, files, next(iter(kinds.values())), skipped
