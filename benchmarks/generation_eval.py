"""Generation eval overhead: seconds per evaluation's answers vs seconds per training step, at the demo's settings.

Trains on the demo data's tokenized train split (the embedded model, ``conf/base/parameters_train.yml``'s
batch size and learning rate) for ``--max-steps`` steps, evaluating every ``--eval-steps`` with
``train.generation_eval`` answering ``--samples`` validation prompts of up to ``--max-new-tokens`` tokens. Prints
the seconds per generation eval (the summary's ``generation_eval_seconds``), the seconds per training step of
the same run, and their ratio.

    .venv/bin/python benchmarks/generation_eval.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from scale import median_range  # noqa: E402


def one_run(args: argparse.Namespace, work: str) -> dict:
    """In a child process: the demo's train and validation splits, trained with generation eval."""
    from datasets import DatasetDict
    from helpers import demo_examples

    from qwen_pipeline.config import ModelConfig, TrainConfig, parse_config
    from qwen_pipeline.models import EMBEDDED_MODEL, load_tokenizer
    from qwen_pipeline.training.recipe import run_sft

    demo = yaml.safe_load((ROOT / "conf/base/parameters_train.yml").read_text())["train"]
    examples = demo_examples(load_tokenizer(EMBEDDED_MODEL), cutoff_len=512)
    split = examples.train_test_split(test_size=0.1, seed=42)
    settings = {
        **demo,
        "max_steps": args.max_steps,
        "eval_strategy": "steps",
        "eval_steps": args.eval_steps,
        "eval_max_samples": args.samples,  # the eval loss on as many examples as are answered
        "generation_eval": {"samples": args.samples, "max_new_tokens": args.max_new_tokens},
        "output_dir": work,
        "memory_check": "off",
    }
    config = parse_config(TrainConfig, settings, "train")
    result = run_sft(DatasetDict({"train": split["train"], "validation": split["test"]}), ModelConfig(), config)
    summary = result.summary
    step = (summary["train_runtime_s"] - summary["generation_eval_seconds"] * summary["evaluations"]) / args.max_steps
    return {"generation_s": summary["generation_eval_seconds"], "step_s": step, "evaluations": summary["evaluations"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args, args.work)))
        return
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1"}
    ratios, generation, steps = [], [], []
    for round_ in range(args.repeat):
        with tempfile.TemporaryDirectory() as work:
            command = [sys.executable, __file__, "--child", "--work", work, "--samples", str(args.samples)]
            command += ["--max-new-tokens", str(args.max_new_tokens), "--max-steps", str(args.max_steps)]
            command += ["--eval-steps", str(args.eval_steps)]
            out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            result = json.loads(out.stdout.strip().splitlines()[-1])
        generation.append(result["generation_s"])
        steps.append(result["step_s"])
        ratios.append(result["generation_s"] / result["step_s"])
        print(
            f"round {round_ + 1}: {result['evaluations']} evaluations, {args.samples} answers of up to "
            f"{args.max_new_tokens} tokens: {result['generation_s']:.2f} s each; "
            f"a training step {result['step_s']:.2f} s"
        )
    print(f"seconds per generation eval: {median_range(generation)}; per training step: {median_range(steps)}")
    print(f"generation eval / training step: {median_range(ratios)}")


if __name__ == "__main__":
    main()
