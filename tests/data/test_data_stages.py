"""The streamed data stages: chunked and multi-process output equals one process and the in-memory template;
JSON arrays read a window at a time; stage outputs stored, reused when their inputs are unchanged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import base_model_of, ingest, tokenize, validate

import qwen_pipeline.data.sources as sources
from qwen_pipeline.conversation import Conversation
from qwen_pipeline.datasets import DatasetInfoDataset, StageDataset
from qwen_pipeline.errors import DataSourceError
from qwen_pipeline.pipelines.format.nodes import tokenize_conversations
from qwen_pipeline.pipelines.ingest.nodes import ingest_datasets
from qwen_pipeline.pipelines.validate.nodes import validate_conversations
from qwen_pipeline.template import TemplateOptions, encode_conversations

PARITY = Path(__file__).parents[1] / "fixtures" / "parity"
DEMO = Path(__file__).parents[2] / "data" / "01_raw"
NAMES = ["alpaca_parity", "sharegpt_parity", "openai_parity"]


def stages(info: Path, names: list[str], format_params: dict, **processing):
    """ingest -> validate -> format in memory; every output, as Python values."""
    raw = DatasetInfoDataset(filepath=str(info)).load()
    records, ingest_report = ingest(raw, {"dataset": names}, **processing)
    kept, rejected, report, _ = validate(records, {"max_rejected_share": 1.0}, **processing)
    splits, format_report, dropped = tokenize(kept, format_params, **processing)
    ids = {name: [list(x) for x in split["input_ids"]] for name, split in splits.items()}
    labels = {name: [list(x) for x in split["labels"]] for name, split in splits.items()}
    return records, kept, rejected, report, ids, labels, format_report, dropped


@pytest.mark.slow  # a pool of two forked processes per stage
@pytest.mark.parametrize("info,names", [(PARITY / "dataset_info.json", NAMES), (DEMO / "dataset_info.json", None)])
def test_two_processes_in_small_chunks_give_the_output_of_one(info, names, embedded_dir):
    names = names or ["alpaca_demo", "sharegpt_demo"]
    params = {"cutoff_len": 64, "val_size": 0.2, "overlength": "drop"}
    one = stages(info, names, params, num_proc=1, batch_size=1000)
    two = stages(info, names, params, num_proc=2, batch_size=7)
    for a, b in zip(one, two):
        assert a == b
    records, kept, rejected, report, ids, labels, format_report, dropped = one
    assert len(records) == len(kept) + len(rejected) and report["read"] == len(records)
    assert format_report["examples"] + len(dropped) == len(kept) and dropped  # some over 64 tokens
    assert len(ids["validation"]) == format_report["splits"]["validation"] > 0


@pytest.mark.slow  # a pool of two forked processes
@pytest.mark.parametrize("setting", [{}, {"cutoff_len": 64}, {"train_on_prompt": True}, {"mask_history": True}])
def test_streamed_format_equals_the_template_on_the_whole_list(setting, tokenizer):
    """The chunked stage writes, in order, exactly what encoding the whole list in memory gives."""
    raw = DatasetInfoDataset(filepath=str(PARITY / "dataset_info.json")).load()
    kept, _, _, _ = validate(ingest(raw, {"dataset": NAMES})[0], {})
    splits, _, _ = tokenize(kept, {**setting, "val_size": 0}, num_proc=2, batch_size=5)
    expected = encode_conversations(
        [Conversation.from_dict(c) for c in kept], tokenizer, TemplateOptions(**{"cutoff_len": 2048, **setting})
    )
    assert [list(x) for x in splits["train"]["input_ids"]] == [e.input_ids for e in expected]
    assert [list(x) for x in splits["train"]["labels"]] == [e.labels for e in expected]


def test_validation_split_is_the_permutation_datasets_draws(tokenizer):
    from datasets import Dataset

    raw = DatasetInfoDataset(filepath=str(DEMO / "dataset_info.json")).load()
    kept, _, _, _ = validate(ingest(raw, {"dataset": ["alpaca_demo"]})[0], {})
    splits, _, _ = tokenize(kept, {"val_size": 0.25, "seed": 7})
    everything, _, _ = tokenize(kept, {})
    reference = Dataset.from_dict({"i": list(range(len(kept)))}).train_test_split(test_size=0.25, seed=7)
    all_ids = [list(x) for x in everything["train"]["input_ids"]]
    assert [list(x) for x in splits["train"]["input_ids"]] == [all_ids[i] for i in reference["train"]["i"]]
    assert [list(x) for x in splits["validation"]["input_ids"]] == [all_ids[i] for i in reference["test"]["i"]]


# --- JSON arrays, a window at a time -----------------------------------------------------------


def records_of(path: Path) -> list:
    return [json.loads(text) if error is None else error for text, error in sources.json_records(path)]


TRICKY = [
    {"instruction": "brackets ] [ and braces } { in a string", "output": "x"},
    {"instruction": 'escaped \\" quote and \\\\ backslash', "output": "y", "n": 123456789},
    {"instruction": "unicode 中文 \u2028 line separator", "output": "", "history": [["a", "b"]]},
    [1, 2, 3],
    12345678901234567890,
    "a string record",
    None,
]


@pytest.mark.parametrize("window", [1, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_items_across_window_edges(tmp_path, monkeypatch, window, indent):
    monkeypatch.setattr(sources, "READ_CHARS", window)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(TRICKY, indent=indent, ensure_ascii=False))
    assert records_of(path) == TRICKY
    path.write_text("  [ ]  ")
    assert records_of(path) == []


@pytest.mark.parametrize("window", [2, 1 << 20])
def test_json_array_errors_name_the_line(tmp_path, monkeypatch, window):
    monkeypatch.setattr(sources, "READ_CHARS", window)
    path = tmp_path / "rows.json"
    path.write_text('[\n {"instruction": "q",\n  "output": "a"},\n {"x": 1,\n  oops\n]')
    with pytest.raises(DataSourceError, match=r"rows.json: invalid JSON at line 5: Expecting property name"):
        records_of(path)
    path.write_text('[{"a": 1}\n {"b": 2}]')
    with pytest.raises(DataSourceError, match=r"invalid JSON at line 2: Expecting ',' delimiter"):
        records_of(path)
    path.write_text('[{"a": 1}] x')
    with pytest.raises(DataSourceError, match=r"invalid JSON at line 1: Extra data"):
        records_of(path)
    path.write_text('{\n "a": 1\n}')  # one object, not a list (and not JSON Lines either)
    with pytest.raises(DataSourceError, match=r"expected a JSON list of records, got dict"):
        records_of(path)


def test_json_lines_saved_as_json_are_read_as_lines(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert records_of(path) == [{"a": 1}, {"b": 2}]


# --- stage outputs on disk, and reruns ----------------------------------------------------------


def run_stages(root: Path, info: Path, overrides: dict | None = None) -> dict:
    """The three nodes through their catalog datasets in ``root``, as ``kedro run`` chains them."""
    overrides = overrides or {}
    outputs, previous_stage = {}, None
    raw = DatasetInfoDataset(filepath=str(info)).load()
    processing = {"num_proc": 1, **overrides.get("processing", {})}
    for stage, node, upstream, args in [
        ("raw", ingest_datasets, raw, ({"dataset": ["alpaca_demo", "sharegpt_demo"]},)),
        ("conversations", validate_conversations, None, ({},)),
        ("sft", tokenize_conversations, None, (base_model_of(), {"val_size": 0.1})),
    ]:
        if stage == "sft" and "format" in overrides:
            args = (args[0], {**args[1], **overrides["format"]})
        data = upstream if upstream is not None else StageDataset(path=str(root / previous_stage)).load()
        previous = StageDataset(path=str(root / stage), previous=True).load()
        result = node(data, previous, *args, processing)
        StageDataset(path=str(root / stage)).save(result[0])
        outputs[stage] = result
        previous_stage = stage
    return outputs


def reused(outputs: dict) -> list[bool]:
    reports = [outputs["raw"][1], outputs["conversations"][2], outputs["sft"][1]]
    return [report["reused"] for report in reports]


def test_a_rerun_with_unchanged_inputs_reuses_every_stage(tmp_path, monkeypatch, caplog, embedded_dir):
    import shutil

    data = tmp_path / "raw"
    shutil.copytree(DEMO, data)
    cold = run_stages(tmp_path / "out", data / "dataset_info.json")
    assert reused(cold) == [False, False, False]
    sft = StageDataset(path=str(tmp_path / "out" / "sft")).load()
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.arrow")}

    import qwen_pipeline.data.streaming as streaming

    real_map = streaming.map_stage
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[4].path.name.split("-")[1])  # the stage of the staging folder: qwen-<stage>-...
        return real_map(*args, **kwargs)

    for module in ("ingest", "validate", "format"):
        monkeypatch.setattr(f"qwen_pipeline.pipelines.{module}.nodes.map_stage", counted)
    with caplog.at_level(logging.INFO):
        warm = run_stages(tmp_path / "out", data / "dataset_info.json")
    assert reused(warm) == [True, True, True] and calls == []
    assert "Ingest: datasets and parameters unchanged, reusing 362 records" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.arrow")} == stamp  # nothing rewritten
    again = StageDataset(path=str(tmp_path / "out" / "sft")).load()
    assert [list(x) for x in again.data["train"]["input_ids"]] == [list(x) for x in sft.data["train"]["input_ids"]]
    assert warm["conversations"][1] == cold["conversations"][1]  # the rejected records, handed back
    assert {k: v for k, v in warm["sft"][1].items() if k != "reused"} == {
        k: v for k, v in cold["sft"][1].items() if k != "reused"
    }

    # A changed format parameter redoes format only; changed data redoes everything.
    calls.clear()
    assert reused(run_stages(tmp_path / "out", data / "dataset_info.json", {"format": {"cutoff_len": 64}})) == [
        True,
        True,
        False,
    ]
    assert calls == ["format"]
    records = json.loads((data / "alpaca_demo.json").read_text())
    (data / "alpaca_demo.json").write_text(json.dumps(records[:-1]))
    changed = run_stages(tmp_path / "out", data / "dataset_info.json")
    assert reused(changed) == [False, False, False] and calls == ["format", "ingest", "ingest", "validate", "format"]
    assert changed["conversations"][2]["read"] == 361
    forced = run_stages(tmp_path / "out", data / "dataset_info.json", {"processing": {"overwrite_cache": True}})
    assert reused(forced) == [False, False, False]


def test_stage_dataset_keeps_split_order_as_indices_and_replaces_atomically(tmp_path, monkeypatch):
    from datasets import Dataset, DatasetDict

    from qwen_pipeline.datasets import StageOutput

    base = Dataset.from_dict({"x": list(range(10))})
    data = DatasetDict({"train": base.select([3, 1, 4, 5, 9, 2, 6]), "validation": base.select([8, 0, 7])})
    target = StageDataset(path=str(tmp_path / "stage"))
    target.save(StageOutput(data, "fp1", {"report": {"n": 1}, "dropped": [1, 2]}))
    loaded = target.load()
    assert loaded.data["train"]["x"] == [3, 1, 4, 5, 9, 2, 6] and loaded.data["validation"]["x"] == [8, 0, 7]
    assert loaded.fingerprint == "fp1" and loaded.outputs == {"report": {"n": 1}, "dropped": [1, 2]}
    previous = StageDataset(path=str(tmp_path / "stage"), previous=True).load()
    assert (previous.fingerprint, previous.outputs) == ("fp1", {"report": {"n": 1}, "dropped": [1, 2]})
    assert StageDataset(path=str(tmp_path / "none"), previous=True).load() is None

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("qwen_pipeline.datasets.stage.write_rows", broken)
    with pytest.raises(KeyboardInterrupt):
        target.save(StageOutput(Dataset.from_dict({"x": [42]}), "fp2"))
    assert target.load().data["train"]["x"] == [3, 1, 4, 5, 9, 2, 6]  # the earlier output, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]  # no partial folder left


def test_a_stale_stage_output_is_refused_until_saved_again(tmp_path):
    from datasets import Dataset

    from qwen_pipeline.datasets import StageOutput
    from qwen_pipeline.errors import DataSourceError

    target = StageDataset(path=str(tmp_path / "stage"))
    assert target.mark_stale("no output yet") is False  # nothing to mark
    output = StageOutput(Dataset.from_dict({"x": [1, 2]}), "fp1")
    target.save(output)
    assert target.mark_stale("the last run stopped in validate") is True
    assert target.mark_stale("a later failure") is False and not target.exists()  # first reason kept; missing
    with pytest.raises(DataSourceError, match=r"stage is an earlier run's output, not current: the last run stopped"):
        target.load()
    assert StageDataset(path=str(tmp_path / "stage"), previous=True).load() is None  # never reused
    target.save(StageOutput(Dataset.from_dict({"x": [1, 2]}), "fp1"))  # remade by the next run
    assert target.load().data["x"] == [1, 2] and not (tmp_path / "stage" / "stale.json").exists()


def test_a_failed_run_marks_the_stage_outputs_it_did_not_save(tmp_path):
    """Whatever broke the run (a node, a load, a save), the outputs it saved stay current, the others are stale."""
    from datasets import Dataset
    from kedro.io import DataCatalog
    from kedro.pipeline import Node, Pipeline

    from qwen_pipeline.datasets import StageOutput
    from qwen_pipeline.stale import StaleOutputsHook

    catalog = DataCatalog({name: StageDataset(path=str(tmp_path / name)) for name in ("a", "b", "c")})
    for name in ("a", "b", "c"):
        catalog.save(name, StageOutput(Dataset.from_dict({"x": [1]}), name))
    pipeline = Pipeline([Node(len, "raw", "a", name="first"), Node(len, "a", ["b", "c"], name="second")])
    hook = StaleOutputsHook()
    hook.before_pipeline_run({}, pipeline, catalog)
    hook.after_dataset_saved("a", None, pipeline.nodes[0])
    hook.after_dataset_saved("b", None, pipeline.nodes[1])  # then saving "c" broke off
    hook.on_pipeline_error(OSError("No space left on device. Really."), {}, pipeline, catalog)
    assert [(tmp_path / name / "stale.json").is_file() for name in ("a", "b", "c")] == [False, False, True]
    stale = json.loads((tmp_path / "c" / "stale.json").read_text())
    assert stale == {"reason": "the last run stopped before remaking it (No space left on device)"}


def test_interleaved_mix_is_what_datasets_interleaves(tmp_path):
    from datasets import Dataset, interleave_datasets

    rows = lambda p: [{"instruction": f"{p}{i}", "output": "a"} for i in range(n[p])]  # noqa: E731
    n = {"a": 9, "b": 4}
    for name in n:
        (tmp_path / f"{name}.json").write_text(json.dumps(rows(name)))
    (tmp_path / "dataset_info.json").write_text(json.dumps({name: {"file_name": f"{name}.json"} for name in n}))
    raw = DatasetInfoDataset(filepath=str(tmp_path / "dataset_info.json")).load()
    for strategy, stopping in [("interleave_under", "first_exhausted"), ("interleave_over", "all_exhausted")]:
        records, report = ingest(
            raw, {"dataset": ["a", "b"], "mix_strategy": strategy, "interleave_probs": [0.3, 0.7], "seed": 3}
        )
        expected = interleave_datasets(
            [Dataset.from_dict({"p": [f"{p}{i}" for i in range(n[p])]}) for p in n],
            probabilities=[0.3, 0.7],
            seed=3,
            stopping_strategy=stopping,
        )["p"]
        assert [r["messages"][0]["content"] for r in records] == list(expected)
        counts = np.unique([r["dataset"] for r in records], return_counts=True)
        assert {d: report["datasets"][d]["in_mix"] for d in n} == dict(zip(*(list(c) for c in counts)))


def test_an_error_in_a_worker_process_is_raised_in_the_stage(tmp_path):
    import multiprocessing

    import pyarrow as pa
    from datasets import Dataset

    from qwen_pipeline.data.streaming import parallel_map
    from qwen_pipeline.errors import DataError

    def fn(chunk: pa.Table, offset: int):
        if offset >= 4:  # the second process's range
            raise DataError(f"record {offset}: bad")
        return chunk, offset

    rows = Dataset.from_dict({"x": list(range(8))})
    schema = pa.schema([("x", pa.int64())])
    with pytest.raises(DataError, match="^record 4: bad$"):
        parallel_map(rows, fn, schema=schema, out=tmp_path / "out", num_proc=2, batch_size=4)
    assert multiprocessing.active_children() == []  # none left running
    done, results = parallel_map(
        rows, lambda c, o: (c, o), schema=schema, out=tmp_path / "ok", num_proc=2, batch_size=4
    )
    assert done["x"] == list(range(8)) and results == [0, 4]


def test_a_stage_output_moves_its_staged_files_and_its_staging_folder_goes_with_it(tmp_path):
    import gc

    import pyarrow as pa
    from datasets import Dataset

    from qwen_pipeline.data.streaming import Staging, map_stage, table_files
    from qwen_pipeline.datasets import StageOutput

    class Work:
        processes, batch_size = 1, 2

    staging = Staging("test")
    rows, _ = map_stage(Dataset.from_dict({"x": [1, 2, 3]}), lambda c, o: (c, o), pa.schema([("x", pa.int64())]),
                        Work, staging)  # fmt: skip
    (staged,) = table_files(rows.data)
    assert staging.holds(staged)
    StageDataset(path=str(tmp_path / "stage")).save(StageOutput(rows, "fp", staging=staging))
    stored = StageDataset(path=str(tmp_path / "stage")).load()
    assert stored.data["x"] == [1, 2, 3] and sorted(p.name for p in (tmp_path / "stage").iterdir()) == [
        "data-00000.arrow",
        "outputs.json",
        "stage.json",
    ]
    assert not Path(staged).exists()  # moved, not copied
    folder = staging.path
    del staging, rows
    gc.collect()
    assert not folder.exists()  # the staging folder is removed with the object that held it
