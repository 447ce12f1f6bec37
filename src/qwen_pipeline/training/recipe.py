"""The SFT recipe, top to bottom: load -> wrap -> train -> return.

One process, in-process. Launch concerns (torchrun, DeepSpeed, ranks) will live in a
thin launcher beside this file, not in here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict

from ..config import ModelConfig, TrainConfig
from ..models import load_tokenizer
from .checkpoints import checkpoint_dir, data_fingerprint, resume_point
from .evaluating import early_stopping, eval_arguments, eval_sample, eval_summary, final_eval_loss
from .host_memory import peak_rss_bytes, return_freed_host_memory
from .packing import IGNORE_INDEX, FlatCollator, labelled_tokens, pack, padding_share, row_lengths

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: Any  # the PEFT-wrapped model, adapter trained
    tokenizer: Any
    history: list[dict[str, float]]  # one entry per logging step: step, loss, learning_rate, grad_norm
    summary: dict[str, Any]


ATTENTION = {"auto": None, "sdpa": "sdpa", "fa2": "flash_attention_2", "disabled": "eager"}


def compute_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype the forward runs in: bf16 / fp16 under mixed precision, else float32."""
    return torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32


def zero_optimization(config: TrainConfig) -> dict[str, Any]:
    """The ``zero_optimization`` block of ``config.deepspeed``'s JSON (empty without DeepSpeed)."""
    if not config.deepspeed:
        return {}
    return json.loads(Path(config.deepspeed).read_text()).get("zero_optimization") or {}


def zero_stage(config: TrainConfig) -> int:
    """The ZeRO stage of ``config.deepspeed`` (0 without DeepSpeed)."""
    return int(zero_optimization(config).get("stage", 0))


def load_kwargs(model_config: ModelConfig, config: TrainConfig, *, cuda: bool) -> dict[str, Any]:
    """``from_pretrained``'s arguments. Weights load in the compute dtype (the frozen base of LoRA/QLoRA stays
    there; what trains is made float32 after wrapping, see ``upcast_trainable``). QLoRA puts its quantized
    weights on this process's own GPU (bitsandbytes otherwise uses the current device: cuda:0 for every rank),
    except under ZeRO-3, where DeepSpeed places them and the 4-bit storage must have the compute dtype so the
    quantized weights can be partitioned with the others."""
    from transformers import BitsAndBytesConfig

    from .ranks import local_rank

    dtype = compute_dtype(config)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model_config.trust_remote_code}
    if ATTENTION[config.flash_attn]:
        kwargs["attn_implementation"] = ATTENTION[config.flash_attn]
    zero3 = zero_stage(config) == 3
    if config.quantization_bit == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            **({"bnb_4bit_quant_storage": dtype} if zero3 else {}),
        )
    elif config.quantization_bit == 8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if config.quantization_bit and cuda and not zero3:
        kwargs["device_map"] = {"": local_rank()}
    return kwargs


def load_model(model_config: ModelConfig, config: TrainConfig):
    """The base model in the training dtype, quantized for QLoRA, with the chosen attention. Under ZeRO-3 the
    caller has created the TrainingArguments first, so transformers builds it partitioned (``zero.Init``):
    no process ever holds the whole model."""
    from transformers import AutoModelForCausalLM

    from ..models import resolve_model_path
    from .ranks import local_rank, world_size

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())  # before loading: bitsandbytes and DeepSpeed use the current device
    elif zero_stage(config) == 3 and world_size() > 1:
        return_freed_host_memory()  # the gathered layers are host memory
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model_config.model_name_or_path), **load_kwargs(model_config, config, cuda=cuda)
    )


def upcast_trainable(model, config: TrainConfig) -> None:
    """Trainable weights in float32 under bf16/fp16 mixed precision (LLaMA-Factory's rule): AdamW then keeps
    float32 states and updates of lr 1e-5 do not round away in 16-bit weights, and fp16's grad scaler gets
    float32 gradients to unscale. Not under DeepSpeed, whose optimizer keeps its own float32 master weights."""
    if config.deepspeed or compute_dtype(config) == torch.float32:
        return
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def wrap_lora(model, config: TrainConfig):
    from peft import LoraConfig, TaskType, get_peft_model

    # QLoRA: the quantized base frozen, everything else left in the compute dtype (as LLaMA-Factory; PEFT's
    # prepare_model_for_kbit_training would also copy embeddings and head to float32: 0.5 GB more at 0.5B).
    target = "all-linear" if config.lora_target == "all" else config.lora_target  # PEFT skips the head
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_rank,
        lora_dropout=config.lora_dropout,
        target_modules=target,
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
        modules_to_save=config.additional_target,
    )
    return get_peft_model(model, lora)


def wrap_freeze(model, config: TrainConfig):
    """Train only the last N decoder layers (the first N when negative), as LLaMA-Factory's freeze."""
    layers = model.model.layers
    n = config.freeze_trainable_layers
    chosen = range(max(len(layers) - n, 0), len(layers)) if n > 0 else range(min(-n, len(layers)))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for i in chosen:
        for parameter in layers[i].parameters():
            parameter.requires_grad_(True)
    return model


def wrap(model, config: TrainConfig):
    if config.finetuning_type == "lora":
        return wrap_lora(model, config)
    if config.finetuning_type == "freeze":
        return wrap_freeze(model, config)
    return model  # full: every parameter trains


def count_parameters(model) -> tuple[int, int]:
    """Trainable and all parameters; a ZeRO-3 partitioned parameter is an empty placeholder: its full size is
    ``ds_numel``."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trains in sizes if trains), sum(n for n, _ in sizes)


def run_sft(
    dataset: DatasetDict,
    model_config: ModelConfig,
    config: TrainConfig,
    *,
    save_to: Path | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train; with ``save_to`` (every rank must pass it) the Trainer also writes the model there,
    gathering ZeRO-3 partitions first. One process that needs a process group (DeepSpeed, or a host
    with several GPUs) gets a single-rank one for the duration. ``callbacks``: more ``TrainerCallback``s
    (the GPU check's step clock)."""
    from .ranks import one_process_group

    with one_process_group(config.deepspeed):
        return _run_sft(dataset, model_config, config, save_to, callbacks)


def training_arguments(config: TrainConfig, run_dir: Path):
    """The Trainer's arguments, and the process group. Created before the model loads: with a ZeRO-3 config they
    make the DeepSpeed config live, and only then does ``from_pretrained`` build the model partitioned."""
    from transformers import TrainingArguments

    from .ranks import world_size

    cpu = not torch.cuda.is_available()
    evaluating = eval_arguments(config)  # evaluation while training, if asked (training/evaluating.py)
    args = TrainingArguments(
        output_dir=str(run_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        # transformers 5 takes the ratio through warmup_steps (a float below 1).
        warmup_steps=config.warmup_steps if config.warmup_steps > 0 else config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        seed=config.seed,
        bf16=config.bf16,
        fp16=config.fp16,
        deepspeed=config.deepspeed,
        ddp_timeout=config.ddp_timeout,
        # Without use_cpu, transformers treats torchrun CPU workers as separate single-process runs.
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and world_size() > 1 else None,
        train_sampling_strategy="random" if config.shuffle else "sequential",
        save_strategy=evaluating.pop("save_strategy", "steps" if config.save_steps else "no"),
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        report_to="none",  # the train node hands the history to kedro-mlflow
        remove_unused_columns=False,
        prediction_loss_only=True,  # evaluations keep the loss only: no labels or logits gathered across batches
        dataloader_num_workers=0,
        dataloader_pin_memory=not cpu,  # pinning only helps a GPU
        **evaluating,
    )
    if config.deepspeed:
        _deepspeed_comm(config)
    return args


def _deepspeed_comm(config: TrainConfig) -> None:
    """DeepSpeed's communication layer over the process group, before the model loads: ``zero.Init`` sizes its
    partitions from it, and on CPU (where accelerate does not start DeepSpeed's layer) it would count a world
    of 1 and refuse the batch size."""
    from datetime import timedelta

    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=config.ddp_timeout), verbose=False)


def _run_sft(
    dataset: DatasetDict, model_config: ModelConfig, config: TrainConfig, save_to: Path | None, callbacks: Sequence[Any]
) -> TrainResult:
    if not torch.cuda.is_available():  # DeepSpeed's "Setting accelerator to CPU" warning, said for it
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers import DataCollatorForSeq2Seq, ProgressCallback, set_seed

    from .callbacks import LiveMetrics, QuietProgress  # transformers' classes: imported when training starts
    from .generation_eval import GenerationEval
    from .loss import SFTTrainer
    from .ranks import max_over_ranks

    set_seed(config.seed)
    fingerprint = data_fingerprint(dataset["train"])  # also recorded in the summary (and the model's manifest)
    run_dir = checkpoint_dir(fingerprint, model_config, config)
    args = training_arguments(config, run_dir)  # first: the process group, and ZeRO-3's partitioned loading
    resume = resume_point(run_dir, config)
    # Load
    tokenizer = load_tokenizer(
        model_config.model_name_or_path,
        trust_remote_code=model_config.trust_remote_code,
        use_fast=model_config.use_fast_tokenizer,
    )
    model = load_model(model_config, config)
    # Wrap
    model = wrap(model, config)
    upcast_trainable(model, config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the cache is useless when activations are recomputed
    trainable, total = count_parameters(model)
    logger.info(
        "%s: %d trainable parameters of %d (%.3f%%)", config.finetuning_type, trainable, total, 100 * trainable / total
    )
    # Train
    train_set, batching = dataset["train"], {}
    flat = config.packing or config.neat_packing or config.padding_free
    if config.packing or config.neat_packing:
        if config.pack_length is None:  # the train node sets it: train.pack_length, else the data's cutoff_len
            raise ValueError("packing needs pack_length: the train node sets it (train.pack_length or the cutoff_len)")
        train_set, batching = pack(train_set, config.pack_length, neat=config.neat_packing)
    if flat:
        collator = FlatCollator(attention=model.config._attn_implementation)
        model.config.use_cache = False  # packed-sequence masks are built only without a KV cache
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    batching["padding_share"] = padding_share(train_set, config.per_device_train_batch_size, flat)
    logger.info(
        "Batching: %s", ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in batching.items())
    )
    trainer = SFTTrainer(  # the output head only on labelled positions (training/loss.py)
        chunk_rows=config.loss_chunk_rows,
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_sample(dataset["validation"], config) if "validation" in dataset else None,
        data_collator=collator,
    )
    if trainer.pop_callback(ProgressCallback) is not None:  # the bar, without a printed dict per step
        trainer.add_callback(QuietProgress())
    if (live := LiveMetrics.for_this_process()) is not None:  # per-step metrics into MLflow as they come
        live.tokens_seen = lambda: int(trainer.tokens_seen) * trainer.args.world_size  # rank 0's, for all
        trainer.add_callback(live)
    if (stopping := early_stopping(config)) is not None:
        trainer.add_callback(stopping)
    answers = None
    if config.generation_eval.samples and "validation" in dataset:  # answers at every evaluation
        answers = GenerationEval(dataset["validation"], tokenizer, config.generation_eval, config.seed, live)
        trainer.add_callback(answers)
    for callback in callbacks:
        trainer.add_callback(callback)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    if save_to is not None:
        trainer.save_model(str(save_to))  # collective under DeepSpeed: all ranks call it
    history = [
        {k: float(entry[k]) for k in ("step", "loss", "learning_rate", "grad_norm") if k in entry}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    label_tokens = labelled_tokens(dataset["train"])  # from the Arrow buffers: no token becomes a Python int
    input_tokens = int(row_lengths(dataset["train"]).sum())  # non-padding
    epochs = min(args.num_train_epochs, trainer.state.epoch or 0.0)
    summary = {
        "train_runtime_s": round(seconds, 2),
        "global_steps": trainer.state.global_step,
        "resumed_from_step": int(resume.rsplit("-", 1)[-1]) if resume else 0,
        "steps_this_run": trainer.state.global_step - (int(resume.rsplit("-", 1)[-1]) if resume else 0),
        "train_loss": float(output.training_loss),
        "first_loss": history[0]["loss"] if history else math.nan,
        "last_loss": history[-1]["loss"] if history else math.nan,
        "epochs": float(epochs),
        "label_tokens_per_epoch": label_tokens,
        # non-padding tokens seen per second (the examples of each step, over the whole run)
        "tokens_per_second": round(input_tokens * epochs / seconds, 1) if seconds else 0.0,
        "trainable_parameters": trainable,
        "data_fingerprint": fingerprint,
        **{f"batching_{k}": v for k, v in batching.items()},
        # the largest of all processes: host memory is what a CPU run, an offload or a model load fills
        "peak_rss_gb": round(max_over_ranks(peak_rss_bytes()) / 2**30, 3),
        **(
            {"peak_gpu_memory_gb": round(max_over_ranks(torch.cuda.max_memory_allocated()) / 2**30, 3)}
            if torch.cuda.is_available()
            else {}
        ),
    }
    summary |= eval_summary(trainer.state.log_history, stopping)
    if answers is not None and answers.seconds:
        summary["generation_eval_seconds"] = round(sum(answers.seconds) / len(answers.seconds), 2)  # per evaluation
    if "validation" in dataset:  # the trained (with load_best_model_at_end: the best) model; not a curve point
        summary["eval_loss"] = final_eval_loss(trainer, live)
    logger.info(
        "Trained %d steps in %.1f s: loss %.4f -> %.4f",
        summary["global_steps"],
        seconds,
        summary["first_loss"],
        summary["last_loss"],
    )
    # Return (the train node hands the model to the catalog, which saves it)
    return TrainResult(model=model, tokenizer=tokenizer, history=history, summary=summary)
