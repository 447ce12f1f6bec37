"""Data files as LLaMA-Factory reads them, read in bounded memory.

JSON and JSON Lines files are read a megabyte at a time: each record's JSON text (as written in
the file) goes into an Arrow file with the reason it could not be parsed, if any; the records are
parsed again by the converters, in parallel. csv, parquet and arrow files go through ``datasets``
(the loader LLaMA-Factory uses), which writes them as memory-mapped Arrow.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from datasets import Dataset

from ..errors import DataSourceError
from .streaming import Staging, open_files, write_rows

# File types LLaMA-Factory reads from a dataset folder, by extension (txt is pre-training only).
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
# A JSON-read record: its text as written in the file, or why it could not be parsed.
RAW_SCHEMA = pa.schema([("json", pa.string()), ("error", pa.string())])
READ_CHARS = 1 << 20  # characters read at a time
MAX_RECORD_CHARS = 64 << 20  # a record longer than this (or invalid JSON) stops the read
ROWS_PER_CHUNK = 10_000


@dataclass(frozen=True)
class RawTable:
    """One named dataset's records as read, in file order, not yet converted.

    ``kind`` json: ``data`` has the columns of ``RAW_SCHEMA``; table: the file's own columns.
    """

    data: Dataset
    files: tuple[tuple[int, str], ...]  # (first row, file name relative to dataset_info.json's folder)
    kind: Literal["json", "table"]
    skipped: tuple[str, ...] = ()  # hidden files of a dataset folder (.DS_Store, ._*, Thumbs.db), not read
    staging: Staging | None = field(default=None, compare=False, repr=False)  # holds JSON read as Arrow


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# Byte-order marks, longest first (UTF-32 LE starts with UTF-16 LE's).
_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)
# What invalid UTF-8 bytes become when read with errors="surrogateescape" (U+DC80..U+DCFF).
_UNDECODED = re.compile("[\udc80-\udcff]")


def text_encoding(path: Path) -> str:
    """UTF-8 unless the file starts with a byte-order mark (UTF-8, UTF-16 or UTF-32: decoded)."""
    with open(path, "rb") as f:
        head = f.read(4)
    encoding = next((name for bom, name in _BOMS if head.startswith(bom)), None)
    if encoding is None and b"\x00" in head:
        raise DataSourceError(
            f"{path}: starts with NUL bytes: UTF-16 or UTF-32 without a byte-order mark? Save it as UTF-8"
        )
    return encoding or "utf-8"


def _open_text(path: Path):
    # Invalid UTF-8 bytes stay readable as lone surrogates, so the record holding them can be named.
    return open(path, encoding=text_encoding(path), errors="surrogateescape")


def _undecoded(text: str, start: int = 0, end: int | None = None) -> tuple[int, str] | None:
    """Where ``text[start:end]`` (read with surrogateescape) is not UTF-8, and why; None if it is."""
    bad = _UNDECODED.search(text, start, len(text) if end is None else end)
    if bad is None:
        return None
    byte = ord(bad.group()) - 0xDC00
    return bad.start(), f"invalid UTF-8 byte 0x{byte:02x} (is the file in another encoding, such as latin-1?)"


def read_files(files: list[Path], root: Path, kind: str, staging: Staging) -> RawTable:
    """The records of ``files`` (all of one kind), in order (JSON converted to Arrow in ``staging``)."""
    work = staging.folder()
    parts, starts, start = [], [], 0
    for n, path in enumerate(files):
        if kind == "json":
            out = work / f"raw-{n:05d}.arrow"
            write_rows(_chunks(json_records(path)), RAW_SCHEMA, out)
            part = open_files([str(out)], RAW_SCHEMA)
        else:
            part = read_table(path, kind)
        if not len(part):
            raise DataSourceError(f"{path}: holds no records{' (an empty file)' if not path.stat().st_size else ''}")
        parts.append(part)
        starts.append((start, str(path.relative_to(root))))
        start += len(part)
    data = _concatenate(parts, files)
    return RawTable(data=data, files=tuple(starts), kind="json" if kind == "json" else "table", staging=staging)


def _concatenate(parts: list[Dataset], files: list[Path]) -> Dataset:
    from datasets import concatenate_datasets

    if len(parts) == 1:
        return parts[0]
    first = parts[0].features
    for path, part in zip(files, parts):
        if part.features != first:
            raise DataSourceError(f"{path}: its columns differ from {files[0].name}'s; a dataset's files share one")
    return concatenate_datasets(parts)


def read_table(path: Path, kind: str) -> Dataset:
    """csv, parquet and arrow files through ``datasets`` (the loader LLaMA-Factory uses)."""
    import datasets

    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train", **_csv_as_text(path, kind))
    except DataSourceError:
        raise
    except Exception as exc:
        raise DataSourceError(f"{path}: cannot read as {kind}: {type(exc).__name__}: {exc}") from exc


def _csv_as_text(path: Path, kind: str) -> dict[str, Any]:
    """For csv: every column as text, so a cell reads as written (``3``, not ``3.0``; ``007``)."""
    if kind != "csv":
        return {}
    import csv

    from datasets import Features, Value

    with open(path, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataSourceError(f"{path}: holds no records (no header line)")
    return {"features": Features({name: Value("string") for name in header})}


def read_hub(where: str, info: dict[str, Any]) -> RawTable:
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
    return RawTable(data=data, files=((0, url),), kind="table")


def _chunks(records: Iterator[tuple[str | None, str | None]]) -> Iterator[pa.Table]:
    texts, errors = [], []
    for text, error in records:
        texts.append(text)
        errors.append(error)
        if len(texts) == ROWS_PER_CHUNK:
            yield pa.table({"json": texts, "error": errors}, schema=RAW_SCHEMA)
            texts, errors = [], []
    if texts:
        yield pa.table({"json": texts, "error": errors}, schema=RAW_SCHEMA)


def json_records(path: Path) -> Iterator[tuple[str | None, str | None]]:
    """(JSON text, None) or (None, reason) for each record of a .json (a list, or JSON Lines as
    LLaMA-Factory also accepts) or .jsonl file."""
    if path.suffix == ".json" and _first_character(path) == "[":
        yield from _array_items(path)
    else:
        yield from _lines(path)


def _first_character(path: Path) -> str:
    with _open_text(path) as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped[0]
    return ""


def _lines(path: Path) -> Iterator[tuple[str | None, str | None]]:
    valid = seen = 0
    first_error = None
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            seen += 1
            if bad := _undecoded(line):
                reason = f"line {line_no}, column {bad[0] + 1}: {bad[1]}"
                first_error = first_error or reason
                yield None, reason
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                first_error = first_error or f"invalid JSON at line {line_no}: {exc.msg}"
                yield None, f"invalid JSON at line {line_no}: {exc.msg}"
                continue
            valid += 1
            yield line.strip(), None
    if seen and not valid:
        if path.suffix == ".json":  # not JSON Lines after all: say what is wrong with the document
            raise DataSourceError(f"{path}: {_document_problem(path)}")
        raise DataSourceError(f"{path}: no line is valid JSON (first: {first_error})")


def _document_problem(path: Path) -> str:
    """Why a whole .json document is no list of records (read only as far as a record's limit)."""
    with _open_text(path) as f:
        text = f.read(MAX_RECORD_CHARS)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"invalid JSON at line {exc.lineno}: {exc.msg}"
    return f"expected a JSON list of records, got {type(value).__name__}"


def _array_items(path: Path) -> Iterator[tuple[str, None]]:
    """Each item of a top-level JSON array as its text, decoded with the standard library's parser
    over a sliding window of the file (its errors, with their line numbers, name what is wrong)."""
    decoder = json.JSONDecoder()
    with _open_text(path) as f:
        buffer, pos, lines_before, eof = "", 0, 0, False

        def more() -> bool:
            nonlocal buffer, pos, lines_before, eof
            lines_before += buffer.count("\n", 0, pos)
            chunk = f.read(READ_CHARS)
            buffer, pos, eof = buffer[pos:] + chunk, 0, not chunk
            return bool(chunk)

        def fail(at: int, message: str, what: str = "invalid JSON at line") -> DataSourceError:
            line = lines_before + buffer.count("\n", 0, at) + 1
            return DataSourceError(f"{path}: {what} {line}: {message}")

        def skip_space() -> str:
            nonlocal pos
            while True:
                while pos < len(buffer) and buffer[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buffer) or not more():
                    return buffer[pos] if pos < len(buffer) else ""

        skip_space()
        pos += 1  # the opening bracket
        first = True
        while True:
            char = skip_space()
            if char == "]":
                pos += 1
                if skip_space():
                    raise fail(pos, "Extra data")
                return
            if not first:
                if char != ",":
                    raise fail(pos, "Expecting ',' delimiter" if char else "Expecting ',' delimiter or ']'")
                pos += 1
                skip_space()
            while True:
                try:
                    _, end = decoder.raw_decode(buffer, pos)
                except json.JSONDecodeError as exc:
                    # Maybe only cut off at the window's end: read on (up to a record's limit), try again.
                    if not eof and len(buffer) - pos < MAX_RECORD_CHARS:
                        more()
                        continue
                    raise fail(exc.pos, exc.msg) from None
                if end == len(buffer) and not eof:  # a number may go on in the next chunk
                    more()
                    continue
                break
            if bad := _undecoded(buffer, pos, end):
                raise fail(bad[0], bad[1], "line")
            yield buffer[pos:end], None
            pos, first = end, False
