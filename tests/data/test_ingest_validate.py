"""Ingest + validate on real files: every record is kept or rejected with a reason naming it."""

from __future__ import annotations

import json
import logging

import pytest
from helpers import ingest, validate
from kedro.io import DatasetError

from qwen_pipeline.datasets import DatasetInfoDataset
from qwen_pipeline.pipelines.validate.nodes import WARNING_TEXT

ALPACA_OK = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
SHAREGPT_OK = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}


def write_dataset(tmp_path, records, formatting="alpaca", suffix=".json", **entry):
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    info = {"demo": {"file_name": path.name, "formatting": formatting, **entry}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return DatasetInfoDataset(filepath=str(tmp_path / "dataset_info.json")).load()


def run(raw, share=1.0):
    records, _ = ingest(raw, {"dataset": ["demo"]})
    return validate(records, {"max_rejected_share": share})


CASES = [
    # (name, formatting, bad record, expected reason)
    ("missing output", "alpaca", {"instruction": "x", "input": ""}, "missing column 'output'"),
    (
        "output not a string",
        "alpaca",
        {"instruction": "x", "output": ["a", "b"]},
        "column 'output': expected a string, got list",
    ),
    (
        "instruction not a string",
        "alpaca",
        {"instruction": 3, "output": "y"},
        "column 'instruction': expected a string, got int",
    ),
    ("not an object", "alpaca", ["instruction", "output"], "expected a JSON object, got list"),
    (
        "history item not a pair",
        "alpaca",
        {"instruction": "x", "output": "y", "history": [["only one"]]},
        "column 'history', item 0: not a [prompt, answer] pair of strings",
    ),
    (
        "roles out of order",
        "sharegpt",
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
        "message 0: role 'assistant' where a prompt (user/observation) was expected; "
        "message 1: role 'user' where an answer (assistant/function) was expected",
    ),
    (
        "odd number of turns",
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "gpt", "value": "b"},
                {"from": "human", "value": "c"},
            ]
        },
        "odd number of messages (3): the last prompt has no answer",
    ),
    (
        "unknown role",
        "sharegpt",
        {"conversations": [{"from": "robot", "value": "a"}, {"from": "gpt", "value": "b"}]},
        "message 0: unknown role 'robot' in 'from' (expected 'human', 'gpt', 'observation', 'function_call')",
    ),
    ("missing messages column", "sharegpt", {"dialog": []}, "missing column 'conversations'"),
    ("no messages", "sharegpt", {"conversations": []}, "no messages"),
    (
        "content not a string",
        "sharegpt",
        {"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "b"}]},
        "message 0: expected an object with a string 'value'",
    ),
]


@pytest.mark.parametrize(("name", "formatting", "bad", "reason"), CASES, ids=[c[0] for c in CASES])
def test_malformed_record_is_rejected_with_reason(tmp_path, name, formatting, bad, reason):
    good = ALPACA_OK if formatting == "alpaca" else SHAREGPT_OK
    history = {"columns": {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}}
    raw = write_dataset(tmp_path, [good, bad, good], formatting, **(history if formatting == "alpaca" else {}))
    kept, rejected, report, _ = run(raw)
    assert report["read"] == 3 == report["kept"] + report["rejected"]
    assert [r["index"] for r in rejected] == [1]
    assert rejected[0]["file"] == "data.json" and rejected[0]["dataset"] == "demo"
    assert rejected[0]["reason"] == reason
    assert [k["index"] for k in kept] == [0, 2]


def test_invalid_json_line_is_rejected_with_its_line_number(tmp_path):
    raw = write_dataset(tmp_path, [ALPACA_OK, "{not json", "", ALPACA_OK], suffix=".jsonl")
    kept, rejected, report, _ = run(raw)
    assert (report["read"], report["kept"], report["rejected"]) == (3, 2, 1)
    reason = "invalid JSON at line 2: Expecting property name enclosed in double quotes"
    assert [(r["index"], r["reason"]) for r in rejected] == [(1, reason)]


def test_counts_are_logged_and_rejected_share_bounded(tmp_path, caplog):
    raw = write_dataset(tmp_path, [ALPACA_OK, {"instruction": "x"}, {"instruction": "y"}])
    with caplog.at_level(logging.INFO):
        run(raw, share=1.0)
    assert "Validated 3 records: 1 kept, 2 rejected" in caplog.text
    with pytest.raises(ValueError, match=r"2 of 3 records rejected \(67%\).*Top reasons: 2 x missing column 'output'"):
        run(raw, share=0.5)


def test_sharegpt_leading_system_message_becomes_the_system_prompt(tmp_path):
    record = {"conversations": [{"from": "system", "value": "Be terse."}, *SHAREGPT_OK["conversations"]]}
    kept, _, _, _ = run(write_dataset(tmp_path, [record], "sharegpt"))
    assert kept[0]["system"] == "Be terse."
    assert [m["role"] for m in kept[0]["messages"]] == ["user", "assistant"]


def test_alpaca_input_joins_instruction_and_history_becomes_turns(tmp_path):
    record = {
        "instruction": "Translate.",
        "input": "bonjour",
        "output": "hello",
        "history": [["q1", "a1"]],
        "system": "S",
    }
    columns = {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "history": "history",
        "system": "system",
    }
    kept, _, _, _ = run(write_dataset(tmp_path, [record], columns=columns))
    assert kept[0]["messages"] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "Translate.\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    assert kept[0]["system"] == "S"


def test_unlisted_system_column_is_ignored_as_in_llamafactory(tmp_path):
    kept, _, _, _ = run(write_dataset(tmp_path, [{**ALPACA_OK, "system": "S"}]))  # default columns: no system
    assert kept[0]["system"] is None


def test_unknown_dataset_name_lists_the_known_ones(tmp_path):
    raw = write_dataset(tmp_path, [ALPACA_OK])
    with pytest.raises(ValueError, match="no dataset named 'nope'; it defines 'demo'"):
        ingest(raw, {"dataset": ["nope"]})


def test_file_outside_the_data_folder_is_refused(tmp_path):
    (tmp_path / "inner").mkdir()
    (tmp_path / "secret.json").write_text("[]")
    (tmp_path / "inner" / "dataset_info.json").write_text(json.dumps({"x": {"file_name": "../secret.json"}}))
    raw = DatasetInfoDataset(filepath=str(tmp_path / "inner" / "dataset_info.json")).load()
    with pytest.raises(DatasetError, match=r"file_name '../secret.json' resolves outside"):
        raw.read("x")


def test_invalid_dataset_info_names_file_and_line(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{\n "a": {,}\n}')
    with pytest.raises(DatasetError, match=r"dataset_info.json: invalid JSON at line 2"):
        DatasetInfoDataset(filepath=str(tmp_path / "dataset_info.json")).load()


def test_demo_data_keeps_all_but_the_two_planted_errors():
    from pathlib import Path

    raw = DatasetInfoDataset(filepath=str(Path(__file__).parents[2] / "data/01_raw/dataset_info.json")).load()
    records, _ = ingest(raw, {"dataset": ["alpaca_demo", "sharegpt_demo"]})
    kept, rejected, report, metrics = validate(records, {})
    assert (report["read"], report["kept"], report["rejected"]) == (362, 360, 2)
    assert [(r["file"], r["index"]) for r in rejected] == [("alpaca_demo.json", 17), ("sharegpt_demo.json", 9)]
    assert metrics["rejected"] == {"value": 2.0, "step": 0}
    assert metrics["sharegpt_demo.rejected"] == {"value": 1.0, "step": 0}
    assert metrics["alpaca_demo.kept"] == {"value": 240.0, "step": 0}


def run_with(raw, **validate_params):
    records, _ = ingest(raw, {"dataset": ["demo"]})
    return validate(records, {"max_rejected_share": 1.0, **validate_params})


def call(name="lookup"):
    return {"from": "function_call", "value": json.dumps({"name": name, "arguments": {}})}


# (kind, formatting, a suspect record, the detail named): LLaMA-Factory 0.9.5 trains on each of these.
SUSPECT = [
    ("empty_prompt", "alpaca", {"instruction": "", "input": "", "output": "y"}, "message 0: empty user content"),
    ("empty_prompt", "alpaca", {"instruction": " \n\t", "output": "y"}, "message 0: empty user content"),
    ("empty_answer", "alpaca", {"instruction": "say nothing", "output": ""}, "message 1: empty assistant content"),
    (
        "call_without_observation",
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "q"},
                call(),
                {"from": "human", "value": "and?"},
                {"from": "gpt", "value": "a"},
            ]
        },  # fmt: skip
        "message 1: function call followed by a user message",
    ),
    (
        "observation_without_call",
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
                {"from": "observation", "value": "{}"},
                {"from": "gpt", "value": "b"},
            ]
        },  # fmt: skip
        "message 2: observation with no function call before it",
    ),
    (
        "observation_without_call",
        "sharegpt",
        {"conversations": [{"from": "observation", "value": "{}"}, {"from": "gpt", "value": "b"}]},
        "message 0: observation with no function call before it",
    ),
]


@pytest.mark.parametrize(
    ("kind", "formatting", "suspect", "detail"), SUSPECT, ids=[f"{c[0]}-{i}" for i, c in enumerate(SUSPECT)]
)
def test_suspect_record_is_kept_with_a_warning_or_rejected_when_asked(
    tmp_path, caplog, kind, formatting, suspect, detail
):
    good = ALPACA_OK if formatting == "alpaca" else SHAREGPT_OK
    raw = write_dataset(tmp_path, [good, suspect, good], formatting)
    with caplog.at_level(logging.WARNING):
        kept, rejected, report, _ = run_with(raw)
    assert (report["read"], report["kept"], report["rejected"], rejected, report["accepted"]) == (3, 3, 0, [], True)
    assert report["warnings"] == {
        kind: {"records": 1, "examples": [{"dataset": "demo", "file": "data.json", "index": 1, "detail": detail}]}
    }
    assert f"1 kept conversations where {WARNING_TEXT[kind]}; LLaMA-Factory trains on them too. " in caplog.text
    assert f"E.g. data.json record 1: {detail}. To reject them: validate.reject: [{kind}]" in caplog.text

    kept, rejected, report, _ = run_with(raw, reject=[kind])
    assert (report["read"], report["kept"], report["rejected"], report["warnings"]) == (3, 2, 1, {})
    reason = f"{detail} (validate.reject: {kind})"
    assert [(r["file"], r["index"], r["reason"]) for r in rejected] == [("data.json", 1, reason)]
    assert [k["index"] for k in kept] == [0, 2]


def test_warnings_count_records_and_name_the_first_five(tmp_path):
    empty = {"instruction": "", "output": "y"}
    raw = write_dataset(tmp_path, [ALPACA_OK] + [empty] * 7 + [{"instruction": "", "output": ""}])
    _, _, report, _ = run_with(raw)
    assert report["warnings"]["empty_prompt"]["records"] == 8
    assert [e["index"] for e in report["warnings"]["empty_prompt"]["examples"]] == [1, 2, 3, 4, 5]
    detail = "message 1: empty assistant content"
    assert report["warnings"]["empty_answer"] == {
        "records": 1,
        "examples": [{"dataset": "demo", "file": "data.json", "index": 8, "detail": detail}],
    }


def test_unknown_reject_kind_is_named(tmp_path):
    with pytest.raises(
        ValueError, match=r"validate.reject: expected a list of one of 'empty_prompt', .*got \['empty'\]"
    ):
        run_with(write_dataset(tmp_path, [ALPACA_OK]), reject=["empty"])
