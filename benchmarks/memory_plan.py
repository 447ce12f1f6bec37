"""The memory plan (training/memory.py) against what one training step really holds.

For each shape (the embedded tiny model; the real Qwen2.5-0.5B shape with random weights: hidden 896, intermediate
4864, 24 layers, 14 heads, 2 kv heads, 151,936 vocabulary, tied embeddings, built in a temp dir) and each mode
(LoRA, DoRA, QLoRA 4-bit, full, freeze), a fresh subprocess makes the plan exactly as the train stage would (imports
done, no weights loaded), then runs the project's recipe (``run_sft``, max_steps 1) on a batch of ROWS x LENGTH
tokens, and measures right after the optimizer step (before gradients are cleared):

- weights, gradients, optimizer states: the bytes of their tensors, each storage once (a bitsandbytes 4-bit
  weight counts its packed data and its quant_state tensors, an 8-bit one its SCB scales too);
- activations: the bytes autograd saved for the backward during the loss computation (saved-tensor hooks,
  each storage once, parameters excluded);
- peak: the process's VmHWM (CPU) or ``torch.cuda.max_memory_allocated`` + the plan's overhead (CUDA). On CPU,
  VmHWM is restarted (``/proc/self/clear_refs``) when loading starts and when the step starts, so the table also
  gives the peak of loading + wrapping and the peak of the step; the peak is the larger. The two parts of the
  plan's CPU overhead beyond the process's RSS (mapped_checkpoint, freed_temporaries) are listed as planned.

Acceptance (issue 15): model-state terms within 5%, peak within 25%, every mode, both shapes.

    .venv/bin/python benchmarks/memory_plan.py                       # tiny + 0.5B, all modes, float32 (~10 min)
    .venv/bin/python benchmarks/memory_plan.py --shapes tiny --bf16  # bf16 rows too
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS, LENGTH = 2, 128
MODES = {
    "lora": {"finetuning_type": "lora"},
    "dora": {"finetuning_type": "lora", "use_dora": True},
    "qlora4": {"finetuning_type": "lora", "quantization_bit": 4},
    "full": {"finetuning_type": "full"},
    "freeze": {"finetuning_type": "freeze"},
}
TERMS = ("weights", "gradients", "optimizer_states", "activations")


def dataset():
    """ROWS examples, the longest LENGTH tokens (so the batch is padded, as real batches are), prompt masked."""
    import random

    from datasets import Dataset, DatasetDict

    rng = random.Random(0)
    lengths = [LENGTH - 28 * i for i in range(ROWS)]
    ids = [[rng.randrange(151000) for _ in range(n)] for n in lengths]
    return DatasetDict(
        {
            "train": Dataset.from_dict(
                {
                    "input_ids": ids,
                    "attention_mask": [[1] * len(x) for x in ids],
                    "labels": [[-100] * 16 + x[16:] for x in ids],
                }
            )
        }
    )


def storages(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def weight_tensors(model):
    for p in model.parameters():
        yield p
        state = getattr(p, "quant_state", None)
        if state is not None:
            yield from (v for v in _walk(state))
        yield getattr(p, "SCB", None)


def _walk(state):
    import torch

    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif hasattr(value, "absmax"):
            yield from _walk(value)


def vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    """Restart VmHWM from the current VmRSS (Linux: writing 5 to clear_refs), so each phase has its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def row(model_path: str, mode: str, bf16: bool) -> dict:
    """One measured row, in this (fresh) process."""
    import torch
    from transformers import TrainerCallback

    from qwen_pipeline.config import ModelConfig, TrainConfig
    from qwen_pipeline.training import loss, recipe
    from qwen_pipeline.training.memory import (
        Shape,
        freed_temporary_bytes,
        hf_config,
        mapped_checkpoint_bytes,
        model_tensors,
        placement_for,
        plan_memory,
    )

    cuda = torch.cuda.is_available()
    data = dataset()
    out = tempfile.mkdtemp(prefix="memory-plan-")
    config = TrainConfig(
        **MODES[mode],
        bf16=bf16,
        per_device_train_batch_size=ROWS,
        gradient_accumulation_steps=1,
        max_steps=1,
        shuffle=False,
        save_steps=0,
        overwrite_output_dir=True,
        output_dir=out,
        flash_attn="sdpa",
    )
    placement = placement_for(config, world_size=1, procs_per_node=1, cuda=cuda)
    plan = plan_memory(model_path, config, Shape(ROWS, LENGTH), placement)
    measured: dict[str, int] = {}

    phases: dict[str, int] = {}
    load_model, wrap = recipe.load_model, recipe.wrap

    def loading(*args, **kwargs):
        phases["before"] = vm("VmHWM")  # imports, the plan, the tokenizer
        reset_peak()
        return load_model(*args, **kwargs)

    def wrapping(*args, **kwargs):
        wrapped = wrap(*args, **kwargs)
        phases["load"] = vm("VmHWM")  # loading and wrapping, from their start
        return wrapped

    recipe.load_model, recipe.wrap = loading, wrapping

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            phases["setup"] = vm("VmHWM")  # the Trainer built, the first batch collated
            reset_peak()

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            params = list(model.parameters())
            measured["weights"] = storages(weight_tensors(model))
            measured["gradients"] = storages(p.grad for p in params)
            opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            measured["optimizer_states"] = storages(
                v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()
            )
            phases["step"] = vm("VmHWM")  # forward, backward and optimizer step, from the step's start

    class Trainer(loss.SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(Measure())

        def compute_loss(self, model, inputs, *args, **kwargs):
            # What the decoder saves for the backward (the head's chunks are the loss_chunk term, transient).
            weights = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
            saved: dict[int, int] = {}
            inside = []
            decoder = self.accelerator.unwrap_model(model).get_decoder()
            hooks = [
                decoder.register_forward_pre_hook(lambda *a: inside.append(True)),
                decoder.register_forward_hook(lambda *a: inside.clear()),
            ]

            def pack(t):
                storage = t.untyped_storage()
                if inside and storage.data_ptr() not in weights and t.device.type != "meta":
                    saved[storage.data_ptr()] = storage.nbytes()
                return t

            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    result = super().compute_loss(model, inputs, *args, **kwargs)
            finally:
                for hook in hooks:
                    hook.remove()
            measured["activations"] = sum(saved.values())
            return result

    loss.SFTTrainer = Trainer  # run_sft imports it from there when it trains
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    recipe.run_sft(data, ModelConfig(model_name_or_path=model_path), config)
    if cuda:
        measured["peak"] = torch.cuda.max_memory_allocated() + plan.terms["overhead"]
    else:  # VmHWM was restarted at each phase: the peak is the largest phase's
        measured["peak"] = max(vm("VmHWM"), *phases.values())
        measured |= {f"{k}_peak": v for k, v in phases.items()}
    planned = {k: plan.terms[k] for k in TERMS} | {"peak": plan.total}
    if not cuda:  # the parts of the CPU overhead beyond this process's RSS
        tensors = model_tensors(model_path, config)
        hf = hf_config(model_path)
        planned["mapped_checkpoint"] = mapped_checkpoint_bytes(hf, config, tensors, trained_fp32=bf16)
        planned["freed_temporaries"] = freed_temporary_bytes(config, tensors)
    return {"planned": planned, "measured": measured, "seconds": round(time.perf_counter() - started, 1)}


def table(results: list[dict]) -> str:
    lines = [
        "| shape | mode | dtype | term | plan MiB | measured MiB | plan/measured |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['mode']} | {r['dtype']} | error | {r['error'][:80]} | | |")
            continue
        for term in (*TERMS, "peak"):
            plan, got = r["planned"][term], r["measured"].get(term, 0)
            ratio = f"{plan / got:.3f}" if got else ("1.000" if plan == 0 else "n/a")
            mark = ""
            limit = 0.25 if term == "peak" else 0.05 if term != "activations" else None
            if limit is not None and got and abs(plan / got - 1) > limit:
                mark = " **off**"
            lines.append(
                f"| {r['shape']} | {r['mode']} | {r['dtype']} | {term} | {plan / 2**20:,.2f} | {got / 2**20:,.2f} "
                f"| {ratio}{mark} |"
            )
        where = f"| {r['shape']} | {r['mode']} | {r['dtype']}"
        for term in ("mapped_checkpoint", "freed_temporaries"):
            if r["planned"].get(term):
                lines.append(f"{where} | {term} | {r['planned'][term] / 2**20:,.2f} | | |")
        for phase in ("load_peak", "step_peak"):
            if phase in r["measured"]:
                got = r["measured"][phase] / 2**20
                lines.append(f"{where} | {phase} (measured) | | {got:,.2f} | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,0.5b")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--bf16", action="store_true", help="bf16 rows beside the float32 ones")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: model_path,mode,bf16 for one subprocess
    args = parser.parse_args()
    if args.row:
        model_path, mode, bf16 = args.row.split(",")
        print("RESULT " + json.dumps(row(model_path, mode, bf16 == "1")), flush=True)
        return 0

    from train_throughput import model_dir  # the 0.5B model it builds once into the project cache

    started = time.perf_counter()
    results = []
    shapes = {"tiny": "tiny", "0.5b": "qwen2.5-0.5b"}
    paths = {shape: str(model_dir(shapes[shape])) for shape in args.shapes.split(",")}
    for shape, path in paths.items():
        for dtype in ("float32", "bfloat16") if args.bf16 else ("float32",):
            for mode in args.modes.split(","):
                command = [sys.executable, __file__, "--row", f"{path},{mode},{int(dtype == 'bfloat16')}"]
                done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
                found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                entry = {"shape": shape, "mode": mode, "dtype": dtype}
                if found:
                    entry |= json.loads(found[-1].removeprefix("RESULT "))
                else:
                    entry["error"] = (done.stderr.strip().splitlines() or ["no output"])[-1]
                results.append(entry)
                print(f"{shape} {mode} {dtype}: {entry.get('seconds', 'error')} s", file=sys.stderr, flush=True)
    print(table(results))
    print(f"\n{len(results)} rows in {time.perf_counter() - started:.0f} s; batch {ROWS} x {LENGTH} tokens, CPU")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
