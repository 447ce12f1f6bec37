"""Training throughput: our train stage vs `llamafactory-cli train` (0.9.5), same tiny model, data, batch.

LoRA r8 on all linear layers, batch 4, cutoff 512, one epoch over the demo data (360 conversations),
CPU, one process each, in this run. Prints non-padding tokens/s (all tokens of the training split over the
Trainer's train_runtime) for LLaMA-Factory, ours unpacked and ours padding-free, and the ratios.

    .venv/bin/python benchmarks/train_throughput.py --llamafactory-cli /tmp/lfvenv/bin/llamafactory-cli
    (LLaMA-Factory set up as in benchmarks/llamafactory_reference/README.md)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "01_raw"
COMMON = {
    "lora_rank": 8,
    "lora_alpha": 16,
    "learning_rate": 1e-4,
    "num_train_epochs": 1.0,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "logging_steps": 10,
    "seed": 42,
}


def demo_conversations() -> list:
    """The demo records of data/01_raw as conversations, read here rather than through the ingest and
    validate nodes (whose signatures are changing): alpaca history pairs then instruction + "\n" + input
    -> answer; sharegpt human/gpt turns, a leading system turn as the system prompt; records without an
    answer or of a bad shape dropped, as ingest and validate drop them."""
    from qwen_pipeline.conversation import Conversation, Message, Source

    conversations = []
    for i, record in enumerate(json.loads((RAW / "alpaca_demo.json").read_text())):
        if not isinstance(record.get("output"), str):
            continue  # no answer: ingest rejects it
        turns = [turn for pair in record.get("history") or [] for turn in zip(("user", "assistant"), pair)]
        prompt = "\n".join(part for part in (record["instruction"], record.get("input")) if part)
        turns += [("user", prompt), ("assistant", record["output"])]
        source = Source("alpaca_demo", "alpaca_demo.json", i)
        conversations.append(Conversation(tuple(Message(*t) for t in turns), source, system=record.get("system")))
    roles = {"human": "user", "gpt": "assistant"}
    for i, record in enumerate(json.loads((RAW / "sharegpt_demo.json").read_text())):
        turns = record["conversations"]
        system = turns[0]["value"] if turns and turns[0]["from"] == "system" else None
        messages = tuple(Message(roles[t["from"]], t["value"]) for t in turns[system is not None :])
        conversations.append(Conversation(messages, Source("sharegpt_demo", "sharegpt_demo.json", i), system=system))
    return [c for c in conversations if not c.problems()]


def demo_dataset(cutoff_len: int):
    """The demo conversations through the qwen template (as the format stage does), one train split."""
    from datasets import Dataset, DatasetDict

    from qwen_pipeline.models import EMBEDDED_MODEL, load_tokenizer
    from qwen_pipeline.template import TemplateOptions, encode_conversations

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    encoded = encode_conversations(demo_conversations(), tokenizer, TemplateOptions(cutoff_len=cutoff_len))
    columns = {"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded]}
    return DatasetDict({"train": Dataset.from_dict(columns)})


def run_ours(mode: str, cutoff_len: int) -> dict:
    from qwen_pipeline.config import ModelConfig, TrainConfig
    from qwen_pipeline.training.recipe import run_sft

    dataset = demo_dataset(cutoff_len)
    tokens = sum(len(x) for x in dataset["train"]["input_ids"])
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(**COMMON, padding_free=mode == "padding_free", output_dir=out)
        summary = run_sft(dataset, ModelConfig(), config).summary
    return {"tokens": tokens, "seconds": summary["train_runtime_s"], "loss": summary["train_loss"]}


def run_llamafactory(cli: str, model_dir: str, cutoff_len: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        config = {
            "model_name_or_path": model_dir,
            "stage": "sft",
            "do_train": True,
            "finetuning_type": "lora",
            "lora_target": "all",
            "dataset": "alpaca_demo,sharegpt_demo",
            "dataset_dir": str(ROOT / "data/01_raw"),
            "template": "qwen",
            "cutoff_len": cutoff_len,
            "output_dir": out,
            "overwrite_output_dir": True,
            "report_to": "none",
            "lr_scheduler_type": "cosine",
            "save_strategy": "no",
            **COMMON,
        }
        import yaml

        (Path(out) / "train.yaml").write_text(yaml.safe_dump(config))  # its JSON reader is broken in 0.9.5
        env = {**os.environ, "PYTHONPATH": os.environ.get("LLAMAFACTORY_PYTHONPATH", "/tmp/lfstub")}
        proc = subprocess.run([cli, "train", str(Path(out) / "train.yaml")], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"llamafactory-cli failed:\n{proc.stderr[-3000:]}")
        results = json.loads((Path(out) / "train_results.json").read_text())
    return {"seconds": results["train_runtime"], "loss": results["train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llamafactory-cli", help="llamafactory-cli of a venv with llamafactory==0.9.5")
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--side", choices=["unpacked", "padding_free"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # child process
        print(json.dumps(run_ours(args.side, args.cutoff_len)))
        return
    from qwen_pipeline.models import ensure_embedded_model

    model_dir = str(ensure_embedded_model())
    results = {}
    for mode in ("unpacked", "padding_free"):
        proc = subprocess.run(
            [sys.executable, __file__, "--side", mode, "--cutoff-len", str(args.cutoff_len)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        results[f"ours, {mode}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    tokens = results["ours, unpacked"]["tokens"]
    if args.llamafactory_cli:
        results["LLaMA-Factory 0.9.5"] = run_llamafactory(args.llamafactory_cli, model_dir, args.cutoff_len)
    print(f"tiny Qwen2.5 (vocab 151,936), LoRA r8, batch 4, cutoff {args.cutoff_len}, one epoch, {tokens} tokens, CPU")
    for name, r in results.items():
        rate = tokens / r["seconds"]
        print(f"  {name}: {rate:,.0f} non-padding tokens/s ({r['seconds']:.1f} s, train loss {r['loss']:.3f})")
    if "LLaMA-Factory 0.9.5" in results:
        reference = tokens / results["LLaMA-Factory 0.9.5"]["seconds"]
        for name in ("ours, unpacked", "ours, padding_free"):
            print(f"  ratio {name} / LLaMA-Factory: {tokens / results[name]['seconds'] / reference:.2f}x")


if __name__ == "__main__":
    main()
