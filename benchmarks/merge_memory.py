"""Merge memory and time: our merge stage vs `llamafactory-cli export` (0.9.5), same adapter, same model.

The model has Qwen2.5-0.5B's shape (hidden 896, 24 layers, intermediate 4864, 14 heads / 2 KV heads,
the real 151,936-token vocabulary, tied embeddings: 494M parameters, 1.98 GB in float32) with random
weights; `--shape small` takes a smaller, embedding-heavy one instead (hidden 1024, 8 layers,
intermediate 4096: 274M parameters, 1.1 GB, 57% of it the embedding). The adapter is LoRA r16 / alpha 32
on every linear layer, with random non-zero B. Both tools write float32 safetensors in shards of at most
5 GB (one file) on the CPU; each runs in its own process, one after the other, in this run. Peak RSS is
the process's maximum resident set (wait4), wall time its whole life.

Rows:
- ours (merge stage): the merge pipeline's three nodes and the ModelDataset save, no MLflow;
- ours (kedro run --pipelines merge): the same through Kedro on a project copy, MLflow logging included;
- LLaMA-Factory: `llamafactory-cli export` with the same model, adapter, export_size, device and dtype.
Afterwards the two exports are compared tensor by tensor (max |difference|).

    .venv/bin/python benchmarks/merge_memory.py --llamafactory-cli /tmp/lfvenv/bin/llamafactory-cli
    (LLaMA-Factory set up as in benchmarks/llamafactory_reference/README.md; --work DIR keeps the model)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14},
    "small": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8, "num_attention_heads": 16},
}


def make_model(work: Path, shape: str) -> None:
    """Base model and adapter, built once per work directory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qwen_pipeline.models import EMBEDDED_MODEL, load_tokenizer

    if (work / "adapter/adapter_model.safetensors").is_file():
        return
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151936, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096,
        bos_token_id=151643, eos_token_id=151643, pad_token_id=151643, **SHAPES[shape],
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "base", max_shard_size="5GB")
    load_tokenizer(EMBEDDED_MODEL).save_pretrained(work / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(work / "base"),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.02)
    model.save_pretrained(work / "adapter")


def trained_dir(work: Path, target: Path) -> Path:
    """The adapter as the train stage leaves it: adapter files, tokenizer, manifest naming the base."""
    shutil.copytree(work / "adapter", target)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(work / "base" / name, target / name)
    manifest = {"kind": "adapter", "base_model": str(work / "base"), "finetuning_type": "lora"}
    (target / "qwen_pipeline.json").write_text(json.dumps(manifest))
    return target


def run_ours(work: Path) -> None:
    """In a child process: the merge nodes as Kedro runs them, without MLflow."""
    from qwen_pipeline.config import ModelConfig
    from qwen_pipeline.datasets import BaseModel, ModelDataset
    from qwen_pipeline.pipelines.merge.nodes import check_merged_model, merge_adapter, publish_merged_model

    params = {"export_size": 5, "export_dtype": "float32", "export_device": "cpu"}
    trained = ModelDataset(filepath=str(work / "models/trained"), lazy=True).load()
    staged = merge_adapter(trained, BaseModel(ModelConfig(trained.base_model)), params)
    report = check_merged_model(staged, params)
    ModelDataset(filepath=str(work / "models/merged"), lazy=True).save(publish_merged_model(staged, report))
    print(json.dumps(report["check"]))


def measure(command: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Wall time and peak RSS of one child process (and of its own children, whichever peaked higher)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        sys.exit(f"{' '.join(command)} failed:\n{output[-4000:]}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "output": output}


def compare(ours: Path, theirs: Path) -> float:
    from qwen_pipeline.merging import read_tensor, weight_index

    a, b = weight_index(ours), weight_index(theirs)
    if set(a) != set(b):
        sys.exit(f"different tensors: {sorted(set(a) ^ set(b))[:5]}")
    return max(float((read_tensor(a[k]).float() - read_tensor(b[k]).float()).abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llamafactory-cli", required=True)
    parser.add_argument("--work", type=Path, help="keep the model here between runs (default: a temp dir)")
    parser.add_argument("--skip-kedro", action="store_true", help="leave out the kedro run row")
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--_ours", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_make", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._ours:
        return run_ours(args._ours)
    if args._make:
        return make_model(args._make, args.shape)
    work = (args.work or Path(tempfile.mkdtemp(prefix="merge_memory-"))) / args.shape
    work.mkdir(parents=True, exist_ok=True)
    # Everything heavy runs in children: a child's peak RSS starts at its parent's (kept across fork and
    # exec), so this process stays small until the measurements are done.
    subprocess.run(
        [sys.executable, __file__, "--llamafactory-cli", "-", "--shape", args.shape, "--_make", str(work)], check=True
    )
    size = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors")) / 1e9
    adapter = (work / "adapter/adapter_model.safetensors").stat().st_size / 1e6
    print(f"base model {size:.2f} GB float32, adapter {adapter:.1f} MB")
    rows = {}
    for path in (work / "models", work / "lf_out", work / "project"):
        shutil.rmtree(path, ignore_errors=True)

    trained_dir(work, work / "models/trained")
    rows["ours (merge stage)"] = measure([sys.executable, __file__, "--llamafactory-cli", "-", "--_ours", str(work)])

    lf_config = work / "lf_export.yaml"
    lf_config.write_text(
        f"model_name_or_path: {work / 'base'}\nadapter_name_or_path: {work / 'adapter'}\ntemplate: qwen\n"
        f"finetuning_type: lora\nexport_dir: {work / 'lf_out'}\nexport_size: 5\nexport_device: cpu\n"
        "export_legacy_format: false\ninfer_dtype: float32\n"
    )
    lf_env = {**os.environ, "PYTHONPATH": "/tmp/lfstub", "DISABLE_VERSION_CHECK": "1"}
    rows["LLaMA-Factory export"] = measure([args.llamafactory_cli, "export", str(lf_config)], env=lf_env)

    if not args.skip_kedro:
        project = work / "project"
        for name in ("conf", "src"):
            shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "local"))
        for name in ("pyproject.toml", ".telemetry"):
            shutil.copy(ROOT / name, project / name)
        (project / "conf/local").mkdir(exist_ok=True)
        trained_dir(work, project / "data/06_models/trained")
        env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
        rows["ours (kedro run, with MLflow)"] = measure(
            [sys.executable, "-m", "kedro", "run", "--pipelines", "merge", "--params", "merge.export_dtype=float32"],
            env=env,
            cwd=project,
        )

    reference = rows["LLaMA-Factory export"]
    print(f"{'':32} {'wall s':>8} {'peak RSS MB':>12} {'time ratio':>11} {'RSS ratio':>10}")
    for name, row in rows.items():
        print(
            f"{name:32} {row['wall_s']:8.1f} {row['peak_rss_mb']:12.0f} "
            f"{row['wall_s'] / reference['wall_s']:11.2f} {row['peak_rss_mb'] / reference['peak_rss_mb']:10.2f}"
        )
    print("check:", rows["ours (merge stage)"]["output"].strip().splitlines()[-1])
    print(f"max |ours - LLaMA-Factory| over all tensors: {compare(work / 'models/merged', work / 'lf_out'):.3g}")
    if not args.work:
        shutil.rmtree(work.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
