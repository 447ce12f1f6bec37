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
    lora = gpu_check.Row("train", "0.5B", "lora r8 · fa2", 4096, 123456.7, 0.25, 31.25, 12.0)
    lora.details = {"finetuning_type": "lora"}
    full = gpu_check.Row("train", "0.5B", "full · sdpa", 2048, 1000.0, 0.5, 1.0, 3.0, note="a | b")
    full.details = {"finetuning_type": "full"}
    assert gpu_check.cells(lora) == [
        "train", "0.5B", "lora r8 · fa2", "4096", "123,457", "25.0% (6N: full-SFT convention)", "31.2", "12.0", "ok",
    ]  # fmt: skip
    assert gpu_check.cells(full)[5:] == ["50.0%", "1.0", "3.0", "ok: a \\| b"]
    assert gpu_check.table([lora, full]).splitlines()[0] == (
        "| section | model | mode | seq len | tokens/s | MFU | peak GPU GB | seconds | status |"
    )


@pytest.mark.slow  # ~70 s on 2 cores: two run_sft calls per mode, a merge and an evaluation
def test_cpu_smoke_runs_every_section(tmp_path, embedded_dir):
    out = tmp_path / "out.json"
    command = [sys.executable, str(SCRIPT), "--cpu-smoke", "--json", str(out), "--work", str(tmp_path / "work")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)  # the cache comes via the env
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["table"] in proc.stdout and "Card: none (CPU" in proc.stdout
    rows = report["rows"]
    assert [(r["section"], r["model"], r["mode"], r["seq_len"], r["status"]) for r in rows] == [
        ("pytest -m gpu", "-", "-", None, "skipped"),
        ("build", "tiny", "random init, float32", None, "ok"),
        ("train", "embedded:tiny-qwen2.5", "lora r8 · sdpa", 256, "ok"),
        ("train", "embedded:tiny-qwen2.5", "full · sdpa", 256, "ok"),
        ("merge", "embedded:tiny-qwen2.5", "lora r8 -> export_device cpu", None, "ok"),
        ("evaluate", "embedded:tiny-qwen2.5", "merged model on cpu", None, "ok"),
    ]
    pytest_row, build, lora, full, merge, evaluate = rows
    assert pytest_row["note"] == "--cpu-smoke"
    assert build["details"]["parameters"] == TINY_PARAMETERS  # the builder makes the embedded model's shape
    for row in (lora, full):
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
