"""Training throughput: our train stage vs `llamafactory-cli train` (0.9.5), same model, data, batch, settings.

Per mode (``--modes``, default all): LoRA r8 on all linear layers, DoRA, QLoRA (4-bit nf4, double
quantization) and full fine-tuning; ours unpacked and padding-free, LLaMA-Factory unpacked (it has no
padding-free: our padding-free row is compared against its unpacked run of the same mode). Every run is a
fresh child process, one at a time, interleaved (ours unpacked, theirs, ours padding-free, per mode, then
the next repeat), so a noisy stretch of the machine hits both sides. Both sides: the same demo records in
dataset order (no shuffling), float32, AdamW, cosine schedule without warm-up, lr 1e-4, seed 42, no gradient
checkpointing (LLaMA-Factory turns it on by default: off here so both do the same work).

tokens/s = non-padding tokens of the examples the steps consumed (max_steps x batch, in order, wrapping
around as the Trainer's sequential sampler does) / train_runtime (ours: the time around ``trainer.train``;
theirs: the Trainer's ``train_runtime``). Peak RSS = the child's maximum resident set (wait4). The ratio is
ours/theirs per repeat, median (range over the repeats).

Shapes (``--shape``):
- tiny (default): the embedded tiny Qwen2.5 (vocab 151,936), batch 4, cutoff 512, one epoch over the demo
  data (360 conversations);
- qwen2.5-0.5b: the real Qwen2.5-0.5B config (494M parameters, tied embeddings) with random weights, built
  once into the project cache with the embedded model's tokenizer; batch 2, cutoff 256, 8 steps over the
  first 8 records of each demo dataset (16 conversations, 40-90 tokens each).

    .venv/bin/python benchmarks/train_throughput.py --llamafactory-cli /tmp/lfvenv/bin/llamafactory-cli
    .venv/bin/python benchmarks/train_throughput.py --shape qwen2.5-0.5b --repeat 3 \\
        --llamafactory-cli /tmp/lfvenv/bin/llamafactory-cli
    (LLaMA-Factory set up as in benchmarks/llamafactory_reference/README.md)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "01_raw"
COMMON = {  # the same names and meanings in our TrainConfig and LLaMA-Factory's YAML
    "lora_rank": 8,
    "lora_alpha": 16,
    "learning_rate": 1e-4,
    "lr_scheduler_type": "cosine",
    "gradient_accumulation_steps": 1,
    "seed": 42,
}
MODES = {
    "lora": {"finetuning_type": "lora"},
    "dora": {"finetuning_type": "lora", "use_dora": True},
    "qlora4": {"finetuning_type": "lora", "quantization_bit": 4},  # nf4 + double quantization on both sides
    "full": {"finetuning_type": "full"},
}
LAYOUTS = ("unpacked", "padding_free")
QWEN25_05B_PARAMETERS = 494_032_768


@dataclass(frozen=True)
class Shape:
    batch: int
    cutoff_len: int
    max_steps: int  # -1: one epoch
    max_samples: int | None  # the first N records of each demo dataset (None: all)
    logging_steps: int

    def schedule(self) -> dict:
        steps = {"max_steps": self.max_steps} if self.max_steps > 0 else {"num_train_epochs": 1.0}
        return {"per_device_train_batch_size": self.batch, "logging_steps": self.logging_steps, **steps}


SHAPES = {
    "tiny": Shape(batch=4, cutoff_len=512, max_steps=-1, max_samples=None, logging_steps=10),
    "qwen2.5-0.5b": Shape(batch=2, cutoff_len=256, max_steps=8, max_samples=8, logging_steps=1),
}


def demo_conversations(max_samples: int | None = None) -> list:
    """The demo records of data/01_raw as conversations, read here rather than through the ingest and
    validate nodes (whose signatures are changing): alpaca history pairs then instruction + "\n" + input
    -> answer; sharegpt human/gpt turns, a leading system turn as the system prompt; records without an
    answer or of a bad shape dropped, as ingest and validate drop them. ``max_samples`` keeps the first N
    records of each file before anything is dropped, as LLaMA-Factory's ``max_samples`` does."""
    from qwen_pipeline.conversation import Conversation, Message, Source

    conversations = []
    for i, record in enumerate(json.loads((RAW / "alpaca_demo.json").read_text())[:max_samples]):
        if not isinstance(record.get("output"), str):
            continue  # no answer: ingest rejects it
        turns = [turn for pair in record.get("history") or [] for turn in zip(("user", "assistant"), pair)]
        prompt = "\n".join(part for part in (record["instruction"], record.get("input")) if part)
        turns += [("user", prompt), ("assistant", record["output"])]
        source = Source("alpaca_demo", "alpaca_demo.json", i)
        conversations.append(Conversation(tuple(Message(*t) for t in turns), source, system=record.get("system")))
    roles = {"human": "user", "gpt": "assistant"}
    for i, record in enumerate(json.loads((RAW / "sharegpt_demo.json").read_text())[:max_samples]):
        turns = record["conversations"]
        system = turns[0]["value"] if turns and turns[0]["from"] == "system" else None
        messages = tuple(Message(roles[t["from"]], t["value"]) for t in turns[system is not None :])
        conversations.append(Conversation(messages, Source("sharegpt_demo", "sharegpt_demo.json", i), system=system))
    return [c for c in conversations if not c.problems()]


def demo_dataset(shape: Shape):
    """The demo conversations through the qwen template (as the format stage does), one train split."""
    from datasets import Dataset, DatasetDict

    from qwen_pipeline.models import EMBEDDED_MODEL, load_tokenizer
    from qwen_pipeline.template import TemplateOptions, encode_conversations

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    options = TemplateOptions(cutoff_len=shape.cutoff_len)
    encoded = encode_conversations(demo_conversations(shape.max_samples), tokenizer, options)
    columns = {"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded]}
    return DatasetDict({"train": Dataset.from_dict(columns)})


def consumed_tokens(lengths: list[int], shape: Shape) -> tuple[int, int]:
    """(steps, non-padding tokens) the Trainer's sequential sampler feeds: batches in order, from the
    start again after the last (which may be short)."""
    batches = [sum(lengths[i : i + shape.batch]) for i in range(0, len(lengths), shape.batch)]
    steps = shape.max_steps if shape.max_steps > 0 else len(batches)
    return steps, sum(batches[s % len(batches)] for s in range(steps))


def model_dir(shape_name: str) -> Path:
    """The model folder: the embedded tiny model, or a 0.5B-shaped one with random weights, built once
    (float32 safetensors, ~2 GB) beside it in the project cache with the same tokenizer files."""
    from qwen_pipeline.embedded import cache_dir, ensure_embedded_model

    embedded = ensure_embedded_model()
    if shape_name == "tiny":
        return embedded
    target = cache_dir() / "benchmarks" / "qwen2.5-0.5b-random-float32"
    if (target / "config.json").is_file():
        return target
    import torch
    from gpu_check import qwen25_config  # benchmarks/ is on sys.path: this script's folder
    from transformers import AutoModelForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        torch.manual_seed(0)
        config = qwen25_config("0.5B", "float32")  # the real Qwen2.5-0.5B config.json values
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        count = sum(p.numel() for p in model.parameters())
        if count != QWEN25_05B_PARAMETERS:
            raise SystemExit(f"{count:,} parameters built, Qwen2.5-0.5B has {QWEN25_05B_PARAMETERS:,}")
        model.save_pretrained(tmp, max_shard_size="5GB")
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(embedded / name, tmp / name)
        tmp.rename(target)  # complete or absent: config.json is what the check above looks for
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run_ours(shape: Shape, mode: str, layout: str, model: str) -> dict:
    """In a child process: the train stage's recipe on the demo dataset."""
    from qwen_pipeline.config import ModelConfig, TrainConfig
    from qwen_pipeline.training.recipe import run_sft

    dataset = demo_dataset(shape)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            **COMMON,
            **shape.schedule(),
            **MODES[mode],
            padding_free=layout == "padding_free",
            shuffle=False,
            overwrite_output_dir=True,
            output_dir=out,
        )
        summary = run_sft(dataset, ModelConfig(model_name_or_path=model), config).summary
    return {"seconds": summary["train_runtime_s"], "loss": summary["train_loss"], "steps": summary["global_steps"]}


def llamafactory_config(shape: Shape, mode: str, model: str, out: str) -> dict:
    return {
        "model_name_or_path": model,
        "stage": "sft",
        "do_train": True,
        "lora_target": "all",
        "dataset": "alpaca_demo,sharegpt_demo",
        "dataset_dir": str(RAW),
        "template": "qwen",
        "cutoff_len": shape.cutoff_len,
        **({"max_samples": shape.max_samples} if shape.max_samples else {}),
        "disable_shuffling": True,
        "disable_gradient_checkpointing": True,  # on by default there; off in ours
        "output_dir": out,
        "overwrite_output_dir": True,
        "report_to": "none",
        "save_strategy": "no",
        **COMMON,
        **shape.schedule(),
        **MODES[mode],
    }


def measure(command: list[str], env: dict | None = None) -> dict:
    """Run one child process; its output, exit status and peak RSS (ru_maxrss of wait4, KiB on Linux)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        log.seek(0)
        output = log.read()
    return {"ok": status == 0, "output": output, "peak_rss_mb": usage.ru_maxrss / 1024}


def measure_ours(args: argparse.Namespace, shape: Shape, mode: str, layout: str, model: str) -> dict:
    command = [sys.executable, __file__, "--shape", args.shape, "--side", f"{mode}:{layout}", "--model", model]
    command += ["--max-steps", str(shape.max_steps)]
    run = measure(command)
    if not run["ok"]:
        return {"error": run["output"][-3000:]}
    return {**json.loads(run["output"].strip().splitlines()[-1]), "peak_rss_mb": run["peak_rss_mb"]}


def measure_llamafactory(args: argparse.Namespace, shape: Shape, mode: str, model: str) -> dict:
    import yaml

    with tempfile.TemporaryDirectory() as out:
        config = llamafactory_config(shape, mode, model, out)
        (Path(out) / "train.yaml").write_text(yaml.safe_dump(config))  # its JSON reader is broken in 0.9.5
        env = {**os.environ, "PYTHONPATH": os.environ.get("LLAMAFACTORY_PYTHONPATH", "/tmp/lfstub")}
        run = measure([args.llamafactory_cli, "train", str(Path(out) / "train.yaml")], env)
        if not run["ok"]:
            return {"error": run["output"][-3000:]}
        results = json.loads((Path(out) / "train_results.json").read_text())
        steps = json.loads((Path(out) / "trainer_state.json").read_text())["global_step"]
    return {"seconds": results["train_runtime"], "loss": results["train_loss"], "steps": steps, **run}


def spread(values: list[float], fmt: str) -> str:
    """median (min-max), or the one value when they all print the same."""
    if not values:
        return "-"
    if format(min(values), fmt) == format(max(values), fmt):
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def report(runs: dict, tokens: int) -> list[str]:
    """One line per (mode, side): tokens/s, peak RSS, train loss, ratio to LLaMA-Factory's unpacked run
    of the same mode and repeat."""
    lines = [f"{'mode':7} {'side':26} {'tokens/s':>22} {'peak RSS MB':>22} {'train loss':>15}  ours/theirs"]
    for (mode, side), results in runs.items():
        good = [r for r in results if "error" not in r]
        theirs = runs.get((mode, "LLaMA-Factory unpacked"), [])
        ratios = [
            (tokens / o["seconds"]) / (tokens / t["seconds"])
            for o, t in zip(results, theirs)
            if side.startswith("ours") and "error" not in o and "error" not in t
        ]
        failed = f"  [{len(results) - len(good)} failed]" if len(good) < len(results) else ""
        lines.append(
            f"{mode:7} {side:26} {spread([tokens / r['seconds'] for r in good], ',.1f'):>22} "
            f"{spread([r['peak_rss_mb'] for r in good], ',.0f'):>22} "
            f"{spread([r['loss'] for r in good], '.4f'):>15}  {spread(ratios, '.2f') if ratios else ''}{failed}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llamafactory-cli", help="llamafactory-cli of a venv with llamafactory==0.9.5")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--modes", default="all", help=f"comma-separated of {', '.join(MODES)} (default all)")
    parser.add_argument("--repeat", type=int, default=1, help="run everything N times, interleaved")
    parser.add_argument("--max-steps", type=int, help="optimizer steps per run (default: the shape's)")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # child process: MODE:LAYOUT
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    if args.max_steps:
        shape = dataclasses.replace(shape, max_steps=args.max_steps)
    if args.side:
        mode, layout = args.side.split(":")
        print(json.dumps(run_ours(shape, mode, layout, args.model)))
        return
    modes = list(MODES) if args.modes == "all" else [m.strip() for m in args.modes.split(",")]
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    started = time.perf_counter()
    model = str(model_dir(args.shape))
    lengths = [len(x) for x in demo_dataset(shape)["train"]["input_ids"]]
    steps, tokens = consumed_tokens(lengths, shape)
    header = (
        f"{args.shape} ({model}), batch {shape.batch}, cutoff {shape.cutoff_len}, {steps} steps, "
        f"{len(lengths)} conversations, {tokens:,} non-padding tokens consumed per run, float32, CPU; "
        "median (range) over the runs so far, interleaved\n"
        "ours/theirs: against LLaMA-Factory 0.9.5's unpacked run of the same mode and repeat (no padding-free there)"
    )
    sides = ["ours unpacked", "LLaMA-Factory unpacked", "ours padding-free"]
    sides = sides if args.llamafactory_cli else [s for s in sides if s.startswith("ours")]
    runs: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(args.repeat):
        for mode in modes:
            for side in sides:
                result = measure_side(args, shape, mode, side, model)
                if "error" not in result and result["steps"] != steps:
                    result = {"error": f"{result['steps']} steps run, {steps} expected"}
                runs.setdefault((mode, side), []).append(result)
                done = (
                    f"ERROR\n{result['error']}"
                    if "error" in result
                    else f"{tokens / result['seconds']:,.1f} tokens/s, {result['seconds']:.2f} s, "
                    f"loss {result['loss']:.4f}, peak RSS {result['peak_rss_mb']:,.0f} MB"
                )
                load = os.getloadavg()[0]  # a busy machine explains outliers
                elapsed = time.perf_counter() - started
                print(f"[{elapsed:7.1f} s, load {load:.1f}] run {repeat + 1}/{args.repeat} {mode} {side}: {done}")
                sys.stdout.flush()
        # the table after every round: a long run cut short still leaves one
        print(f"\nafter {repeat + 1} of {args.repeat} round(s), {time.perf_counter() - started:.0f} s: {header}")
        print("\n".join(report(runs, tokens)) + "\n", flush=True)


def measure_side(args: argparse.Namespace, shape: Shape, mode: str, side: str, model: str) -> dict:
    if side.startswith("LLaMA-Factory"):
        return measure_llamafactory(args, shape, mode, model)
    return measure_ours(args, shape, mode, "padding_free" if side.endswith("padding-free") else "unpacked", model)


if __name__ == "__main__":
    main()
