"""Evaluation memory: a train run's peak memory with 10,000 validation examples vs 1,000.

Each size runs in its own process: the train recipe (``run_sft``) on the embedded model, 64 training examples,
``max_steps`` steps with an evaluation every ``--eval-steps`` (default: one step, one evaluation), over the whole
validation split (examples of 150-250 tokens, 32 a batch). Prints the peak RSS and seconds of each, and the
ratio of the peaks (the target: within 10%, memory that does not grow with the split).

    .venv/bin/python benchmarks/eval_memory.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from scale import median_range  # noqa: E402


def examples(count: int, seed: int) -> list[dict]:
    """Tokenized examples of 150-250 tokens, the first half prompt (masked), the rest answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        length = rng.randint(150, 250)
        ids = [rng.randrange(200, 150_000) for _ in range(length)]
        rows.append(
            {"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * (length // 2) + ids[length // 2 :]}
        )
    return rows


def one_run(validation: int, eval_steps: int, max_steps: int, work: str) -> dict:
    """In a child process: train with evaluations; its peak RSS and seconds per evaluation."""
    from datasets import Dataset, DatasetDict

    from qwen_pipeline.config import ModelConfig, TrainConfig
    from qwen_pipeline.training.recipe import run_sft

    data = DatasetDict(
        {"train": Dataset.from_list(examples(64, 0)), "validation": Dataset.from_list(examples(validation, 1))}
    )
    config = TrainConfig(
        max_steps=max_steps, per_device_train_batch_size=4, per_device_eval_batch_size=32,
        gradient_accumulation_steps=1, eval_strategy="steps", eval_steps=eval_steps, output_dir=work,
        memory_check="off",
    )  # fmt: skip
    started = time.perf_counter()
    result = run_sft(data, ModelConfig(), config)
    seconds = time.perf_counter() - started
    evaluations = result.summary["evaluations"]
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": seconds,
        "evaluations": evaluations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[1_000, 10_000])
    parser.add_argument("--eval-steps", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_run(args.child, args.eval_steps, args.max_steps, args.work)))
        return
    peaks: dict[int, list[float]] = {n: [] for n in args.sizes}
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1"}
    for round_ in range(args.repeat):
        for n in args.sizes:
            with tempfile.TemporaryDirectory() as work:
                command = [sys.executable, __file__, "--child", str(n), "--work", work]
                command += ["--eval-steps", str(args.eval_steps), "--max-steps", str(args.max_steps)]
                out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                result = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[n].append(result["peak_rss_mb"])
            print(
                f"round {round_ + 1}: {n:,} validation examples: peak RSS {result['peak_rss_mb']:.0f} MB, "
                f"{result['evaluations']} evaluations, {result['seconds']:.1f} s"
            )
    small, large = args.sizes
    ratios = [b / a for a, b in zip(peaks[small], peaks[large])]
    print(f"peak RSS, {large:,} / {small:,} validation examples: {median_range(ratios)}")


if __name__ == "__main__":
    main()
