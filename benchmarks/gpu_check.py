"""GPU check: training throughput, merge and evaluate on CUDA, and the GPU tests, in one time-bounded run.

Made for a GPU lent for a few minutes with no network (an H100/H200): nothing is downloaded. Qwen2.5-0.5B-
and 1.5B-shaped models (the real shapes and 151,936-token vocabulary, tied embeddings, random weights) are
built on the spot and saved with the real Qwen2.5 tokenizer the project builds offline, so every loader of
the project takes their folders as ``model_name_or_path``. Sections, each one bounded in time; a failing
one puts its error in the table and the run goes on:

- pytest: ``pytest -m gpu`` in a child process (first, so the training section can use what it leaves);
- build: the models above, initialised on the GPU, saved in bf16;
- train: ``run_sft`` (the train stage's recipe) for LoRA r8 and full SFT, bf16, sdpa (and FlashAttention-2
  when ``flash_attn`` imports), synthetic conversations through the qwen template, packed to 2048 and 4096
  tokens (``train.packing``), 16,384 tokens per optimizer step. tokens/s is steady state: each row runs
  ``run_sft`` twice, W and W+N steps, over the same bins in the same order, and divides the tokens of the
  last N steps by the difference of the two ``train_runtime_s`` (model loading, Trainer set-up and the
  first steps cancel out). MFU = 6 * N_params * tokens/s / the card's dense bf16 peak (989 TFLOP/s for
  H100/H200 SXM); N_params counts the tied embedding once; attention FLOPs are left out (so MFU reads low
  at 4096), and the output layer only runs where a label is learned (FlatCollator's logits_to_keep). For
  LoRA rows 6N is the full-SFT convention (a LoRA step does less work): comparable across rows, not a
  utilisation. Peak GPU GB is ``torch.cuda.max_memory_allocated`` of the W+N run;
- merge: the merge stage's nodes with ``export_device: cuda`` on the largest model's LoRA adapter trained
  above; its check's max |logit diff| (merged vs base+adapter) against the check's tolerance;
- evaluate: the evaluate stage's node on the merged model on CUDA: eval loss / perplexity over a small
  synthetic validation split, and a few greedy generations.

At the end: one markdown table (section, model, mode, seq len, tokens/s, MFU, peak GPU GB, seconds, status),
the card (``torch.cuda.get_device_name()``, ``nvidia-smi``) and versions; ``--json PATH`` writes it too.
The default budget (``--budget-s 450``) keeps the whole run under 8 minutes; rows that would not fit are
listed as skipped.

    python benchmarks/gpu_check.py --json gpu_check.json
    python benchmarks/gpu_check.py --cpu-smoke          # the same code paths on the embedded tiny model, CPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import io
import itertools
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
VOCAB = 151936
# Real Qwen2.5 shapes (config.json of Qwen/Qwen2.5-0.5B and -1.5B) and their parameter counts (tied embedding
# counted once); "tiny" is the embedded model's shape, built by --cpu-smoke to exercise the same builder.
SHAPES: dict[str, dict[str, int]] = {
    "0.5B": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14},
    "1.5B": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12},
    "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
}
EXPECTED_PARAMETERS = {"0.5B": 494_032_768, "1.5B": 1_543_714_304}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, SXM; override with --peak-tflops
LORA_RANK = 8
# Time limits (seconds): a row is cut at its limit; training stops early enough to leave merge and evaluate theirs.
PYTEST_LIMIT_S, BUILD_LIMIT_S, TRAIN_ROW_LIMIT_S, MERGE_LIMIT_S, EVALUATE_LIMIT_S = 180.0, 120.0, 150.0, 75.0, 45.0
WORDS = (
    "the model reads each token once and learns to predict the next one from what came before it while a "
    "small adapter changes only a few matrices so memory stays low and the answer keeps its shape across long "
    "packed sequences of questions answers numbers 1 2 3 42 and code like def f(x): return x * 2 in Python"
).split()


@dataclass(frozen=True)
class Plan:
    """What one run does: the GPU check, or its CPU smoke version."""

    smoke: bool
    device: str  # "cuda" or "cpu"
    models: tuple[str, ...]  # SHAPES to build
    train_models: tuple[str, ...]  # what trains: built SHAPES names, or the embedded model's name
    modes: tuple[str, ...]  # finetuning_type
    pack_lengths: tuple[int, ...]
    attentions: tuple[str, ...]  # train.flash_attn values
    warmup_steps: int  # W: steps both runs share (their cost cancels)
    steps: int  # N: measured optimizer steps
    tokens_per_micro_batch: int  # bins per micro-batch = this // pack length
    accumulation: int  # gradient_accumulation_steps
    bf16: bool
    eval_examples: int
    eval_generations: int
    max_new_tokens: int
    budget_s: float  # the whole run, from start to table

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def make_plan(args: argparse.Namespace, fa2: bool) -> Plan:
    if args.cpu_smoke:
        return Plan(
            smoke=True,
            device="cpu",
            models=("tiny",),
            train_models=("embedded:tiny-qwen2.5",),
            modes=("lora", "full"),
            pack_lengths=(256,),
            attentions=("sdpa",),
            warmup_steps=1,
            steps=2,
            tokens_per_micro_batch=512,
            accumulation=1,
            bf16=False,  # float32 on the CPU: bf16 autocast there is slow and not what the smoke checks
            eval_examples=4,
            eval_generations=2,
            max_new_tokens=8,
            budget_s=args.budget_s,
        )
    return Plan(
        smoke=False,
        device="cuda",
        models=("0.5B", "1.5B"),
        train_models=("0.5B", "1.5B"),
        modes=("lora", "full"),
        pack_lengths=(2048, 4096),
        attentions=("sdpa", "fa2") if fa2 else ("sdpa",),
        warmup_steps=args.warmup_steps,
        steps=args.steps,
        tokens_per_micro_batch=8192,  # 1.5B full SFT stays well under 80 GB without gradient checkpointing
        accumulation=2,
        bf16=True,
        eval_examples=16,
        eval_generations=4,
        max_new_tokens=32,
        budget_s=args.budget_s,
    )


@dataclass
class Row:
    """One line of the table (and of the JSON)."""

    section: str
    model: str = "-"
    mode: str = "-"
    seq_len: int | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None  # a fraction of the peak
    peak_gpu_gb: float | None = None
    seconds: float | None = None
    status: str = "ok"  # ok | failed (ran, wrong result) | error (raised) | skipped
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)


# --- running a section: time-bounded, its failure a row ----------------------------------------------


def remaining(plan: Plan) -> float:
    return plan.budget_s - (time.monotonic() - START)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in this (main) thread after ``seconds``: a stuck step ends its row, not the run."""

    def expire(signum, frame):
        raise TimeoutError(f"over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free_memory() -> None:
    import torch

    gc.collect()  # Trainer and PEFT objects hold the model in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_row(row: Row, limit_s: float, work: Callable[[Row], None], *, min_s: float = 5.0) -> Row:
    """Fill ``row`` with ``work(row)`` within ``limit_s`` seconds; an exception becomes its status. Under
    ``min_s`` left, the row is skipped rather than started to be cut."""
    if limit_s < min_s:
        row.status, row.note = "skipped", "time budget spent"
        return row
    started = time.perf_counter()
    try:
        with time_limit(limit_s):
            work(row)
    except Exception as error:  # noqa: BLE001 - any failure is reported in the table and the run goes on
        traceback.print_exc()
        row.status = "error"
        row.note = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"
    row.seconds = round(time.perf_counter() - started, 2)
    free_memory()
    print(f"[gpu_check {time.monotonic() - START:6.1f} s] {row.section} {row.model} {row.mode}: {cell_status(row)}")
    return row


# --- pytest -m gpu ---------------------------------------------------------------------------------


def pytest_gpu(row: Row, work_dir: Path, limit_s: float) -> None:
    """The GPU-marked tests in a child process; counts from its JUnit XML."""
    import xml.etree.ElementTree as ET

    from qwen_pipeline.models import cache_dir

    report = work_dir / "pytest-gpu.xml"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "QWEN_PIPELINE_TEST_CACHE": str(cache_dir()),  # reuse the embedded model built here
    }
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    proc = subprocess.run(
        [*command, "tests"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(limit_s - 5, 1)
    )
    if not report.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"pytest exited {proc.returncode} without a report: {tail[0]}")
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = counts["failures"] + counts["errors"]
    passed = counts["tests"] - failed - counts["skipped"]
    row.details = {"passed": passed, "failed": failed, "skipped": counts["skipped"], "returncode": proc.returncode}
    row.note = f"{passed} passed, {failed} failed, {counts['skipped']} skipped"
    if failed or passed == 0:
        row.status = "failed"
        print(proc.stdout[-4000:], file=sys.stderr)


# --- build -----------------------------------------------------------------------------------------


def qwen25_config(shape: str, dtype: str):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        bos_token_id=151643,
        eos_token_id=151645,  # <|im_end|>, as in Qwen2.5-Instruct
        dtype=dtype,
        **SHAPES[shape],
    )


def parameter_count(model_name_or_path: str) -> int:
    """Parameters of a model folder, counted on the meta device (nothing allocated; tied weights once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qwen_pipeline.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model_name_or_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def build_model(row: Row, shape: str, out_dir: Path, plan: Plan) -> None:
    """A Qwen2.5-shaped model with random weights (initialised on the device: seconds, not minutes on the
    CPU), saved with the project's offline Qwen2.5 tokenizer; then loaded back with the project's loaders."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from qwen_pipeline.models import EMBEDDED_MODEL, load_tokenizer

    dtype = torch.bfloat16 if plan.bf16 else torch.float32
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = AutoModelForCausalLM.from_config(qwen25_config(shape, str(dtype).removeprefix("torch.")), dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=False
    )
    model.to("cpu").save_pretrained(out_dir, max_shard_size="5GB")
    del model
    load_tokenizer(EMBEDDED_MODEL).save_pretrained(out_dir)
    tokenizer = load_tokenizer(str(out_dir))
    if tokenizer.convert_tokens_to_ids("<|im_end|>") != 151645 or tokenizer.pad_token_id != 151643:
        raise RuntimeError(f"{out_dir}: the saved tokenizer has the wrong special-token ids")
    count = parameter_count(str(out_dir))
    expected = EXPECTED_PARAMETERS.get(shape)
    row.details = {"path": str(out_dir), "parameters": count}
    row.note = f"{count / 1e6:,.1f}M parameters"
    if expected is not None and count != expected:
        row.status, row.note = "failed", f"{count:,} parameters, Qwen2.5-{shape} has {expected:,}"
    if torch.cuda.is_available():
        row.peak_gpu_gb = round(torch.cuda.max_memory_allocated() / 2**30, 2)


# --- data: synthetic conversations through the qwen template -------------------------------------------


def synthetic_conversations(count: int, max_tokens: int, seed: int):
    """Single-turn chats of ~max_tokens/8 .. max_tokens/2 words (about a token each), mostly answer, so a
    few fill a bin and most positions are learned, as in SFT data with long answers."""
    from qwen_pipeline.conversation import Conversation, Message, Source

    rng = random.Random(seed)
    chats = []
    for i in range(count):
        words = rng.randint(max_tokens // 8, max_tokens // 2)
        prompt = rng.randint(8, max(9, words // 6))
        chats.append(
            Conversation(
                messages=(
                    Message("user", " ".join(rng.choices(WORDS, k=prompt)) + "?"),
                    Message("assistant", " ".join(rng.choices(WORDS, k=max(words - prompt, 1))) + "."),
                ),
                source=Source("gpu_check", "synthetic", i),
            )
        )
    return chats


def encoded_dataset(tokenizer, count: int, cutoff_len: int, seed: int):
    from datasets import Dataset

    from qwen_pipeline.template import TemplateOptions, encode_conversations

    encoded = encode_conversations(
        synthetic_conversations(count, cutoff_len, seed), tokenizer, TemplateOptions(cutoff_len=cutoff_len)
    )
    return Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in encoded],
            "attention_mask": [[1] * len(e.input_ids) for e in encoded],
            "labels": [e.labels for e in encoded],
        }
    )


def training_set(tokenizer, pack_length: int, bins_needed: int):
    """Enough examples to fill ``bins_needed`` bins of ``pack_length`` (plus one, the last may be partial);
    and each bin's length in the order the Trainer reads them (shuffle off), to count the measured tokens."""
    from qwen_pipeline.training.packing import pack

    count = math.ceil((bins_needed + 2) * pack_length / (pack_length * 5 / 16))  # mean example: 5/16 of a bin
    while True:
        dataset = encoded_dataset(tokenizer, count, pack_length, seed=pack_length)
        packed, stats = pack(dataset, pack_length, neat=False)  # the packing run_sft does with train.packing
        if len(packed) > bins_needed:
            return dataset, [len(ids) for ids in packed["input_ids"]], stats
        count *= 2


# --- train -----------------------------------------------------------------------------------------


def bins_per_micro_batch(plan: Plan, pack_length: int) -> int:
    return max(1, plan.tokens_per_micro_batch // pack_length)


def train_config(plan: Plan, mode: str, attention: str, pack_length: int, max_steps: int, out: Path):
    from qwen_pipeline.config import TrainConfig

    return TrainConfig(
        finetuning_type=mode,
        lora_rank=LORA_RANK,
        bf16=plan.bf16,
        flash_attn=attention,
        packing=True,
        pack_length=pack_length,
        per_device_train_batch_size=bins_per_micro_batch(plan, pack_length),
        gradient_accumulation_steps=plan.accumulation,
        max_steps=max_steps,
        shuffle=False,  # bins in order, so the tokens of steps W+1..W+N are known
        learning_rate=1e-4,
        logging_steps=1,
        save_steps=0,
        overwrite_output_dir=True,
        output_dir=str(out / "checkpoints"),
    )


def quiet_run_sft(dataset, model_name_or_path: str, config):
    """``run_sft`` with the Trainer's per-step log lines (printed when progress bars are off) swallowed."""
    from qwen_pipeline.config import ModelConfig
    from qwen_pipeline.training.recipe import run_sft

    with contextlib.redirect_stdout(io.StringIO()):
        return run_sft(dataset, ModelConfig(model_name_or_path=model_name_or_path), config)


def train_row(
    row: Row, plan: Plan, model_path: str, parameters: int, peak_tflops: float | None, data, adapter_dir, out: Path
) -> None:
    """Steady-state tokens/s, MFU and peak memory of one (model, mode, attention, pack length); with
    ``adapter_dir``, the trained LoRA adapter is saved there as the train stage's dataset saves it."""
    import torch
    from datasets import DatasetDict

    from qwen_pipeline.config import ConfigError
    from qwen_pipeline.datasets import ModelBundle, ModelDataset
    from qwen_pipeline.training.checks import environment_problems

    mode, attention, pack_length = row.details["finetuning_type"], row.details["attention"], row.seq_len
    dataset, bin_lengths, stats = data
    warm, total = plan.warmup_steps, plan.warmup_steps + plan.steps
    if problems := environment_problems(train_config(plan, mode, attention, pack_length, total, out)):
        raise ConfigError(problems)
    runs = {}
    for steps in (warm, total):
        result = quiet_run_sft(
            DatasetDict({"train": dataset}), model_path, train_config(plan, mode, attention, pack_length, steps, out)
        )
        runs[steps] = result.summary
        if steps == total and adapter_dir is not None:  # the adapter the merge section merges
            bundle = ModelBundle(result.model, result.tokenizer, model_path, {"finetuning_type": mode})
            ModelDataset(filepath=str(adapter_dir), lazy=True).save(bundle)
        del result
        free_memory()
    bins_per_step = bins_per_micro_batch(plan, pack_length) * plan.accumulation
    tokens = sum(bin_lengths[warm * bins_per_step : total * bins_per_step])
    seconds = runs[total]["train_runtime_s"] - runs[warm]["train_runtime_s"]
    if seconds <= 0:
        raise RuntimeError(f"the {total}-step run was not slower than the {warm}-step run: too few steps to time")
    row.tokens_per_s = tokens / seconds
    row.mfu = 6 * parameters * row.tokens_per_s / (peak_tflops * 1e12) if peak_tflops else None
    row.peak_gpu_gb = runs[total].get("peak_gpu_memory_gb")
    losses = (runs[total]["first_loss"], runs[total]["last_loss"])
    row.note = f"loss {losses[0]:.3f} -> {losses[1]:.3f}"
    if not all(math.isfinite(x) for x in losses):
        row.status = "failed"
    labels = sum(sum(1 for x in ids[1:] if x != -100) for ids in dataset["labels"])
    row.details.update(
        {
            "parameters": parameters,
            "peak_tflops": peak_tflops,
            "warmup_steps": warm,
            "measured_steps": plan.steps,
            "tokens_per_step": sum(bin_lengths[:bins_per_step]),
            "measured_tokens": tokens,
            "measured_seconds": round(seconds, 3),
            "bins_per_step": bins_per_step,
            "bin_fill": stats["bin_fill"],
            "label_share": labels / sum(len(ids) for ids in dataset["input_ids"]),
            "run_sft_tokens_per_s": runs[total]["tokens_per_second"],  # the summary's own: warm-up included
            "first_loss": losses[0],
            "last_loss": losses[1],
            "gpu_gb_left_after": round(torch.cuda.memory_allocated() / 2**30, 3) if plan.cuda else None,
        }
    )


# --- merge and evaluate ----------------------------------------------------------------------------


def merge_row(row: Row, adapter_dir: Path, merged_dir: Path, plan: Plan) -> None:
    """The merge stage's three nodes and the merged_model dataset's save, as ``kedro run --pipelines merge``."""
    import torch

    from qwen_pipeline.config import MergeConfig
    from qwen_pipeline.datasets import ModelDataset
    from qwen_pipeline.pipelines.merge.nodes import check_merged_model, merge_adapter, publish_merged_model

    if plan.cuda:
        torch.cuda.reset_peak_memory_stats()
    params = {"export_device": MergeConfig(export_device=plan.device).export_device}
    staged = merge_adapter(ModelDataset(filepath=str(adapter_dir), lazy=True).load(), params)
    report = check_merged_model(staged, params)
    check = report["check"]
    row.details = {**check, "export_dtype": report["export_dtype"], "export_device": report["export_device"]}
    row.note = (
        f"max abs logit diff {check['max_abs_logit_diff']:.3g} (tolerance {check['tolerance']:.3g}), "
        f"top-1 {check['top1_agreement']:.3f}, {report['export_dtype']} on {report['export_device']}"
    )
    if not check["passed"]:
        row.status = "failed"
        return
    ModelDataset(filepath=str(merged_dir), lazy=True).save(publish_merged_model(staged, report))
    if plan.cuda:
        row.peak_gpu_gb = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def evaluate_row(row: Row, merged_dir: Path, validation, plan: Plan) -> None:
    """The evaluate stage's node for the fine-tuned model (loads it on CUDA when there is one)."""
    import torch
    from datasets import DatasetDict

    from qwen_pipeline.datasets import ModelDataset
    from qwen_pipeline.pipelines.evaluate.nodes import evaluate_finetuned

    if plan.cuda:
        torch.cuda.reset_peak_memory_stats()
    params = {"batch_size": 4, "max_samples": plan.eval_generations, "max_new_tokens": plan.max_new_tokens}
    merged = ModelDataset(filepath=str(merged_dir), lazy=True).load()
    result, predictions = evaluate_finetuned(merged, DatasetDict({"validation": validation}), params)
    row.details = {
        "eval_loss": result["eval_loss"],
        "perplexity": result["perplexity"],
        "eval_tokens": result["eval_tokens"],
        "examples": result["examples"],
        "generated": result["generated"],
        "generated_chars": [len(p) for p in predictions["predict"]],
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    row.note = (
        f"eval loss {result['eval_loss']:.3f} (ppl {result['perplexity']:.4g}) over {result['eval_tokens']} tokens, "
        f"{result['generated']} greedy generations of <= {plan.max_new_tokens} tokens"
    )
    if not math.isfinite(result["eval_loss"]) or result["generated"] != plan.eval_generations:
        row.status = "failed"
    if plan.cuda:
        row.peak_gpu_gb = round(torch.cuda.max_memory_allocated() / 2**30, 2)


# --- the run ---------------------------------------------------------------------------------------


def flash_attn_importable() -> bool:
    try:
        importlib.import_module("flash_attn")
    except Exception:  # noqa: BLE001 - a broken build counts as absent
        return False
    return True


def card() -> dict[str, str | None]:
    import torch

    info: dict[str, str | None] = {"name": None, "nvidia_smi": None}
    if torch.cuda.is_available():
        info["name"] = torch.cuda.get_device_name()
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        with contextlib.suppress(Exception):
            info["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    return info


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "flash_attn"):
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: reported as None
            found[name] = None
    import torch

    found["cuda"] = torch.version.cuda
    return found


def card_family(name: str | None) -> str | None:
    return next((family for family in PEAK_BF16_TFLOPS if name and family in name), None)


def pytest_section(plan: Plan, work_dir: Path) -> Row:
    row = Row("pytest -m gpu")
    if plan.smoke:
        row.status, row.note = "skipped", "--cpu-smoke"
        return row
    limit = min(PYTEST_LIMIT_S, remaining(plan) - 120)
    return run_row(row, limit, lambda r: pytest_gpu(r, work_dir, limit))


def build_section(plan: Plan, work_dir: Path) -> tuple[list[Row], dict[str, str]]:
    """A row per shape, and the model folders that were built (plus the embedded model's)."""
    from qwen_pipeline.models import EMBEDDED_MODEL, ensure_embedded_model

    rows, paths = [], {EMBEDDED_MODEL: str(ensure_embedded_model())}
    for shape in plan.models:
        row = Row("build", shape, "random init, " + ("bf16" if plan.bf16 else "float32"))
        rows.append(run_row(row, BUILD_LIMIT_S, lambda r: build_model(r, shape, work_dir / "models" / shape, plan)))
        if row.status == "ok":
            paths[shape] = row.details["path"]
    return rows, paths


def train_section(
    plan: Plan, paths: dict[str, str], peak_tflops: float | None, work_dir: Path
) -> tuple[list[Row], dict[str, Path]]:
    """A row per (model, pack length, mode, attention), and the first LoRA adapter of each model."""
    from qwen_pipeline.models import EMBEDDED_MODEL, load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED_MODEL)  # the tokenizer every model here carries
    data = {
        n: training_set(
            tokenizer, n, (plan.warmup_steps + plan.steps) * plan.accumulation * bins_per_micro_batch(plan, n)
        )
        for n in plan.pack_lengths
    }
    rows, adapters = [], {}
    for name in plan.train_models:
        if name not in paths:
            rows.append(Row("train", name, status="skipped", note="its build failed"))
            continue
        parameters = parameter_count(paths[name])
        for pack_length, mode, attention in itertools.product(plan.pack_lengths, plan.modes, plan.attentions):
            row = Row("train", name, f"{f'lora r{LORA_RANK}' if mode == 'lora' else mode} · {attention}", pack_length)
            row.details = {"finetuning_type": mode, "attention": attention}
            keep = work_dir / f"trained-{len(adapters)}" if mode == "lora" and name not in adapters else None
            args = (plan, paths[name], parameters, peak_tflops, data[pack_length], keep, work_dir / "runs")
            limit = min(TRAIN_ROW_LIMIT_S, remaining(plan) - MERGE_LIMIT_S - EVALUATE_LIMIT_S)
            rows.append(run_row(row, limit, lambda r: train_row(r, *args)))
            if keep is not None and row.status == "ok":
                adapters[name] = keep
    if plan.cuda and "fa2" not in plan.attentions:
        rows.append(
            Row("train", "all", f"lora r{LORA_RANK}, full · fa2", status="skipped", note="flash_attn is not importable")
        )
    return rows, adapters


def merge_section(plan: Plan, adapters: dict[str, Path], merged_dir: Path) -> Row:
    # The largest model with a trained adapter: its merge is the one worth timing.
    source = next((n for n in reversed(plan.train_models) if n in adapters), "-")
    row = Row("merge", source, f"lora r{LORA_RANK} -> export_device {plan.device}")
    if source not in adapters:
        row.status, row.note = "skipped", "no LoRA adapter was trained"
        return row
    limit = min(MERGE_LIMIT_S, remaining(plan) - EVALUATE_LIMIT_S / 2)
    return run_row(row, limit, lambda r: merge_row(r, adapters[source], merged_dir, plan))


def evaluate_section(plan: Plan, merge: Row, merged_dir: Path) -> Row:
    from qwen_pipeline.models import EMBEDDED_MODEL, load_tokenizer

    row = Row("evaluate", merge.model, f"merged model on {plan.device}")
    if merge.status != "ok":
        row.status, row.note = "skipped", "no merged model"
        return row
    # Shorter than the training examples: prompts for generation, answers for the loss.
    validation = encoded_dataset(load_tokenizer(EMBEDDED_MODEL), plan.eval_examples, plan.pack_lengths[0] // 2, 7)
    return run_row(row, min(EVALUATE_LIMIT_S, remaining(plan)), lambda r: evaluate_row(r, merged_dir, validation, plan))


def run(plan: Plan, work_dir: Path, peak_tflops: float | None) -> tuple[list[Row], dict]:
    import torch
    import transformers

    from qwen_pipeline.models import ensure_embedded_model

    transformers.logging.set_verbosity_error()  # no progress bars in the output (the Trainer reads this)
    ensure_embedded_model()  # its tokenizer is the one every built model gets; the GPU tests use it too
    gpu = card()
    peak = (peak_tflops or PEAK_BF16_TFLOPS.get(card_family(gpu["name"]))) if plan.cuda else None
    # pytest first: it takes what it takes, and the training rows then fill the budget that is left.
    rows = [pytest_section(plan, work_dir)]
    built, paths = build_section(plan, work_dir)
    trained, adapters = train_section(plan, paths, peak, work_dir)
    merge = merge_section(plan, adapters, work_dir / "merged")
    rows += [*built, *trained, merge, evaluate_section(plan, merge, work_dir / "merged")]
    env = {"card": gpu, "versions": versions(), "plan": dataclasses.asdict(plan), "cuda": torch.cuda.is_available()}
    return rows, env


# --- output ----------------------------------------------------------------------------------------

COLUMNS = ("section", "model", "mode", "seq len", "tokens/s", "MFU", "peak GPU GB", "seconds", "status")


def cell_status(row: Row) -> str:
    return f"{row.status}: {row.note}" if row.note else row.status


def cells(row: Row) -> list[str]:
    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    mfu = "-" if row.section != "train" else ("n/a" if row.mfu is None else f"{100 * row.mfu:.1f}%")
    if row.mfu is not None and row.details.get("finetuning_type") == "lora":
        mfu += " (6N: full-SFT convention)"
    return [
        row.section,
        row.model,
        row.mode,
        number(row.seq_len, "d"),
        number(row.tokens_per_s, ",.0f"),
        mfu,
        number(row.peak_gpu_gb, ".1f"),
        number(row.seconds, ".1f"),
        cell_status(row).replace("|", "\\|"),  # a pipe would end the markdown cell
    ]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def card_line(env: dict) -> str:
    gpu = env["card"]
    if not env["cuda"]:
        return f"Card: none (CPU: {platform.machine()}, {os.cpu_count()} cores)"
    return f"Card: {gpu['name']}" + (f" | nvidia-smi: {gpu['nvidia_smi']}" if gpu["nvidia_smi"] else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="embedded tiny model, float32, CPU, ~1 minute")
    parser.add_argument("--json", type=Path, help="also write the table (and the details of each row) here")
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole run, start to table (default 450)")
    parser.add_argument(
        "--steps", type=int, default=10, help="GPU run: measured optimizer steps N per row (default 10)"
    )
    parser.add_argument("--warmup-steps", type=int, default=2, help="GPU run: warm-up steps W, not timed (default 2)")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not H100/H200/A100")
    parser.add_argument("--work", type=Path, help="keep models and outputs here (default: a temporary folder)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))  # this checkout's code, whatever is installed

    plan = make_plan(args, fa2=not args.cpu_smoke and flash_attn_importable())
    work_dir = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        rows, env = run(plan, work_dir, args.peak_tflops)
    finally:
        if args.work is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    wall = round(time.monotonic() - START, 1)
    versions_line = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    print(f"\n## GPU check ({'cpu-smoke' if plan.smoke else 'cuda'}), {wall} s\n")
    print(card_line(env))
    print(versions_line + "\n")
    print(table(rows))
    if args.json:
        payload = {**env, "wall_s": wall, "columns": COLUMNS, "table": table(rows)}
        payload["rows"] = [dataclasses.asdict(r) for r in rows]
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 1 if any(r.status in ("error", "failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
