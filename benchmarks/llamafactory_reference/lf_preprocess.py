"""Time LLaMA-Factory 0.9.5's SFT preprocessing (one process) and dump its ids; run in the LLaMA-Factory venv.

Called by benchmarks/format_throughput.py; prints one JSON line with the timing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--dataset-dir", required=True)
    parser.add_argument("--datasets", required=True)
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=None, help="preprocessing_num_workers (default: one process)")
    parser.add_argument("--no-dump", action="store_true", help="time only; write no ids")
    args = parser.parse_args()

    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    with tempfile.TemporaryDirectory() as out:
        model_args, data_args, training_args, _, _ = get_train_args(
            {
                "stage": "sft",
                "do_train": True,
                "model_name_or_path": args.tokenizer,
                "dataset": args.datasets,
                "dataset_dir": args.dataset_dir,
                "template": "qwen",
                "finetuning_type": "lora",
                "output_dir": out,
                "overwrite_cache": True,
                "preprocessing_num_workers": args.workers,
                "cutoff_len": args.cutoff_len,
                "report_to": "none",
            }
        )
        tokenizer_module = load_tokenizer(model_args)
        template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
        started = time.perf_counter()
        module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
        seconds = time.perf_counter() - started
        train = module["train_dataset"]
        rows = [] if args.no_dump else list(zip(train["input_ids"], train["labels"]))
    with open(args.out, "w") as f:
        for ids, labels in rows:
            f.write(json.dumps([ids, labels]) + "\n")
    print(json.dumps({"seconds": seconds, "records": len(train)}))


if __name__ == "__main__":
    main()
