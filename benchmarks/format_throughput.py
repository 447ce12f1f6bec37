"""Format throughput: our ingest+validate+format vs LLaMA-Factory 0.9.5's SFT preprocessing.

Both tokenize the same generated records (half alpaca, half sharegpt) with the same tokenizer (the
embedded Qwen2.5 one), in one process each, in this run; the outputs are checked to be identical.
Ours is timed from the files to the tokenized dataset (ingest, validate, format), LLaMA-Factory's
get_dataset likewise, both with the tokenizer already loaded. Prints records/s and tokens/s for
both, the ratio, peak RSS of both, and the raw ceiling: one batched tokenizer call over the same
rendered texts (that call alone is timed), and a stricter one: the Rust core's encode_batch_fast
alone. ``--repeat N`` runs every side N times, round after round, and prints medians and ranges
(ratios within a round share the machine's load).

    .venv/bin/python benchmarks/format_throughput.py --llamafactory-python /tmp/lfvenv/bin/python --repeat 3
    (set up the LLaMA-Factory venv as in benchmarks/llamafactory_reference/README.md; its side runs with
    PYTHONPATH=/tmp/lfstub, its torchaudio stand-in, or $LLAMAFACTORY_PYTHONPATH; without
    --llamafactory-python only ours runs)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the model learns from each example and the loss goes down while the tokenizer splits words into pieces "
    "data pipeline training merge evaluate recipe batch gradient token label mask answer question system user"
).split()
SYLLABLES = "ka to ri men sa lo vi der pha gu stro nel ex qui bra zo tion ment ing pre con".split()
ZH = "我们今天训练一个模型数据很重要每个例子都有问题和答案中文分词语言学习"
CODE = ["def f(x):\n    return x + 1\n", "for i in range(10):\n    print(i)\n", '{"key": [1, 2, 3]}']


def _word(rng: random.Random) -> str:
    # Half real words, half made-up ones: real text keeps the BPE cache from answering everything.
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))


def _text(rng: random.Random, n: int) -> str:
    if rng.random() < 0.15:
        text = "".join(rng.choice(ZH) for _ in range(n))
    else:
        text = " ".join(_word(rng) for _ in range(n))
    if rng.random() < 0.1:
        text += "\n" + rng.choice(CODE)
    if rng.random() < 0.03:
        text = rng.choice(["\n", "  "]) + text
    return text


def make_records(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    alpaca, sharegpt = [], []
    for i in range(n):
        if i % 2 == 0:
            rec = {
                "instruction": _text(rng, rng.randint(5, 40)),
                "input": _text(rng, rng.randint(0, 30)),
                "output": _text(rng, rng.randint(10, 80)),
            }
            if rng.random() < 0.2:
                rec["system"] = _text(rng, 8)
            if rng.random() < 0.2:
                rec["history"] = [[_text(rng, 10), _text(rng, 20)]]
            alpaca.append(rec)
        else:
            turns = []
            for _ in range(rng.randint(1, 3)):
                turns += [
                    {"from": "human", "value": _text(rng, rng.randint(5, 30))},
                    {"from": "gpt", "value": _text(rng, rng.randint(10, 50))},
                ]
            if rng.random() < 0.2:
                turns.insert(0, {"from": "system", "value": _text(rng, 8)})
            sharegpt.append({"conversations": turns})
    return alpaca, sharegpt


def write_data(folder: Path, n: int) -> list[str]:
    alpaca, sharegpt = make_records(n)
    (folder / "alpaca_bench.json").write_text(json.dumps(alpaca, ensure_ascii=False))
    (folder / "sharegpt_bench.json").write_text(json.dumps(sharegpt, ensure_ascii=False))
    info = {
        "alpaca_bench": {
            "file_name": "alpaca_bench.json",
            "columns": {
                "prompt": "instruction",
                "query": "input",
                "response": "output",
                "system": "system",
                "history": "history",
            },
        },
        "sharegpt_bench": {"file_name": "sharegpt_bench.json", "formatting": "sharegpt"},
    }
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return list(info)


def stages(dataset_dir: str, datasets: list[str], format_params: dict):
    """ingest -> validate -> format, one process, as the nodes run them (no previous run to reuse)."""
    from qwen_pipeline.config import ModelConfig
    from qwen_pipeline.datasets import BaseModel, DatasetInfoDataset
    from qwen_pipeline.models import EMBEDDED_MODEL
    from qwen_pipeline.pipelines.format.nodes import tokenize_conversations
    from qwen_pipeline.pipelines.ingest.nodes import ingest_datasets
    from qwen_pipeline.pipelines.validate.nodes import validate_conversations

    processing = {"num_proc": 1}
    raw = DatasetInfoDataset(filepath=str(Path(dataset_dir) / "dataset_info.json")).load()
    records, _ = ingest_datasets(raw, None, {"dataset": datasets}, processing)
    kept, _, _, _ = validate_conversations(records, None, {}, processing)
    if format_params is None:
        return kept.data
    base = BaseModel(ModelConfig(EMBEDDED_MODEL))
    splits, report, _ = tokenize_conversations(kept, None, base, format_params, processing)
    return splits.data, report


def run_ours(dataset_dir: str, datasets: list[str], cutoff_len: int, out: str, compare: bool) -> dict:
    """One pass of our stages on the files, tokenizer already loaded (as on the LLaMA-Factory side, whose
    get_dataset is handed a loaded one): the format node's own load_tokenizer call gets this one back
    instead of reading the files again (1.3-2.3 s here)."""
    from qwen_pipeline import models

    loaded = models.load_tokenizer(models.EMBEDDED_MODEL)
    models.load_tokenizer = lambda *args, **kwargs: loaded  # before the node's module imports it
    # The stages' modules imported before the clock too (0.5 s, mostly `datasets`), as LLaMA-Factory's
    # side imports get_dataset before starting its own.
    importlib.import_module("qwen_pipeline.datasets")
    for stage in ("ingest", "validate", "format"):
        importlib.import_module(f"qwen_pipeline.pipelines.{stage}.nodes")
    started = time.perf_counter()
    splits, report = stages(dataset_dir, datasets, {"cutoff_len": cutoff_len, "compare_tokenizations": compare})
    seconds = time.perf_counter() - started
    train = splits["train"]
    with open(out, "w") as f:
        for ids, labels in zip(train["input_ids"], train["labels"]):
            f.write(json.dumps([ids, labels]) + "\n")
    return {"seconds": seconds, "records": len(train), "tokens": report["tokens"]}


def run_ceiling(dataset_dir: str, datasets: list[str]) -> dict:
    """The ceiling: one batched call of the Rust tokenizer over the same rendered texts."""
    from qwen_pipeline.conversation import ConversationColumns
    from qwen_pipeline.models import EMBEDDED_MODEL, load_tokenizer
    from qwen_pipeline.template import render

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    pieces = render(ConversationColumns.from_table(stages(dataset_dir, datasets, None).with_format("arrow")[:]))
    texts = [pieces.text(k) for k in range(len(pieces))]
    started = time.perf_counter()
    tokenizer(texts, add_special_tokens=False)
    seconds = time.perf_counter() - started
    # Stricter: the Rust core alone, no offsets, ids left in Rust (what no stage can beat: it must read them).
    started = time.perf_counter()
    tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return {"seconds": seconds, "records": len(texts), "rust_seconds": time.perf_counter() - started}


def child(cmd: list[str], env: dict | None = None) -> tuple[dict, float]:
    """Run one side in its own process; return its JSON line and its peak RSS in MiB."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def one_round(args: argparse.Namespace, tmp: str, datasets: list[str], tokenizer_dir: str) -> dict:
    """Every side once, back to back: its JSON line, peak RSS, and whether the outputs are identical."""
    me = [sys.executable, __file__, "--side", "ours", "--dataset-dir", tmp, "--cutoff-len", str(args.cutoff_len)]
    found = {"rss": {}}
    found["ours"], found["rss"]["ours"] = child([*me, "--out", f"{tmp}/ours.jsonl"])
    found["ours_only"], _ = child([*me, "--out", f"{tmp}/ours2.jsonl", "--no-compare"])
    found["ceiling"], _ = child([sys.executable, __file__, "--side", "ceiling", "--dataset-dir", tmp])
    if args.llamafactory_python:
        script = Path(__file__).parent / "llamafactory_reference" / "lf_preprocess.py"
        found["lf"], found["rss"]["lf"] = child(
            [
                args.llamafactory_python,
                str(script),
                "--tokenizer",
                tokenizer_dir,
                "--dataset-dir",
                tmp,
                "--datasets",
                ",".join(datasets),
                "--cutoff-len",
                str(args.cutoff_len),
                "--out",
                f"{tmp}/lf.jsonl",
            ],
            env={**os.environ, "PYTHONPATH": os.environ.get("LLAMAFACTORY_PYTHONPATH", "/tmp/lfstub")},
        )
        found["identical"] = Path(f"{tmp}/ours.jsonl").read_text() == Path(f"{tmp}/lf.jsonl").read_text()
    return found


def spread(values: list[float], form: str) -> str:
    """The median, and the range when there is more than one value."""
    middle = format(statistics.median(values), form)
    return middle if len(values) == 1 else f"{middle} ({format(min(values), form)} - {format(max(values), form)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--llamafactory-python", help="python of a venv with llamafactory==0.9.5")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every side; prints medians (and ranges)")
    parser.add_argument("--side", choices=["ours", "ceiling"], help=argparse.SUPPRESS)
    parser.add_argument("--dataset-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--no-compare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    datasets = ["alpaca_bench", "sharegpt_bench"]
    if args.side == "ours":  # child process
        print(json.dumps(run_ours(args.dataset_dir, datasets, args.cutoff_len, args.out, not args.no_compare)))
        return
    if args.side == "ceiling":  # child process
        print(json.dumps(run_ceiling(args.dataset_dir, datasets)))
        return

    from qwen_pipeline.embedded import ensure_embedded_model

    tokenizer_dir = str(ensure_embedded_model())
    with tempfile.TemporaryDirectory() as tmp:
        write_data(Path(tmp), args.records)
        # Rounds of every side back to back: the ratios within a round share the machine's load.
        rounds = [one_round(args, tmp, datasets, tokenizer_dir) for _ in range(args.repeat)]

    def rates(side: str) -> list[float]:
        return [r[side]["records"] / r[side]["seconds"] for r in rounds]

    def ratios(side: str, to: str) -> list[float]:
        return [a / b for a, b in zip(rates(side), rates(to))]

    rust = [r["ceiling"]["records"] / r["ceiling"]["rust_seconds"] for r in rounds]

    records, tokens = rounds[0]["ours"]["records"], rounds[0]["ours"]["tokens"]
    print(
        f"{args.records} records ({tokens} tokens, {tokens / records:.0f} per record), "
        f"cutoff_len {args.cutoff_len}, one process each"
        + (f"; medians (ranges) of {args.repeat} rounds" if args.repeat > 1 else "")
    )
    sides = {
        "ours": "ours (format stage, default: also counts tokenization mismatches)",
        "ours_only": "ours, compare_tokenizations=false",
        "lf": "LLaMA-Factory 0.9.5 preprocessing",
    }
    for side, name in sides.items():
        if side in rounds[0]:
            rss = rounds[0]["rss"].get(side)
            memory = f", peak RSS {rss:.0f} MiB" if rss else ""
            tokens_per_s = statistics.median(rates(side)) * tokens / records
            print(f"  {name}: {spread(rates(side), ',.0f')} records/s, {tokens_per_s:,.0f} tokens/s{memory}")
    print(
        f"  ceiling (one batched tokenizer call over the rendered texts): {spread(rates('ceiling'), ',.0f')} "
        f"records/s; ours is {spread(ratios('ours', 'ceiling'), '.0%')} of it "
        f"({spread(ratios('ours_only', 'ceiling'), '.0%')} without the comparison)"
    )
    print(
        f"  stricter ceiling (the Rust encode_batch_fast alone, ids not read back): {spread(rust, ',.0f')} "
        f"records/s; ours is {spread([a / b for a, b in zip(rates('ours'), rust)], '.0%')} of it "
        f"({spread([a / b for a, b in zip(rates('ours_only'), rust)], '.0%')} without the comparison)"
    )
    if "lf" in rounds[0]:
        identical = all(r["identical"] for r in rounds)
        rss = rounds[0]["rss"]
        print(f"  outputs identical to LLaMA-Factory's: {identical}")
        print(
            f"  ratio ours / LLaMA-Factory: {spread(ratios('ours', 'lf'), '.1f')}x records/s "
            f"({spread(ratios('ours_only', 'lf'), '.1f')}x without the comparison); "
            f"peak RSS {rss['ours'] / rss['lf']:.2f}x"
        )
        if not identical:
            raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
