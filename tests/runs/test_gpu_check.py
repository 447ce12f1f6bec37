"""benchmarks/gpu_check.py: its --cpu-smoke run goes through every section on the embedded model, and a
failing or overlong section becomes a row of the table instead of ending the run."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time

import pytest
from helpers import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "gpu_check.py"
TINY_PARAMETERS = 9_847_360  # the embedded model's shape: 151,936 x 64 tied embedding + 2 small layers


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def test_a_failing_section_becomes_an_error_row(gpu_check):
    row = gpu_check.run_row(gpu_check.Row("merge", "0.5B"), 30, lambda r: 1 / 0)
    assert row.status == "error" and row.note == "ZeroDivisionError: division by zero"
    assert row.seconds is not None and row.seconds < 30


def test_an_overlong_section_is_cut_at_its_limit(gpu_check):
    started = time.monotonic()
    row = gpu_check.run_row(gpu_check.Row("train", "1.5B"), 1.0, lambda r: time.sleep(30), min_s=0)
    assert row.status == "error" and row.note == "TimeoutError: over its 1 s limit"
    assert time.monotonic() - started < 5


def test_no_time_left_skips_the_row(gpu_check):
    row = gpu_check.run_row(gpu_check.Row("evaluate"), 2.0, lambda r: pytest.fail("must not run"))
    assert (row.status, row.note) == ("skipped", "time budget spent")


def test_table_cells(gpu_check):
    lora = gpu_check.Row("train", "0.5B", "lora r8 · fa2", 4096, 123456.7, 0.25, 31.25, 12.0, trains=True, plan_gb=25.0)
    lora.details = {"finetuning_type": "lora"}
    full = gpu_check.Row("train", "0.5B", "full · sdpa", 2048, 1000.0, 0.5, 1.0, 3.0, note="a | b", trains=True)
    full.details = {"finetuning_type": "full"}
    merge = gpu_check.Row("merge", "1.5B", "lora r8 -> export_device cuda", seconds=4.0, peak_gpu_gb=3.0)
    assert gpu_check.cells(lora) == [
        "train", "0.5B", "lora r8 · fa2", "4096", "123,457", "25.0% (6N: full-SFT convention)", "31.2", "25.0", "0.80",
        "12.0", "ok",
    ]  # fmt: skip
    assert gpu_check.cells(full)[5:] == ["50.0%", "1.0", "n/a", "n/a", "3.0", "ok: a \\| b"]  # no plan: n/a
    assert gpu_check.cells(merge)[4:] == ["-", "-", "3.0", "-", "-", "4.0", "ok"]  # a row that never has a plan
    assert gpu_check.table([lora, full]).splitlines()[0] == (
        "| section | model | mode | seq len | tokens/s | MFU | peak GPU GB | plan GB | plan/peak | seconds | status |"
    )


def test_without_the_memory_plan_module_the_plan_columns_say_n_a(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check, "memory_planner", lambda: "qwen_pipeline.training.memory does not import: X")
    row = gpu_check.Row("qlora", "0.5B", peak_gpu_gb=2.0, trains=True)
    gpu_check.add_memory_plan(row, "embedded:tiny-qwen2.5", None, None)
    assert row.plan_gb is None and row.details == {"plan": "n/a: qwen_pipeline.training.memory does not import: X"}
    assert gpu_check.cells(row)[7:9] == ["n/a", "n/a"]


def test_examples_are_found_in_a_packed_batch_and_the_control_runs_positions_on(gpu_check):
    """The contamination check's bookkeeping on FlashAttention-2's one-row layout (built on the CPU): each example
    at its place, and the control with one attention segment over the whole row."""
    import torch
    from datasets import Dataset

    from qwen_pipeline.training.packing import FlatCollator

    examples = Dataset.from_dict(
        {"input_ids": [[5, 6, 7], [8, 9], [5, 6, 7, 1]], "labels": [[-100, 6, 7], [8, 9], [5] * 4]}
    )
    batch = FlatCollator(attention="flash_attention_2")(
        [{"input_ids": i, "labels": label} for i, label in zip(examples["input_ids"], examples["labels"])]
    )
    assert gpu_check.example_segments(batch, examples) == [(0, 0, 0, 3), (1, 0, 3, 5), (2, 0, 5, 9)]
    control = gpu_check.running_on(batch)
    assert control["position_ids"].tolist() == [list(range(9))]
    assert control["cu_seq_lens_q"].tolist() == [0, 9] and control["max_length_k"] == 9
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]  # the batch itself is untouched
    with pytest.raises(RuntimeError, match="1 of 4 examples are not whole segments"):
        gpu_check.example_segments(batch, Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9], [5, 6, 7, 1], [4]]}))
    rows = FlatCollator(attention="sdpa")(
        [{"input_ids": [1, 2, 3, 4], "labels": [1] * 4}, {"input_ids": [7], "labels": [7]}]
    )
    assert gpu_check.running_on(rows)["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert "cu_seq_lens_q" not in gpu_check.running_on(rows) and torch.equal(
        rows["input_ids"][1], torch.tensor([7, 0, 0, 0])
    )


@pytest.mark.slow  # ~120 s on 2 busy cores (~80 s CPU): seven run_sft, two packed-vs-alone checks, merge, evaluate
def test_cpu_smoke_runs_every_section(tmp_path, embedded_dir):
    out = tmp_path / "out.json"
    command = [sys.executable, str(SCRIPT), "--cpu-smoke", "--json", str(out), "--work", str(tmp_path / "work")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)  # the cache comes via the env
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["table"] in proc.stdout and "Card: none (CPU" in proc.stdout
    rows = report["rows"]
    tiny = "embedded:tiny-qwen2.5"
    assert [(r["section"], r["model"], r["mode"], r["status"]) for r in rows] == [
        ("pytest -m gpu", "-", "-", "skipped"),
        ("build", "tiny", "random init, float32", "ok"),
        ("contamination", tiny, "neat_packing · sdpa", "ok"),
        ("contamination", tiny, "padding_free · sdpa", "ok"),
        ("contamination", tiny, "neat_packing · fa2", "skipped"),
        ("contamination", tiny, "padding_free · fa2", "skipped"),
        ("fp32 master", tiny, "full · bf16 · lr 1e-5 · sdpa", "ok"),
        ("qlora", tiny, "lora r8 on nf4 · sdpa", "ok"),
        ("eval memory", tiny, "eval_loss 4 x 256", "ok"),
        ("train", tiny, "lora r8 · sdpa", "ok"),
        ("zero3", tiny, "lora r8 · zero3.json, 1 process · sdpa", "ok"),
        ("merge", tiny, "lora r8 -> export_device cpu", "ok"),
        ("evaluate", tiny, "merged model on cpu", "ok"),
    ]
    pytest_row, build, neat, padding_free, fa2, _, fp32, qlora, memory, lora, zero3, merge, evaluate = rows
    assert pytest_row["note"] == "--cpu-smoke" and fa2["note"] == "needs CUDA"
    assert build["details"]["parameters"] == TINY_PARAMETERS  # the builder makes the embedded model's shape

    for row in (neat, padding_free):  # the same 8 examples packed and alone, float32 on the CPU
        found = row["details"]
        assert (found["examples"], found["dtype"]) == (8, "float32")
        assert found["tolerance"] == {"loss": 1e-5, "hidden": 1e-3}
        assert found["labelled_packed"] == found["labelled_alone"] > 0
        assert found["max_example_loss_rel_diff"] < 1e-5 and found["sum_rel_diff"] < 1e-5
        assert found["max_example_hidden_rel_diff"] < 1e-5
        assert found["control_max_example_hidden_rel_diff"] > 1e-2  # running positions on is seen
        assert found["most_examples_in_a_row"] >= 2 and row["tokens_per_s"] > 0
    assert neat["details"]["rows"] == neat["details"]["bins"] < 8 and neat["seq_len"] <= 2 * 384
    assert padding_free["details"]["rows"] < 8

    # bf16 mixed precision, one full-SFT step at lr 1e-5
    check = fp32["details"]
    assert check["optimizer"] == "AdamW" and check["trainable_dtypes"] == check["optimizer_state_dtypes"] == ["float32"]
    assert check["parameters_with_state"] == check["trainable_tensors"] == 26  # every tensor of the tiny model
    assert check["forward_dtypes"] == {"down_proj": ["bfloat16"], "lm_head": ["bfloat16"]}
    assert check["changed_share"] > 0.99 and check["changed_share_if_bf16"] < 0.5
    assert check["steps"] == 1 and len(check["losses"]) == 1

    assert qlora["details"]["quantization_bit"] == 4 and math.isfinite(qlora["details"]["last_loss"])
    assert (zero3["details"]["steps"], zero3["details"]["zero_stage"], zero3["details"]["left_behind"]) == (2, 3, [])
    assert len(zero3["details"]["losses"]) == 2 and all(math.isfinite(x) for x in zero3["details"]["losses"])
    for row in (fp32, qlora, lora, zero3):  # the memory plan beside each training row; no GPU peak to divide by
        assert row["plan_gb"] > 0 and row["peak_gpu_gb"] is None and row["details"]["plan_over_peak"] is None
        assert set(row["details"]["plan"]) == {
            "weights", "gradients", "optimizer_states", "activations", "loss_chunk", "overhead", "fits"
        }  # fmt: skip

    found = memory["details"]
    assert (found["batch"], found["eval_tokens"], found["peak_gb"]) == ([4, 256], 4 * 128, None)
    assert found["rel_diff"] < 1e-6 and found["full_logits_gb"] == round(4 * 256 * 151936 * 8 / 2**30, 2)

    for row in (lora, qlora):
        details = row["details"]
        assert row["tokens_per_s"] > 0 and row["mfu"] is None and row["peak_gpu_gb"] is None  # no GPU, no peak
        assert details["parameters"] == TINY_PARAMETERS
        assert (details["warmup_steps"], details["measured_steps"], details["bins_per_step"]) == (1, 2, 2)
        # steps 2 and 3 read bins 3..6, each at most 256 tokens
        assert 0 < details["measured_tokens"] <= 4 * 256
        assert row["tokens_per_s"] == pytest.approx(details["measured_tokens"] / details["measured_seconds"], rel=2e-3)
        assert math.isfinite(details["first_loss"]) and math.isfinite(details["last_loss"])
    check = merge["details"]
    assert check["passed"] and 0 < check["max_abs_logit_diff"] <= check["tolerance"] < 0.1
    assert (check["export_dtype"], check["export_device"], check["top1_agreement"]) == ("float32", "cpu", 1.0)
    result = evaluate["details"]
    assert math.isfinite(result["eval_loss"]) and result["eval_tokens"] > 0
    assert result["perplexity"] == pytest.approx(math.exp(result["eval_loss"]))
    assert (result["examples"], result["generated"], result["device"]) == (4, 2, "cpu")
