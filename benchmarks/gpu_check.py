"""GPU check: what only a GPU can show, in one time-bounded run: packed attention kept apart, QLoRA, mixed
precision, ZeRO-3, the memory plan against the allocator, evaluate's memory, throughput, merge and evaluate.

Made for a GPU lent for a few minutes with no network (an H100/H200): nothing is downloaded. Qwen2.5-0.5B-
and 1.5B-shaped models (the real shapes and 151,936-token vocabulary, tied embeddings, random weights) are
built on the spot and saved with the real Qwen2.5 tokenizer the project builds offline, so every loader of
the project takes their folders as ``model_name_or_path``. Sections, in this order, each one bounded in time;
a failing one puts its error in the table and the run goes on:

- pytest: ``pytest -m gpu`` in a child process (first, so the training section can use what it leaves);
- build: the models above, initialised on the GPU, saved in bf16;
- contamination (0.5B, bf16; FlashAttention-2 when ``flash_attn`` imports, else listed as skipped; and sdpa):
  examples laid out as training lays them (``neat_packing`` bins; ``padding_free``) by ``FlatCollator`` (FA2:
  one row + cu_seq_lens; sdpa: rows, block-diagonal masks from position ids), decoder + the training loss's
  head, against each example run alone (one per row, no packing). Fails when an example's summed loss differs
  by > 1e-3 relative (or the total does), or its final hidden states by > 0.1 (norm of the difference over the
  norm). Why not bf16's 2^-8 on the total: with random weights every token's loss is near ln(151,936), so
  contamination moves the total by only ~6e-3; per example it moves the loss up to 7e-3 and the hidden states
  by ~1.3, while bf16 rounding (packed and alone round differently in each layer) gave <= 1.1e-4 and 1.7e-2
  (0.5B, bf16, sdpa, measured on the CPU). A control (same batch, position ids running on, one attention
  segment a row: plain packing) must exceed the hidden tolerance, or the check could not see a leak. Timed:
  the packed batch against the examples one by one;
- fp32 master (0.5B full SFT, bf16, lr 1e-5, one step): every trainable parameter and AdamW state tensor is
  float32, the last down_proj and the head computed in bf16 (autocast), and > 99% of that down_proj's entries
  moved (the share that would survive in bf16 weights is shown beside it);
- qlora (0.5B, LoRA r8 on nf4, bf16 compute): steady-state tokens/s as the train rows below, loss finite;
- eval memory: ``max_memory_allocated`` above the weights around the evaluate stage's ``eval_loss`` on one
  8 x 2,048 batch (0.5B, bf16), beside full float32 logits and a copy (8 x 2,048 x 151,936 x 4 B x 2); fails
  when it holds one float32 copy of the full logits, or its loss is not the full-logits loss (1e-3);
- train: ``run_sft`` (the train stage's recipe) for LoRA r8 and full SFT, bf16, FlashAttention-2 (when
  ``flash_attn`` imports) then sdpa, synthetic conversations through the qwen template, packed to 2048 and
  4096 tokens (``train.packing``), 16,384 tokens per optimizer step; rows the budget cannot hold are skipped.
  tokens/s is steady state: each row runs ``run_sft`` once for W+N steps with a step clock (a TrainerCallback
  that synchronizes the device at each step's end) and divides the tokens of the last N steps by the time from
  the end of step W to the end of step W+N (model loading, Trainer set-up and the first W steps left out).
  MFU = 6 * N_params * tokens/s / the card's dense
  bf16 peak (989 TFLOP/s for H100/H200 SXM); N_params counts the tied embedding once; attention FLOPs are
  left out (so MFU reads low at 4096), and the output layer only runs where a label is learned
  (FlatCollator's logits_to_keep). For LoRA rows 6N is the full-SFT convention (a LoRA step does less work):
  comparable across rows, not a utilisation. Peak GPU GB is ``torch.cuda.max_memory_allocated`` of the run;
- zero3 (0.5B, LoRA r8, bf16, ``conf/base/deepspeed/zero3.json``, in this process with its own single-rank
  group): a few steps, loss finite, no process group or live ZeRO-3 config left (merge and evaluate follow);
- merge: the merge stage's nodes with ``export_device: cuda`` on the largest model's LoRA adapter trained
  above; its check's max |logit diff| (merged vs base+adapter) against the check's tolerance;
- evaluate: the evaluate stage's node on the merged model on CUDA: eval loss / perplexity over a small
  synthetic validation split, and a few greedy generations.

Every row that trains also shows the memory plan (``training/memory.py``'s ``plan_memory`` for one process on
this device, made before the row loads anything): plan GB is its tensor terms (its total less the CUDA
allowance for allocator and workspaces, which ``max_memory_allocated`` does not see), and plan/peak that over
the measured peak ("n/a" when the plan module does not import or the plan raised: the reason is in the JSON).

At the end: one markdown table (section, model, mode, seq len, tokens/s, MFU, peak GPU GB, plan GB, plan/peak,
seconds, status), the card (``torch.cuda.get_device_name()``, ``nvidia-smi``) and versions; ``--json PATH``
writes it too, with each row's details. The default budget (``--budget-s 450``) keeps the whole run under 8
minutes; rows that would not fit are listed as skipped.

``--cpu-smoke`` runs the same code on the embedded tiny model on the CPU, float32 (bf16 where a row is about
bf16), sdpa; FlashAttention-2 rows are listed as "skipped: needs CUDA".

    python benchmarks/gpu_check.py --json gpu_check.json
    python benchmarks/gpu_check.py --cpu-smoke          # the same code paths on the embedded tiny model, CPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
GIB = 2**30
# Time limits (seconds): a row is cut at its limit; training stops early enough to leave the rows after it theirs.
PYTEST_LIMIT_S, BUILD_LIMIT_S, TRAIN_ROW_LIMIT_S, MERGE_LIMIT_S, EVALUATE_LIMIT_S = 180.0, 120.0, 150.0, 75.0, 45.0
# The checks: a contamination row (the first of its kernel also loads the model and runs the lone examples),
# one full-SFT step, a steady-state QLoRA row (two run_sft), an evaluation batch, a few ZeRO-3 steps.
CONTAMINATION_LIMIT_S, FP32_MASTER_LIMIT_S, QLORA_LIMIT_S, EVAL_MEMORY_LIMIT_S, ZERO3_LIMIT_S = 60, 60, 120, 45, 90
# What the training rows leave for the rows after them (ZeRO-3, merge, evaluate: less than their limits together,
# which they seldom need; the budget stays 30 s under 8 minutes for the rest).
AFTER_TRAIN_RESERVE_S = 150.0
# Largest relative difference allowed between an example packed and alone: its summed loss, and the norm of the
# difference of its final hidden states over their norm (why these: the module docstring).
CONTAMINATION_TOLERANCE = {"bfloat16": {"loss": 1e-3, "hidden": 0.1}, "float32": {"loss": 1e-5, "hidden": 1e-3}}
EVAL_LOSS_TOLERANCE = 1e-3  # chunked eval loss vs the full-logits loss, relative (bf16 kernels differ by batch)
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
    check_model: str  # what the contamination, fp32 master, qlora, eval memory and zero3 rows use
    modes: tuple[str, ...]  # finetuning_type
    pack_lengths: tuple[int, ...]
    attentions: tuple[str, ...]  # train.flash_attn values, the preferred first
    warmup_steps: int  # W: steps run before the timed ones (one run: steps W+1..W+N are timed)
    steps: int  # N: measured optimizer steps
    tokens_per_micro_batch: int  # bins per micro-batch = this // pack length
    accumulation: int  # gradient_accumulation_steps
    bf16: bool
    contamination_examples: int  # examples packed (and run one by one)
    contamination_cutoff: int  # their cutoff_len
    eval_memory_batch: tuple[int, int]  # rows x tokens of the eval memory batch
    zero3_steps: int
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
            check_model="embedded:tiny-qwen2.5",
            modes=("lora",),  # full SFT runs in the fp32 master row
            pack_lengths=(256,),
            attentions=("sdpa",),
            warmup_steps=1,
            steps=2,
            tokens_per_micro_batch=512,  # two bins a step: two steps outlast the noise of the first on a busy CPU
            accumulation=1,
            bf16=False,  # float32 on the CPU: bf16 autocast there is slow and not what the smoke checks
            contamination_examples=8,  # at this cutoff padding_free puts two of them in one row
            contamination_cutoff=384,
            eval_memory_batch=(4, 256),
            zero3_steps=2,
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
        check_model="0.5B",
        modes=("lora", "full"),
        pack_lengths=(2048, 4096),
        attentions=("fa2", "sdpa") if fa2 else ("sdpa",),
        warmup_steps=args.warmup_steps,
        steps=args.steps,
        tokens_per_micro_batch=8192,  # 1.5B full SFT stays well under 80 GB without gradient checkpointing
        accumulation=2,
        bf16=True,
        contamination_examples=24,
        contamination_cutoff=1024,
        eval_memory_batch=(8, 2048),
        zero3_steps=4,
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
    plan_gb: float | None = None  # the memory plan's tensor terms, for rows that train
    trains: bool = False  # a training row: MFU, plan GB and plan/peak are "n/a" rather than "-" when unknown


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
    """What the train node does after training in-process: collect the Trainer's cycles, empty CUDA's cache."""
    from qwen_pipeline.training.launcher import release_memory

    release_memory()


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

    from qwen_pipeline.embedded import cache_dir

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


def train_config(plan: Plan, mode: str, attention: str, pack_length: int, max_steps: int, out: Path, **overrides):
    """The TrainConfig of a training row; ``overrides`` (TrainConfig fields) change it, checked as the train node
    checks its parameters."""
    from qwen_pipeline.config import ConfigError, TrainConfig

    config = TrainConfig(
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
    config = dataclasses.replace(config, **overrides)
    if problems := config.problems():
        raise ConfigError([f"train.{p}" for p in problems])
    return config


def quiet_run_sft(dataset, model_name_or_path: str, config, callbacks=()):
    """``run_sft`` with the Trainer's per-step log lines (printed when progress bars are off) swallowed."""
    from qwen_pipeline.config import ModelConfig
    from qwen_pipeline.training.recipe import run_sft

    with contextlib.redirect_stdout(io.StringIO()):
        return run_sft(dataset, ModelConfig(model_name_or_path=model_name_or_path), config, callbacks=callbacks)


def step_clock() -> tuple[Any, dict[int, float]]:
    """A TrainerCallback noting ``time.perf_counter()`` at the end of each optimizer step (after the device is
    done), and the dict it fills: step -> time; step 0 is the start of training. Steady-state speed is then timed
    inside one run, from step W to step W+N (two runs of W and W+N steps differ by noise as large as N steps on a
    busy CPU)."""
    import torch
    from transformers import TrainerCallback

    times: dict[int, float] = {}

    def note(state) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times[state.global_step] = time.perf_counter()

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            note(state)

        def on_step_end(self, args, state, control, **kwargs):
            note(state)

    return StepClock(), times


def memory_planner():
    """``(plan_memory, placement_for, Shape)`` from ``training/memory.py``, or the reason it does not import."""
    try:
        from qwen_pipeline.training.memory import Shape, placement_for, plan_memory
    except Exception as error:  # noqa: BLE001 - missing or broken: the plan columns say n/a
        return f"qwen_pipeline.training.memory does not import: {type(error).__name__}: {error}"
    return plan_memory, placement_for, Shape


def add_memory_plan(row: Row, model_path: str, config, plan: Plan) -> None:
    """The memory plan the train node makes before loading, for one process on this device: ``row.plan_gb`` its
    tensor terms (the total less the CUDA allowance, which max_memory_allocated does not see); terms in details.
    A plan that cannot be made leaves "n/a" and its reason in the details (the row itself goes on)."""
    planner = memory_planner()
    if isinstance(planner, str):
        row.details["plan"] = f"n/a: {planner}"
        return
    plan_memory, placement_for, shape = planner
    try:
        placement = placement_for(config, world_size=1, procs_per_node=1, cuda=plan.cuda)
        made = plan_memory(model_path, config, shape(config.per_device_train_batch_size, config.pack_length), placement)
    except Exception as error:  # noqa: BLE001 - reported beside the measurement, which still runs
        traceback.print_exc()
        row.details["plan"] = f"n/a: plan_memory raised {type(error).__name__}: {error}"
        return
    row.plan_gb = round((made.total - made.terms["overhead"]) / GIB, 3)
    row.details["plan"] = {k: round(v / GIB, 3) for k, v in made.terms.items()} | {"fits": made.fits}


def plan_ratio(row: Row) -> float | None:
    """Planned over measured peak (both tensors only)."""
    return row.plan_gb / row.peak_gpu_gb if row.plan_gb and row.peak_gpu_gb else None


def check_environment(config) -> None:
    from qwen_pipeline.config import ConfigError
    from qwen_pipeline.training.checks import environment_problems

    if problems := environment_problems(config):
        raise ConfigError(problems)


def train_row(
    row: Row,
    plan: Plan,
    model_path: str,
    parameters: int,
    peak_tflops: float | None,
    data,
    adapter_dir,
    out: Path,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Steady-state tokens/s, MFU and peak memory of one (model, mode, attention, pack length), beside the memory
    plan; with ``adapter_dir``, the trained LoRA adapter is saved there as the train stage's dataset saves it.
    ``overrides``: TrainConfig fields changed for this row (quantization_bit for QLoRA)."""
    import torch
    from datasets import DatasetDict

    from qwen_pipeline.datasets import ModelBundle, ModelDataset

    mode, attention, pack_length = row.details["finetuning_type"], row.details["attention"], row.seq_len
    dataset, bin_lengths, stats = data
    warm, total = plan.warmup_steps, plan.warmup_steps + plan.steps

    def config(steps: int):
        return train_config(plan, mode, attention, pack_length, steps, out, **(overrides or {}))

    check_environment(config(total))
    add_memory_plan(row, model_path, config(total), plan)
    clock, times = step_clock()
    result = quiet_run_sft(DatasetDict({"train": dataset}), model_path, config(total), callbacks=[clock])
    summary = result.summary
    if adapter_dir is not None:  # the adapter the merge section merges
        bundle = ModelBundle(result.model, result.tokenizer, model_path, {"finetuning_type": mode})
        ModelDataset(filepath=str(adapter_dir), lazy=True).save(bundle)
    del result
    free_memory()
    bins_per_step = bins_per_micro_batch(plan, pack_length) * plan.accumulation
    tokens = sum(bin_lengths[warm * bins_per_step : total * bins_per_step])
    if warm not in times or total not in times:
        raise RuntimeError(f"the run did not reach step {total} (steps timed: {sorted(times)})")
    seconds = times[total] - times[warm]
    row.tokens_per_s = tokens / seconds
    row.mfu = 6 * parameters * row.tokens_per_s / (peak_tflops * 1e12) if peak_tflops else None
    row.peak_gpu_gb = summary.get("peak_gpu_memory_gb")
    losses = (summary["first_loss"], summary["last_loss"])
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
            "run_sft_tokens_per_s": summary["tokens_per_second"],  # the summary's own: warm-up included
            "first_loss": losses[0],
            "last_loss": losses[1],
            "plan_over_peak": plan_ratio(row),
            "gpu_gb_left_after": round(torch.cuda.memory_allocated() / 2**30, 3) if plan.cuda else None,
        }
    )


def single_run(row: Row, model_path: str, config, data, plan: Plan):
    """One ``run_sft`` of ``config.max_steps`` steps over the bins of ``data``, in order: tokens/s over the whole
    run (first steps included), peak memory beside the plan, the losses. Returns the TrainResult."""
    from datasets import DatasetDict

    dataset, bin_lengths, _ = data
    check_environment(config)
    add_memory_plan(row, model_path, config, plan)
    result = quiet_run_sft(DatasetDict({"train": dataset}), model_path, config)
    summary = result.summary
    bins = config.max_steps * config.per_device_train_batch_size * config.gradient_accumulation_steps
    tokens = sum(bin_lengths[:bins])
    row.tokens_per_s = tokens / summary["train_runtime_s"] if summary["train_runtime_s"] > 0 else None
    row.peak_gpu_gb = summary.get("peak_gpu_memory_gb")
    losses = [h["loss"] for h in result.history]
    row.details.update(
        {
            "steps": summary["global_steps"],
            "tokens": tokens,
            "train_runtime_s": summary["train_runtime_s"],
            "losses": losses,
            "trainable_parameters": summary["trainable_parameters"],
            "plan_over_peak": plan_ratio(row),
        }
    )
    if summary["global_steps"] != config.max_steps or not losses or not all(math.isfinite(x) for x in losses):
        row.status = "failed"
    row.note = f"{summary['global_steps']} steps, loss " + " -> ".join(f"{x:.3f}" for x in losses[:1] + losses[-1:])
    return result


# --- the checks ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def watched_training():
    """While inside, ``run_sft``'s Trainer is kept in ``seen["trainer"]``; as training starts (after the recipe's
    upcast) the last decoder layer's down_proj weight is copied to ``seen["before"]``, and the dtypes that layer
    and the output head compute in are collected in ``seen["dtypes"]``."""
    from qwen_pipeline.training.loss import SFTTrainer

    seen: dict[str, Any] = {"dtypes": {"down_proj": set(), "lm_head": set()}}
    own = SFTTrainer.__dict__.get("train")  # None: inherited from the Trainer
    inherited = SFTTrainer.train

    def train(self, *args, **kwargs):
        model = self.accelerator.unwrap_model(self.model)
        layer, head = model.get_decoder().layers[-1].mlp.down_proj, model.get_output_embeddings()
        seen.update(trainer=self, layer=layer, before=layer.weight.detach().clone())

        def recorder(name):
            return lambda module, args, output: seen["dtypes"][name].add(str(output.dtype).removeprefix("torch."))

        hooks = [layer.register_forward_hook(recorder("down_proj")), head.register_forward_hook(recorder("lm_head"))]
        try:
            return inherited(self, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    SFTTrainer.train = train
    try:
        yield seen
    finally:
        if own is None:
            del SFTTrainer.train
        else:
            SFTTrainer.train = own


def fp32_master_row(row: Row, plan: Plan, model_path: str, attention: str, data, out: Path) -> None:
    """One full-SFT step under bf16 mixed precision, lr 1e-5: what trains and AdamW's states are float32, the
    forward ran in bf16, and the step moved nearly every entry of a layer (in bf16 weights it would round away)."""
    import torch

    pack_length = plan.pack_lengths[0]
    config = train_config(
        plan, "full", attention, pack_length, 1, out,
        bf16=True, learning_rate=1e-5, lr_scheduler_type="constant", gradient_accumulation_steps=1,
    )  # fmt: skip
    with watched_training() as seen:
        result = single_run(row, model_path, config, data, plan)
    trainer, before = seen["trainer"], seen["before"]
    after = seen["layer"].weight.detach()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    trainable = [p for p in result.model.parameters() if p.requires_grad]
    check = {
        "optimizer": type(optimizer).__name__,
        "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trainable}),
        "optimizer_state_dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in states}),
        "parameters_with_state": len(optimizer.state),
        "trainable_tensors": len(trainable),
        "forward_dtypes": {name: sorted(found) for name, found in seen["dtypes"].items()},
        "changed_share": float((after != before).float().mean()),
        # before is bf16-exact (loaded in bf16, then upcast): what rounding the updated weight to bf16 keeps
        "changed_share_if_bf16": float((after.to(torch.bfloat16) != before.to(torch.bfloat16)).float().mean()),
    }
    row.details.update(check)
    del result, trainer, seen
    problems = []
    if check["trainable_dtypes"] != ["float32"]:
        problems.append(f"trainable weights {check['trainable_dtypes']}")
    if check["optimizer_state_dtypes"] != ["float32"] or check["parameters_with_state"] != len(trainable):
        problems.append(f"{check['parameters_with_state']} AdamW states {check['optimizer_state_dtypes']}")
    if any(found != ["bfloat16"] for found in check["forward_dtypes"].values()):
        problems.append(f"forward in {check['forward_dtypes']}")
    if check["changed_share"] <= 0.99:
        problems.append(f"lr 1e-5 moved only {check['changed_share']:.1%} of down_proj")
    row.note = (
        f"trainable and AdamW states {'/'.join(check['optimizer_state_dtypes'])}, forward "
        f"{'/'.join(sorted(set().union(*check['forward_dtypes'].values())))}; lr 1e-5 moved "
        f"{check['changed_share']:.2%} of the last down_proj ({check['changed_share_if_bf16']:.2%} in bf16 weights)"
    )
    if problems:
        row.status, row.note = "failed", "; ".join(problems) + " | " + row.note


def zero3_row(row: Row, plan: Plan, model_path: str, attention: str, data, out: Path) -> None:
    """A few LoRA steps under ZeRO-3 in this process (run_sft gives it a single-rank group), then whether the
    process is left clean: no process group, no live ZeRO-3 config that would partition later model loads."""
    import torch
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    config = train_config(
        plan, "lora", attention, plan.pack_lengths[0], plan.zero3_steps, out,
        deepspeed=str(ROOT / "conf" / "base" / "deepspeed" / "zero3.json"), gradient_accumulation_steps=1,
    )  # fmt: skip
    before = {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    result = single_run(row, model_path, config, data, plan)
    row.details["zero_stage"] = 3
    del result
    free_memory()
    left = []
    if is_deepspeed_zero3_enabled():
        unset_hf_deepspeed_config()  # so merge and evaluate load whole models
        left.append("a live ZeRO-3 config (later from_pretrained would partition)")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        left.append("a process group")
    if {name: os.environ.get(name) for name in before} != before:
        left.append("launch variables")
    row.details["left_behind"] = left
    if left:
        row.status, row.note = "failed", "run_sft left " + ", ".join(left) + " | " + row.note


@dataclass
class Probe:
    """One attention kernel's model (eval mode, no KV cache: packed masks are only built without one) and the
    reference: each example run alone (batch of one, no packing): its summed loss and final hidden states."""

    model: Any
    examples: Any  # a Dataset: input_ids, attention_mask, labels
    dtype: str
    losses: list[float]
    hidden: list[Any]  # float32, on the CPU: [length, hidden_size] per example
    lone_seconds: float  # all examples one by one: forward + loss


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward_loss(model, batch: dict[str, Any]):
    """The decoder on one collated batch (as the Trainer passes it, cu_seq_lens and all), then the training
    loss's head, summed over the learned positions: (final hidden states, labels, summed loss)."""
    import torch

    from qwen_pipeline.training.loss import token_mean_loss

    device = next(model.parameters()).device
    # num_tokens: the collator's count for the Trainer's tokens/s, not a model input (SFTTrainer drops it too)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "num_tokens"}
    labels = inputs.pop("labels")
    with torch.no_grad():
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        total = token_mean_loss(model.get_output_embeddings(), hidden, labels, num_items_in_batch=1)
    return hidden, labels, float(total)


def position_losses(model, hidden, labels):
    """Per position, the loss of predicting its token from the one before (0 where not learned), [rows, length],
    on the CPU; the head in chunks as training runs it."""
    import torch

    from qwen_pipeline.training.loss import HEAD_CHUNK_ROWS
    from qwen_pipeline.training.packing import IGNORE_INDEX

    head = model.get_output_embeddings()
    learned = labels[:, 1:] != IGNORE_INDEX
    states, targets = hidden[:, :-1][learned], labels[:, 1:][learned]
    out = torch.zeros(labels.shape, dtype=torch.float32)
    with torch.no_grad():
        values = [
            torch.nn.functional.cross_entropy(
                head(states[i : i + HEAD_CHUNK_ROWS]).float(), targets[i : i + HEAD_CHUNK_ROWS], reduction="none"
            )
            for i in range(0, len(targets), HEAD_CHUNK_ROWS)
        ]
    out[:, 1:][learned.cpu()] = torch.cat(values).cpu() if values else torch.zeros(0)
    return out


def example_segments(batch: dict[str, Any], examples) -> list[tuple[int, int, int, int]]:
    """(example index, row, start, end) of every example in a collated batch, found by its tokens between the
    places where position ids restart (padding segments match no example). Each example exactly once."""
    from qwen_pipeline.training.packing import segment_starts

    waiting: dict[tuple[int, ...], list[int]] = {}
    for i, ids in enumerate(examples["input_ids"]):
        waiting.setdefault(tuple(ids), []).append(i)
    found = []
    for r, (ids, positions) in enumerate(zip(batch["input_ids"].tolist(), batch["position_ids"].numpy())):
        bounds = [*segment_starts(positions).tolist(), len(positions)]
        for start, end in zip(bounds, bounds[1:]):
            if matches := waiting.get(tuple(ids[start:end])):
                found.append((matches.pop(0), r, start, end))
    missing = sum(len(v) for v in waiting.values())
    if missing:
        raise RuntimeError(f"{missing} of {len(examples)} examples are not whole segments of the collated batch")
    return found


def running_on(batch: dict[str, Any]) -> dict[str, Any]:
    """The control: the same tokens with position ids running on through each row and one attention segment per
    row (what plain packing does): examples then see the ones before them."""
    import torch

    rows, width = batch["input_ids"].shape
    control = {**batch, "position_ids": torch.arange(width).expand(rows, width).clone()}
    if "cu_seq_lens_q" in batch:  # FlashAttention-2 varlen: one sequence
        ends = torch.tensor([0, width], dtype=torch.int32)
        control |= {"cu_seq_lens_q": ends, "cu_seq_lens_k": ends, "max_length_q": width, "max_length_k": width}
    return control


def contamination_probe(plan: Plan, model_path: str, attention: str) -> Probe:
    """The model with ``attention`` (bf16 on CUDA: FlashAttention-2 runs in 16-bit only; float32 in the CPU smoke)
    and every example run alone, timed after one warm-up."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_pipeline.models import EMBEDDED_MODEL, load_tokenizer, resolve_model_path
    from qwen_pipeline.training.recipe import ATTENTION

    dtype = torch.bfloat16 if plan.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model_path), dtype=dtype, attn_implementation=ATTENTION[attention]
    )
    model = model.to(plan.device).eval()
    model.config.use_cache = False
    examples = encoded_dataset(
        load_tokenizer(EMBEDDED_MODEL), plan.contamination_examples, plan.contamination_cutoff, seed=11
    )

    def alone(i: int) -> dict[str, Any]:
        return {"input_ids": torch.tensor([examples[i]["input_ids"]]), "labels": torch.tensor([examples[i]["labels"]])}

    if plan.cuda:
        forward_loss(model, alone(0))  # warm-up: kernels loaded, allocator primed
        synchronize()
    started, runs = time.perf_counter(), []
    for i in range(len(examples)):
        hidden, _, loss = forward_loss(model, alone(i))
        runs.append((loss, hidden[0]))
    synchronize()
    seconds = time.perf_counter() - started
    losses, hidden = [loss for loss, _ in runs], [h.float().cpu() for _, h in runs]
    return Probe(model, examples, str(dtype).removeprefix("torch."), losses, hidden, seconds)


def example_differences(probe: Probe, segments, hidden, per_position) -> tuple[list[float], list[float]]:
    """Per example: its summed loss and its final hidden states in the batch against the same alone, relative."""
    losses, states = [], []
    for i, r, s, e in segments:
        losses.append(abs(float(per_position[r, s:e].sum()) - probe.losses[i]) / probe.losses[i])
        alone = probe.hidden[i]
        states.append(float((hidden[r, s:e].float().cpu() - alone).norm() / alone.norm()))
    return losses, states


def contamination_row(row: Row, plan: Plan, probes: dict[str, Probe], model_path: str) -> None:
    """Each example in a packed batch (neat_packing bins or padding_free) against the same example alone: summed
    loss and final hidden states; the control (positions running on) against the same; both timings."""
    import torch

    from qwen_pipeline.training.packing import FlatCollator, pack

    layout, attention = row.details["layout"], row.details["attention"]
    if attention not in probes:
        probes[attention] = contamination_probe(plan, model_path, attention)
    probe = probes[attention]
    model, examples = probe.model, probe.examples
    collate = FlatCollator(attention=model.config._attn_implementation)
    if layout == "neat_packing":  # bins of pack_length with position ids restarting per example
        bins, stats = pack(examples, 2 * plan.contamination_cutoff, neat=True)
        batch = collate([bins[i] for i in range(len(bins))])
        row.details["bins"], row.details["bin_fill"] = stats["bins"], round(stats["bin_fill"], 3)
    else:  # padding_free: the examples as they are, laid out by the collator
        pairs = zip(examples["input_ids"], examples["labels"])
        batch = collate([{"input_ids": ids, "labels": labels} for ids, labels in pairs])
    segments = example_segments(batch, examples)
    if plan.cuda:
        forward_loss(model, batch)  # warm-up at this shape
        synchronize()
    started = time.perf_counter()
    hidden, labels, packed_sum = forward_loss(model, batch)
    synchronize()
    packed_seconds = time.perf_counter() - started
    loss_diffs, state_diffs = example_differences(probe, segments, hidden, position_losses(model, hidden, labels))
    control_hidden, control_labels, _ = forward_loss(model, running_on(batch))
    control_losses = position_losses(model, control_hidden, control_labels)
    control_loss_diffs, control_state_diffs = example_differences(probe, segments, control_hidden, control_losses)
    rows_used = [r for _, r, _, _ in segments]
    tolerance = CONTAMINATION_TOLERANCE[probe.dtype]
    result = {
        "examples": len(examples),
        "rows": int(batch["input_ids"].shape[0]),
        "most_examples_in_a_row": max(rows_used.count(r) for r in set(rows_used)),
        "tokens": int(sum(e - s for _, _, s, e in segments)),
        "labelled_packed": int((labels[:, 1:] != -100).sum()),
        "labelled_alone": int(sum(sum(1 for x in ids[1:] if x != -100) for ids in examples["labels"])),
        "packed_sum": packed_sum,
        "alone_sum": sum(probe.losses),
        "sum_rel_diff": abs(packed_sum - sum(probe.losses)) / sum(probe.losses),
        "max_example_loss_rel_diff": max(loss_diffs),
        "max_example_hidden_rel_diff": max(state_diffs),
        "control_max_example_loss_rel_diff": max(control_loss_diffs),
        "control_max_example_hidden_rel_diff": max(control_state_diffs),
        "tolerance": tolerance,
        "dtype": probe.dtype,
        "packed_seconds": round(packed_seconds, 4),
        "alone_seconds": round(probe.lone_seconds, 4),
    }
    row.details.update(result)
    row.seq_len = int(batch["input_ids"].shape[1])
    row.tokens_per_s = result["tokens"] / packed_seconds
    if plan.cuda:
        row.peak_gpu_gb = round(torch.cuda.max_memory_allocated() / GIB, 2)
    row.note = (
        f"packed vs alone, worst example: loss {result['max_example_loss_rel_diff']:.1e} (sum "
        f"{result['sum_rel_diff']:.1e}), hidden {result['max_example_hidden_rel_diff']:.1e}; tolerance "
        f"{tolerance['loss']:.0e} / {tolerance['hidden']:.0e} ({probe.dtype}); control (positions run on): loss "
        f"{result['control_max_example_loss_rel_diff']:.1e}, hidden {result['control_max_example_hidden_rel_diff']:.1e}"
        f"; {result['examples']} examples in {result['rows']} row(s), {packed_seconds:.3f} s vs "
        f"{probe.lone_seconds:.3f} s one by one"
    )
    problems = []
    if result["labelled_packed"] != result["labelled_alone"]:
        problems.append(f"{result['labelled_packed']} labelled positions packed, {result['labelled_alone']} alone")
    if max(result["max_example_loss_rel_diff"], result["sum_rel_diff"]) > tolerance["loss"]:
        problems.append("packed losses differ from the same examples alone")
    if result["max_example_hidden_rel_diff"] > tolerance["hidden"]:
        problems.append("packed hidden states differ from the same examples alone: contamination or a wrong mask")
    if result["control_max_example_hidden_rel_diff"] <= tolerance["hidden"]:
        problems.append("the control shows no contamination either: this check could not see it")
    if problems:
        row.status, row.note = "failed", "; ".join(problems) + " | " + row.note


def eval_memory_row(row: Row, plan: Plan, model_path: str) -> None:
    """The evaluate stage's eval_loss on one batch of rows x length (the second half of each row labelled):
    max_memory_allocated above the weights, beside full float32 logits and their copy; its loss against the
    loss from full logits, one row at a time."""
    import torch
    from datasets import Dataset

    from qwen_pipeline.evaluation import eval_loss
    from qwen_pipeline.models import load_causal_lm

    rows, length = plan.eval_memory_batch
    ids = torch.randint(0, 151643, (rows, length), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : length // 2] = -100  # the prompt half
    examples = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * length] * rows, "labels": labels.tolist()}
    )
    # as the evaluate node loads it: float32 on the CPU, the saved dtype (bf16) on CUDA
    model = load_causal_lm(model_path, dtype="auto" if plan.cuda else "float32").to(plan.device).eval()
    synchronize()
    if plan.cuda:
        torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() if plan.cuda else 0
    started = time.perf_counter()
    loss, count = eval_loss(model, examples, batch_size=rows)
    synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if plan.cuda else None
    total = 0.0
    with torch.no_grad():  # the reference, one row at a time: full logits of 2,048 positions are 1.2 GB float32
        for r in range(rows):
            logits = model(input_ids=ids[r : r + 1].to(plan.device)).logits.float()
            target = labels[r : r + 1, 1:].to(plan.device)
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], target[0], reduction="sum"))
            del logits
    full_logits = rows * length * VOCAB * 4 * 2  # float32 logits and one float32 copy (log-softmax)
    reference = total / (rows * (length - length // 2))
    result = {
        "batch": [rows, length],
        "eval_loss": loss,
        "eval_tokens": count,
        "full_logits_loss": reference,
        "rel_diff": abs(loss - reference) / reference,
        "seconds": round(seconds, 3),
        "weights_gb": round(weights / GIB, 3),
        "peak_gb": round(peak / GIB, 3) if peak is not None else None,
        "above_weights_gb": round((peak - weights) / GIB, 3) if peak is not None else None,
        "full_logits_gb": round(full_logits / GIB, 2),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    del model
    row.details.update(result)
    row.seq_len, row.tokens_per_s = length, rows * length / seconds
    row.peak_gpu_gb = result["peak_gb"]
    above = f"{result['above_weights_gb']:.2f} GB above the weights" if peak is not None else "no GPU peak on the CPU"
    row.note = (
        f"{above}; full float32 logits + copy would be {result['full_logits_gb']:.1f} GB; eval loss {loss:.4f} vs "
        f"{reference:.4f} from full logits (rel {result['rel_diff']:.1e}) over {count} tokens"
    )
    problems = []
    if count != rows * (length - length // 2) or not math.isfinite(loss) or result["rel_diff"] > EVAL_LOSS_TOLERANCE:
        problems.append("eval_loss is not the full-logits loss")
    if peak is not None and peak - weights >= full_logits / 2:
        problems.append("the evaluation held a full float32 copy of the logits")
    if problems:
        row.status, row.note = "failed", "; ".join(problems) + " | " + row.note


# --- merge and evaluate ----------------------------------------------------------------------------


def merge_row(row: Row, adapter_dir: Path, merged_dir: Path, plan: Plan) -> None:
    """The merge stage's three nodes and the merged_model dataset's save, as ``kedro run --pipelines merge``."""
    import torch

    from qwen_pipeline.config import MergeConfig, ModelConfig
    from qwen_pipeline.datasets import BaseModel, ModelDataset
    from qwen_pipeline.pipelines.merge.nodes import check_merged_model, merge_adapter, publish_merged_model

    if plan.cuda:
        torch.cuda.reset_peak_memory_stats()
    params = {"export_device": MergeConfig(export_device=plan.device).export_device}
    trained = ModelDataset(filepath=str(adapter_dir), lazy=True).load()
    staged = merge_adapter(trained, BaseModel(ModelConfig(trained.base_model)), params)
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
    from qwen_pipeline.embedded import EMBEDDED_MODEL, ensure_embedded_model

    rows, paths = [], {EMBEDDED_MODEL: str(ensure_embedded_model())}
    for shape in plan.models:
        row = Row("build", shape, "random init, " + ("bf16" if plan.bf16 else "float32"))
        rows.append(run_row(row, BUILD_LIMIT_S, lambda r: build_model(r, shape, work_dir / "models" / shape, plan)))
        if row.status == "ok":
            paths[shape] = row.details["path"]
    return rows, paths


def lora_label(mode: str) -> str:
    return f"lora r{LORA_RANK}" if mode == "lora" else mode


def training_data(plan: Plan) -> dict[int, tuple]:
    """Per pack length: the dataset, its bins' lengths in training order, packing stats; enough bins for a train
    row's W+N steps (the check rows need fewer)."""
    from qwen_pipeline.models import EMBEDDED_MODEL, load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED_MODEL)  # the tokenizer every model here carries
    steps = plan.warmup_steps + plan.steps
    return {
        n: training_set(tokenizer, n, max(steps * plan.accumulation, plan.zero3_steps) * bins_per_micro_batch(plan, n))
        for n in plan.pack_lengths
    }


def check_limit(plan: Plan, limit_s: float) -> float:
    """A check row's limit: its own, within what leaves ZeRO-3, merge and evaluate theirs."""
    return min(limit_s, remaining(plan) - AFTER_TRAIN_RESERVE_S)


def contamination_section(plan: Plan, paths: dict[str, str]) -> list[Row]:
    """A row per (layout, kernel): FlashAttention-2 where it runs (else listed as skipped), and sdpa."""
    name, rows = plan.check_model, []
    kernels = ("fa2", "sdpa") if plan.cuda and flash_attn_importable() else ("sdpa",)
    probes: dict[str, Probe] = {}
    for attention, layout in itertools.product(kernels, ("neat_packing", "padding_free")):
        row = Row("contamination", name, f"{layout} · {attention}", details={"layout": layout, "attention": attention})
        rows.append(row)
        if name not in paths:
            row.status, row.note = "skipped", "its build failed"
            continue
        limit = check_limit(plan, CONTAMINATION_LIMIT_S)
        run_row(row, limit, lambda r: contamination_row(r, plan, probes, paths[name]))
    probes.clear()
    free_memory()
    if "fa2" not in kernels:
        why = "needs CUDA" if not plan.cuda else "flash_attn is not importable"
        for layout in ("neat_packing", "padding_free"):
            rows.append(Row("contamination", name, f"{layout} · fa2", status="skipped", note=why))
    return rows


def check_rows(plan: Plan, paths: dict[str, str], data, peak_tflops: float | None, work_dir: Path) -> list[Row]:
    """fp32 master, QLoRA and eval memory rows on the check model."""
    name, attention, pack_length = plan.check_model, plan.attentions[0], plan.pack_lengths[0]
    fp32 = Row("fp32 master", name, f"full · bf16 · lr 1e-5 · {attention}", pack_length, trains=True)
    qlora = Row("qlora", name, f"lora r{LORA_RANK} on nf4 · {attention}", pack_length, trains=True)
    qlora.details = {"finetuning_type": "lora", "attention": attention, "quantization_bit": 4}
    memory = Row("eval memory", name, f"eval_loss {plan.eval_memory_batch[0]} x {plan.eval_memory_batch[1]}")
    if name not in paths:
        for row in (fp32, qlora, memory):
            row.status, row.note = "skipped", "its build failed"
        return [fp32, qlora, memory]
    path, out = paths[name], work_dir / "runs"
    run_row(
        fp32,
        check_limit(plan, FP32_MASTER_LIMIT_S),
        lambda r: fp32_master_row(r, plan, path, attention, data[pack_length], out),
    )
    qlora_args = (plan, path, parameter_count(path), peak_tflops, data[pack_length], None, out, {"quantization_bit": 4})
    run_row(qlora, check_limit(plan, QLORA_LIMIT_S), lambda r: train_row(r, *qlora_args))
    run_row(memory, check_limit(plan, EVAL_MEMORY_LIMIT_S), lambda r: eval_memory_row(r, plan, path))
    return [fp32, qlora, memory]


def train_section(
    plan: Plan, paths: dict[str, str], data, peak_tflops: float | None, work_dir: Path
) -> tuple[list[Row], dict[str, Path]]:
    """A row per (attention, pack length, model, mode), the preferred kernel first, so what the budget cuts is
    the least wanted; and the first LoRA adapter of each model. A row is skipped, not started to be cut, when
    less time is left than its model's previous row took."""
    rows, adapters, took = [], {}, {}
    for name in plan.train_models:
        if name not in paths:
            rows.append(Row("train", name, status="skipped", note="its build failed"))
    parameters = {name: parameter_count(paths[name]) for name in plan.train_models if name in paths}
    for attention, pack_length, name, mode in itertools.product(
        plan.attentions, plan.pack_lengths, parameters, plan.modes
    ):
        row = Row("train", name, f"{lora_label(mode)} · {attention}", pack_length, trains=True)
        row.details = {"finetuning_type": mode, "attention": attention}
        keep = work_dir / f"trained-{len(adapters)}" if mode == "lora" and name not in adapters else None
        args = (plan, paths[name], parameters[name], peak_tflops, data[pack_length], keep, work_dir / "runs")
        limit = min(TRAIN_ROW_LIMIT_S, remaining(plan) - AFTER_TRAIN_RESERVE_S)
        rows.append(run_row(row, limit, lambda r: train_row(r, *args), min_s=max(5.0, 0.8 * took.get(name, 0.0))))
        if row.seconds is not None:
            took[name] = row.seconds
        if keep is not None and row.status == "ok":
            adapters[name] = keep
    if plan.cuda and "fa2" not in plan.attentions:
        rows.append(
            Row("train", "all", f"lora r{LORA_RANK}, full · fa2", status="skipped", note="flash_attn is not importable")
        )
    return rows, adapters


def zero3_section(plan: Plan, paths: dict[str, str], data, work_dir: Path) -> Row:
    name, attention = plan.check_model, plan.attentions[0]
    row = Row(
        "zero3", name, f"lora r{LORA_RANK} · zero3.json, 1 process · {attention}", plan.pack_lengths[0], trains=True
    )
    if name not in paths:
        row.status, row.note = "skipped", "its build failed"
        return row
    limit = min(ZERO3_LIMIT_S, remaining(plan) - MERGE_LIMIT_S / 2 - EVALUATE_LIMIT_S / 2)
    return run_row(
        row, limit, lambda r: zero3_row(r, plan, paths[name], attention, data[plan.pack_lengths[0]], work_dir / "runs")
    )


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

    from qwen_pipeline.embedded import ensure_embedded_model

    transformers.logging.set_verbosity_error()  # no progress bars in the output (the Trainer reads this)
    ensure_embedded_model()  # its tokenizer is the one every built model gets; the GPU tests use it too
    gpu = card()
    peak = (peak_tflops or PEAK_BF16_TFLOPS.get(card_family(gpu["name"]))) if plan.cuda else None
    # pytest first: it takes what it takes, and the training rows then fill the budget that is left.
    rows = [pytest_section(plan, work_dir)]
    built, paths = build_section(plan, work_dir)
    rows += built
    data = training_data(plan)
    rows += contamination_section(plan, paths)
    rows += check_rows(plan, paths, data, peak, work_dir)
    trained, adapters = train_section(plan, paths, data, peak, work_dir)
    rows += [*trained, zero3_section(plan, paths, data, work_dir)]
    merge = merge_section(plan, adapters, work_dir / "merged")
    rows += [merge, evaluate_section(plan, merge, work_dir / "merged")]
    env = {"card": gpu, "versions": versions(), "plan": dataclasses.asdict(plan), "cuda": torch.cuda.is_available()}
    return rows, env


# --- output ----------------------------------------------------------------------------------------

COLUMNS = (
    "section", "model", "mode", "seq len", "tokens/s", "MFU", "peak GPU GB", "plan GB", "plan/peak", "seconds", "status"
)  # fmt: skip


def cell_status(row: Row) -> str:
    return f"{row.status}: {row.note}" if row.note else row.status


def cells(row: Row) -> list[str]:
    unknown = "n/a" if row.trains else "-"  # a training row that has no figure, or a row that never has one

    def number(value, fmt, missing="-"):
        return missing if value is None else format(value, fmt)

    mfu = unknown if row.mfu is None else f"{100 * row.mfu:.1f}%"
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
        number(row.plan_gb, ".1f", unknown),
        number(plan_ratio(row), ".2f", unknown),
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
