"""Produce LLaMA-Factory 0.9.5's SFT token ids and labels for our parity datasets (reference outputs).

Runs inside a separate environment with `llamafactory==0.9.5` installed (see README.md beside this
file); it only calls LLaMA-Factory's public entry points and writes JSON. Usage:

    python make_golden.py --tokenizer DIR --dataset-dir tests/fixtures/parity --out tests/fixtures/parity/golden.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

TEXT = ["alpaca_parity", "sharegpt_parity"]
# (name, datasets, overrides of the LLaMA-Factory arguments)
SETTINGS = [
    ("default", TEXT, {"cutoff_len": 1024}),
    ("train_on_prompt", TEXT, {"cutoff_len": 1024, "train_on_prompt": True}),
    ("mask_history", TEXT, {"cutoff_len": 1024, "mask_history": True}),
    ("cutoff_128", TEXT, {"cutoff_len": 128}),
    ("cutoff_40", TEXT, {"cutoff_len": 40}),
    ("mask_history_cutoff_128", TEXT, {"cutoff_len": 128, "mask_history": True}),
    ("openai", ["openai_parity"], {"cutoff_len": 1024}),
    ("interleave_under", TEXT, {"cutoff_len": 1024, "mix_strategy": "interleave_under", "interleave_probs": "0.3,0.7"}),
    ("interleave_over", TEXT, {"cutoff_len": 1024, "mix_strategy": "interleave_over"}),
    # empty and whitespace prompts, empty answers, function calls with no tool result and tool results with no call
    ("edge", ["alpaca_edge", "sharegpt_edge"], {"cutoff_len": 1024}),
]


def encode(tokenizer_dir: str, dataset_dir: str, datasets: list[str], overrides: dict) -> list[dict]:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    with tempfile.TemporaryDirectory() as out:
        args = {
            "stage": "sft",
            "do_train": True,
            "model_name_or_path": tokenizer_dir,
            "dataset": ",".join(datasets),
            "dataset_dir": dataset_dir,
            "template": "qwen",
            "finetuning_type": "lora",
            "output_dir": out,
            "overwrite_cache": True,
            "preprocessing_num_workers": None,
            "report_to": "none",
            **overrides,
        }
        model_args, data_args, training_args, _, _ = get_train_args(args)
        tokenizer_module = load_tokenizer(model_args)
        template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
        module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
        train = module["train_dataset"]
        return [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in train]


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True, help="a model dir holding the Qwen2.5 tokenizer")
    parser.add_argument("--dataset-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import llamafactory

    info = json.loads((Path(args.dataset_dir) / "dataset_info.json").read_text())
    golden = {"llamafactory": llamafactory.__version__, "template": "qwen", "seed": 42, "settings": {}}
    for name, datasets, overrides in SETTINGS:
        assert all(d in info for d in datasets)
        examples = encode(args.tokenizer, args.dataset_dir, datasets, overrides)
        golden["settings"][name] = {"datasets": datasets, "args": overrides, "examples": examples}
    Path(args.out).write_text(json.dumps(golden, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
