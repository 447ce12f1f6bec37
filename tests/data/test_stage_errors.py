"""Bad input that stops `kedro run --pipelines ingest,validate`: the message the CLI prints (``Error: <message>``,
the user error found in what the node raised) names the file, record or key.

The stages run here on the shipped parameters, as `kedro run` runs them; tests/runs/test_cli_errors.py shows
the CLI printing one of these end to end.
"""

from __future__ import annotations

import json

import pytest
from helpers import PROJECT_ROOT, conversation_rows, ingest
from kedro.config import OmegaConfigLoader

from qwen_pipeline.datasets import DatasetInfoDataset
from qwen_pipeline.errors import user_error
from qwen_pipeline.pipelines.validate.nodes import accept_conversations, validate_conversations
from qwen_pipeline.settings import CONFIG_LOADER_ARGS

PARAMS = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), **CONFIG_LOADER_ARGS)["parameters"]
GOOD = {"instruction": "q", "input": "", "output": "a"}
INFO = {"alpaca_demo": {"file_name": "a.json"}, "sharegpt_demo": {"file_name": "b.json", "formatting": "sharegpt"}}


def raw_data(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return DatasetInfoDataset(filepath=str(tmp_path / "dataset_info.json")).load()


def message(error: pytest.ExceptionInfo) -> str:
    """What the CLI prints after ``Error: ``."""
    found = user_error(error.value)
    assert found is not None, f"not a user error: {error.value!r}"
    return str(found)


def test_an_unknown_dataset_names_the_defined_ones(tmp_path):
    raw = raw_data(tmp_path, {"dataset_info.json": json.dumps(INFO), "a.json": json.dumps([GOOD])})
    with pytest.raises(Exception) as error:
        ingest(raw, {**PARAMS["ingest"], "dataset": ["nope"]}, **PARAMS["processing"])
    assert message(error) == (
        f"{tmp_path / 'dataset_info.json'}: no dataset named 'nope'; it defines 'alpaca_demo', 'sharegpt_demo'"
    )


def test_a_broken_data_file_names_the_file_and_line(tmp_path):
    files = {"dataset_info.json": json.dumps(INFO), "a.json": '[\n {"instruction": "q",\n  oops\n]', "b.json": "[]"}
    raw = raw_data(tmp_path, files)
    with pytest.raises(Exception) as error:
        ingest(raw, PARAMS["ingest"], **PARAMS["processing"])
    assert message(error) == (
        f"{tmp_path / 'a.json'}: invalid JSON at line 3: Expecting property name enclosed in double quotes"
    )


def test_a_broken_dataset_info_names_the_line(tmp_path):
    with pytest.raises(Exception) as error:
        raw_data(tmp_path, {"dataset_info.json": '{"alpaca_demo": }'})
    assert message(error) == f"{tmp_path / 'dataset_info.json'}: invalid JSON at line 1: Expecting value"


def test_too_many_rejected_records_stop_the_run_after_the_report(tmp_path):
    files = {
        "dataset_info.json": json.dumps(INFO),
        "a.json": json.dumps([GOOD, {"instruction": "x"}, {"output": 3}, {"instruction": "y"}]),
        "b.json": json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]),
    }
    records, _ = ingest(raw_data(tmp_path, files), PARAMS["ingest"], **PARAMS["processing"])
    validated, rejected, report, _ = validate_conversations(
        conversation_rows(records), None, PARAMS["validate"], PARAMS["processing"]
    )
    assert [(r["file"], r["index"]) for r in rejected] == [("a.json", 1), ("a.json", 2), ("a.json", 3)]
    assert (report["read"], report["kept"], report["rejected"], report["accepted"]) == (5, 2, 3, False)
    with pytest.raises(Exception) as error:
        accept_conversations(validated, PARAMS["validate"])
    assert message(error) == (
        "3 of 5 records rejected (60%), more than validate.max_rejected_share=0.5. Top reasons: "
        "2 x missing column 'output'; 1 x column 'output': expected a string, got int. "
        "First rejected: dataset 'alpaca_demo' (a.json record 1, a.json record 2, a.json record 3). "
        "Every record and its reason: the rejected_records dataset (data/08_reporting/rejected_records.json), "
        "counts in the validation report."
    )
