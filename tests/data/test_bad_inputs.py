"""Inputs users really send: each ends as a located error, a reject with its reason, or a counted warning.

Every case asserts the exact message or reason, and that records read = kept + rejected.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
from helpers import ingest, validate
from kedro.io import DatasetError

from qwen_pipeline.datasets import DatasetInfoDataset
from qwen_pipeline.errors import DataError

OK = [{"instruction": "q0", "output": "a0"}, {"instruction": "q1", "output": "a1"}]
LATIN1 = "café".encode("latin-1")  # b"caf\xe9": not UTF-8


def load(tmp_path, **entries):
    (tmp_path / "dataset_info.json").write_text(json.dumps(entries))
    return DatasetInfoDataset(filepath=str(tmp_path / "dataset_info.json")).load()


def run(tmp_path, entry, **ingest_params):
    """Ingest + validate of the one dataset 'd': (kept, rejected, ingest report, validate report)."""
    records, ingest_report = ingest(load(tmp_path, d=entry), {"dataset": ["d"], **ingest_params})
    kept, rejected, report, _ = validate(records, {"max_rejected_share": 1.0})
    assert report["read"] == len(kept) + len(rejected) == len(records)
    return kept, rejected, ingest_report, report


def answers(kept):
    return [c["messages"][-1]["content"] for c in kept]


# --- encodings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "bom"),
    [
        ("utf-8", b"\xef\xbb\xbf"),
        ("utf-16-le", b"\xff\xfe"),
        ("utf-16-be", b"\xfe\xff"),
        ("utf-32-le", b"\xff\xfe\x00\x00"),
    ],
)
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_byte_order_mark_names_the_encoding_and_the_file_is_decoded(tmp_path, encoding, bom, suffix):
    rows = [{"instruction": "naïve 你好", "output": "ok"}, OK[1]]
    text = json.dumps(rows, ensure_ascii=False) if suffix == ".json" else "\n".join(json.dumps(r) for r in rows)
    (tmp_path / f"data{suffix}").write_bytes(bom + text.encode(encoding))
    kept, rejected, _, _ = run(tmp_path, {"file_name": f"data{suffix}"})
    assert rejected == [] and kept[0]["messages"][0]["content"] == "naïve 你好" and answers(kept) == ["ok", "a1"]


def test_utf16_without_a_byte_order_mark_is_named(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(json.dumps(OK).encode("utf-16-le"))
    with pytest.raises(
        DatasetError, match=rf"{path}: starts with NUL bytes: UTF-16 or UTF-32 without a byte-order mark\?"
    ):
        run(tmp_path, {"file_name": "data.json"})


def test_invalid_utf8_in_json_lines_rejects_that_line_only(tmp_path):
    lines = [
        json.dumps(OK[0]).encode(),
        b'{"instruction": "' + LATIN1 + b'", "output": "x"}',
        json.dumps(OK[1]).encode(),
    ]
    (tmp_path / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    kept, rejected, _, _ = run(tmp_path, {"file_name": "data.jsonl"})
    assert answers(kept) == ["a0", "a1"]
    assert [(r["file"], r["index"], r["reason"]) for r in rejected] == [
        (
            "data.jsonl",
            1,
            "line 2, column 21: invalid UTF-8 byte 0xe9 (is the file in another encoding, such as latin-1?)",
        )
    ]


def test_invalid_utf8_in_a_json_array_names_the_file_and_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b'[\n {"instruction": "q", "output": "a"},\n {"instruction": "' + LATIN1 + b'", "output": "x"}\n]')
    with pytest.raises(
        DatasetError, match=rf"{path}: line 3: invalid UTF-8 byte 0xe9 \(is the file in another encoding"
    ):
        run(tmp_path, {"file_name": "data.json"})


def test_a_lone_surrogate_rejects_its_record_and_a_pair_is_text(tmp_path):
    text = '[{"instruction": "q0", "output": "a0 \\ud83d"}, {"instruction": "smile \\ud83d\\ude00", "output": "a1"}]'
    (tmp_path / "data.json").write_text(text)
    kept, rejected, _, _ = run(tmp_path, {"file_name": "data.json"})
    assert kept[0]["messages"][0]["content"] == "smile 😀"
    assert [(r["index"], r["reason"]) for r in rejected] == [
        (0, "output: a lone UTF-16 surrogate escape (such as \\ud83d) is not text")
    ]


# --- files that hold no records ----------------------------------------------------------------------


@pytest.mark.parametrize(("content", "why"), [("", " \\(an empty file\\)"), ("[]", ""), ("\n\n", "")])
def test_a_file_with_no_records_is_named(tmp_path, content, why):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=rf"^{path}: holds no records{why}$"):
        run(tmp_path, {"file_name": "data.json"})


def test_an_empty_file_in_a_folder_is_named(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "a.jsonl").write_text(json.dumps(OK[0]) + "\n")
    (tmp_path / "parts" / "b.jsonl").write_text("")
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'parts' / 'b.jsonl'}: holds no records \(an empty file\)"):
        run(tmp_path, {"file_name": "parts"})


# --- dataset_info.json that does not fit the records -----------------------------------------------


def test_a_mapped_column_no_record_has_is_named_with_the_keys_records_have(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps([{"question_text": "q", "output": "a", "id": 1}]))
    entry = {"file_name": "data.json", "columns": {"prompt": "question", "response": "output"}}
    with pytest.raises(
        DataError,
        match=r"dataset 'd': 'columns' maps prompt to 'question', but no record of data.json has it "
        r"\(records have: id, output, question_text\)$",
    ):
        run(tmp_path, entry)


def test_an_optional_mapped_column_no_record_has_is_a_warning(tmp_path, caplog):
    (tmp_path / "data.json").write_text(json.dumps(OK))
    entry = {"file_name": "data.json", "columns": {"prompt": "instruction", "response": "output", "system": "sys"}}
    with caplog.at_level(logging.WARNING):
        kept, _, _, _ = run(tmp_path, entry)
    assert len(kept) == 2
    assert "'columns' maps system to 'sys', but no record of data.json has it (records have: instruction, output)" in (
        caplog.text
    )


def test_a_default_column_no_record_has_is_named(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps([{"prompt": "q", "output": "a"}]))
    with pytest.raises(DataError, match=r"maps prompt to 'instruction', but no record of data.json has it"):
        run(tmp_path, {"file_name": "data.json"})


def test_a_key_given_twice_rejects_the_record(tmp_path):
    (tmp_path / "data.json").write_text(
        '[{"instruction": "q0", "output": "first", "output": "second"}, ' + json.dumps(OK[1]) + "]"
    )
    kept, rejected, _, _ = run(tmp_path, {"file_name": "data.json"})
    assert answers(kept) == ["a1"]
    assert [(r["index"], r["reason"]) for r in rejected] == [
        (0, "key 'output' appears twice in one object: the first value would be lost")
    ]


def test_an_empty_history_string_is_no_history(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps([{"instruction": "q", "output": "a", "history": ""}]))
    entry = {"file_name": "data.json", "columns": {"prompt": "instruction", "response": "output", "history": "history"}}
    kept, rejected, _, _ = run(tmp_path, entry)
    assert rejected == [] and [m["content"] for m in kept[0]["messages"]] == ["q", "a"]


# --- folders -------------------------------------------------------------------------------------------


def test_hidden_files_in_a_folder_are_skipped_and_named(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "a.jsonl").write_text("\n".join(json.dumps(r) for r in OK))
    for junk in (".DS_Store", "._a.jsonl", "Thumbs.db"):
        (parts / junk).write_bytes(b"\x00\x05\x16\x07junk")
    kept, _, report, _ = run(tmp_path, {"file_name": "parts"})
    assert answers(kept) == ["a0", "a1"]
    assert report["datasets"]["d"]["skipped_files"] == ["parts/.DS_Store", "parts/._a.jsonl", "parts/Thumbs.db"]
    assert report["datasets"]["d"]["files"] == ["parts/a.jsonl"]


def test_a_link_in_a_folder_that_leads_outside_the_data_folder_is_refused(tmp_path):
    data = tmp_path / "data"
    (data / "parts").mkdir(parents=True)
    secret = tmp_path / "elsewhere.jsonl"
    secret.write_text(json.dumps(OK[0]) + "\n")
    (data / "parts" / "a.jsonl").write_text(json.dumps(OK[1]) + "\n")
    os.symlink(secret, data / "parts" / "b.jsonl")
    with pytest.raises(DatasetError, match=rf"dataset 'd': parts/b.jsonl links to {secret}, outside {data}$"):
        run(data, {"file_name": "parts"})


def test_two_datasets_reading_one_file_are_warned_about(tmp_path, caplog):
    (tmp_path / "data.json").write_text(json.dumps(OK))
    raw = load(tmp_path, a={"file_name": "data.json"}, b={"file_name": "./data.json"})
    with caplog.at_level(logging.WARNING):
        records, report = ingest(raw, {"dataset": ["a", "b"]})
    assert len(records) == 4 and report["shared_files"] == {"data.json": ["a", "b"]}
    assert "data.json is read by datasets a, b: its records are used 2 times" in caplog.text


# --- typed tables ----------------------------------------------------------------------------------------


def test_numbers_in_csv_text_columns_are_read_as_written(tmp_path):
    (tmp_path / "math.csv").write_text(
        "instruction,output\nwhat is 1+2?,3\nhalf of 1?,0.50\nbond?,007\nsay hi,hi\ntrue?,true\n"
    )
    kept, rejected, report, _ = run(tmp_path, {"file_name": "math.csv"})
    assert rejected == [] and answers(kept) == ["3", "0.50", "007", "hi", "true"]
    assert report["datasets"]["d"]["numbers_as_text"] == 4


def test_numbers_in_parquet_text_columns_become_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"instruction": ["1+2?", "2+2?", "yes?"], "output": [3, 4, 5]})
    pq.write_table(table, tmp_path / "math.parquet")
    flags = pa.table({"instruction": ["a?", "b?"], "output": [True, False]})
    pq.write_table(flags, tmp_path / "flags.parquet")
    kept, rejected, report, _ = run(tmp_path, {"file_name": "math.parquet"})
    assert rejected == [] and answers(kept) == ["3", "4", "5"] and report["datasets"]["d"]["numbers_as_text"] == 3
    kept, _, _, _ = run(tmp_path, {"file_name": "flags.parquet"})
    assert answers(kept) == ["true", "false"]


def test_a_list_where_text_is_expected_is_rejected_with_the_column(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps([OK[0], {"instruction": "q", "output": {"text": "a"}}]))
    _, rejected, _, _ = run(tmp_path, {"file_name": "data.json"})
    assert [(r["index"], r["reason"]) for r in rejected] == [(1, "column 'output': expected a string, got dict")]
