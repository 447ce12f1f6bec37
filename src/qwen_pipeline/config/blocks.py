"""The parameters blocks as frozen dataclasses, one per ``params:<section>``, each key with its type,
default and what it means; ``problems`` checks the values a type cannot."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from ..conversation import WarningKind
from ..models import EMBEDDED_MODEL
from ..template import option_problems


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The base model (the ``base_model`` dataset's settings: ``globals.yml``'s ``model`` block, or
    ``--params model.<key>=...`` for one run), shared by format, train, merge and evaluate."""

    model_name_or_path: str = EMBEDDED_MODEL  # hub id, local directory, or the embedded default
    trust_remote_code: bool = False  # never run model code from a hub unless asked
    use_fast_tokenizer: bool = True


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """``params:ingest``: which datasets of dataset_info.json to read."""

    # names in dataset_info.json: a list, one name, or "a,b" (as LLaMA-Factory's dataset: a,b)
    dataset: list[str] | str = dataclasses.field(default_factory=list)
    eval_dataset: list[str] | str = dataclasses.field(default_factory=list)  # held out whole as the validation split
    max_samples: int | None = None  # keep the first N records of each dataset
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = "concat"  # how datasets combine
    interleave_probs: list[float] | None = None  # sampling weights for interleave_* (default: equal)
    seed: int = 42  # for num_samples and interleaving
    # LLaMA-Factory 0.9.5's openai converter appends "detailed thinking off" (a Nemotron prompt) to
    # system prompts of tool-free conversations. Off: keep the system prompt as written.
    openai_thinking_suffix: bool = False

    def __post_init__(self) -> None:
        for key in ("dataset", "eval_dataset"):
            value = getattr(self, key)
            if isinstance(value, str):  # "a,b" or "a"
                object.__setattr__(self, key, [name.strip() for name in value.split(",") if name.strip()])

    def problems(self) -> list[str]:
        found = []
        if not self.dataset:
            found.append("dataset: name at least one dataset of dataset_info.json")
        if both := sorted(set(self.dataset) & set(self.eval_dataset)):
            found.append(f"eval_dataset: {', '.join(both)} also in dataset; a dataset trains or evaluates, not both")
        if self.max_samples is not None and self.max_samples < 1:
            found.append(f"max_samples: must be positive, got {self.max_samples}")
        if self.interleave_probs is not None:
            if not self.mix_strategy.startswith("interleave"):
                found.append("interleave_probs: only used with mix_strategy interleave_under / interleave_over")
            if len(self.interleave_probs) != len(self.dataset):
                found.append(f"interleave_probs: {len(self.interleave_probs)} weights for {len(self.dataset)} datasets")
            elif abs(sum(self.interleave_probs) - 1.0) > 1e-6 or min(self.interleave_probs) < 0:
                found.append(f"interleave_probs: must be non-negative and sum to 1, got {self.interleave_probs}")
        return found


@dataclasses.dataclass(frozen=True)
class ProcessingConfig:
    """``params:processing``: how the data stages use the machine. Their outputs do not depend on it."""

    num_proc: int | None = None  # worker processes for conversion, validation, tokenization (null: cores, <= 16)
    batch_size: int = 1000  # records per chunk: what one process holds at a time
    overwrite_cache: bool = False  # redo every data stage even when its inputs are unchanged (LLaMA-Factory's name)

    def problems(self) -> list[str]:
        found = []
        if self.num_proc is not None and self.num_proc < 1:
            found.append(f"num_proc: must be positive (or null for the cores available), got {self.num_proc}")
        if self.batch_size < 1:
            found.append(f"batch_size: must be positive, got {self.batch_size}")
        return found

    @property
    def processes(self) -> int:
        from ..data.streaming import default_num_proc

        return self.num_proc or default_num_proc()


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """``params:validate``."""

    max_rejected_share: float = 0.5  # stop the run when more than this share of records is rejected
    # Kept with a warning by default (LLaMA-Factory trains on them); listed here, rejected instead.
    reject: list[WarningKind] = dataclasses.field(default_factory=list)

    def problems(self) -> list[str]:
        if not 0.0 <= self.max_rejected_share <= 1.0:
            return [f"max_rejected_share: must be within [0, 1], got {self.max_rejected_share}"]
        return []


@dataclasses.dataclass(frozen=True)
class FormatConfig:
    """``params:format``: the chat template and how conversations become tokens."""

    template: Literal["qwen"] = "qwen"
    cutoff_len: int = 2048  # max tokens per example; shared between prompt and answer
    train_on_prompt: bool = False  # also learn the prompt tokens
    mask_history: bool = False  # learn only the last answer of multi-turn conversations
    val_size: float | int = 0.0  # validation split: a fraction (<1) or a record count
    seed: int = 42  # for the train/validation split
    overlength: Literal["truncate", "drop"] = "truncate"  # over cutoff_len: cut (LLaMA-Factory) or drop
    tokenization: Literal["turns", "whole_text"] = "turns"  # turns = LLaMA-Factory; whole_text = apply_chat_template
    compare_tokenizations: bool = True  # count conversations the two tokenizations disagree on
    # Text in the data that the tokenizer reads as a control token (<|im_end|> typed in a message):
    # keep = LLaMA-Factory's ids (real control tokens, counted and warned about), reject = drop the
    # conversation, escape = tokenize it as the literal characters.
    control_tokens: Literal["keep", "reject", "escape"] = "keep"

    def problems(self) -> list[str]:
        found = option_problems(self.cutoff_len, self.train_on_prompt, self.mask_history)
        if self.val_size < 0 or (isinstance(self.val_size, float) and self.val_size >= 1):
            found.append(f"val_size: a fraction in [0, 1) or a count >= 0, got {self.val_size}")
        return found


@dataclasses.dataclass(frozen=True)
class GenerationEvalConfig:
    """``train.generation_eval``: answers generated at each evaluation while training, to watch them change."""

    samples: int = 0  # validation prompts answered at each evaluation, a fixed seeded sample (0: off)
    max_new_tokens: int = 128  # answer length limit (greedy decoding)
    batch_size: int = 8  # prompts per generate call (left-padded)

    def problems(self) -> list[str]:
        found = [f"samples: must be 0 (off) or positive, got {self.samples}"] if self.samples < 0 else []
        return found + [
            f"{key}: must be positive, got {getattr(self, key)}"
            for key in ("max_new_tokens", "batch_size")
            if getattr(self, key) < 1
        ]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """``params:train``: the SFT recipe's hyperparameters (LLaMA-Factory's names and meanings)."""

    finetuning_type: Literal["lora", "full", "freeze"] = "lora"
    # LoRA / DoRA / QLoRA
    lora_rank: int = 8
    lora_alpha: int | None = None  # default: 2 * lora_rank (as LLaMA-Factory)
    lora_dropout: float = 0.0
    lora_target: str | list[str] = "all"  # "all" = every linear layer but the output head
    additional_target: list[str] | None = None  # modules trained fully beside LoRA (e.g. embed_tokens)
    use_dora: bool = False  # weight-decomposed LoRA
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    quantization_bit: int | None = None  # 4 (nf4, double quantization) or 8: QLoRA
    # freeze: train only the last N decoder layers (negative: the first N)
    freeze_trainable_layers: int = 2
    # optimisation
    learning_rate: float = 1.0e-4
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 8
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    seed: int = 42
    shuffle: bool = True  # shuffle the training examples each epoch (false: in dataset order)
    packing: bool = False  # several examples per sequence, bins filled across the whole dataset
    neat_packing: bool = False  # packing with attention and position ids restarting per example
    padding_free: bool = False  # each batch as one row, no padding, attention restarting per example
    pack_length: int | None = None  # tokens per packed sequence (null: the cutoff_len the data was made with)
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    flash_attn: Literal["auto", "sdpa", "fa2", "disabled"] = "auto"  # auto = transformers' default (sdpa)
    deepspeed: str | None = None  # a DeepSpeed JSON config path
    nproc_per_node: int = 1  # > 1: run under torchrun (env NPROC_PER_NODE wins)
    nnodes: int = 1  # > 1: multi-node torchrun (env NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT)
    ddp_timeout: int = 1800  # seconds a process waits for the others
    save_steps: int = 0  # checkpoint every N optimizer steps (0: no checkpoints)
    save_total_limit: int | None = 2  # keep at most this many checkpoints
    # Evaluation while training, on the validation split (the Trainer's and LLaMA-Factory's names)
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: int | None = None  # steps between evaluations (null: logging_steps)
    eval_max_samples: int | None = None  # a seeded sample of this many validation examples (null: all)
    load_best_model_at_end: bool = False  # the trained model is the checkpoint with the lowest eval loss
    metric_for_best_model: Literal["eval_loss"] = "eval_loss"
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement (0: never)
    early_stopping_threshold: float = 0.0  # an improvement this small or smaller does not count
    generation_eval: GenerationEvalConfig = dataclasses.field(default_factory=GenerationEvalConfig)
    overwrite_output_dir: bool = False  # start over instead of resuming from the last complete checkpoint
    output_dir: str = "data/06_models/checkpoints"  # checkpoints, one folder per run configuration
    loss_chunk_rows: int = 512  # labelled positions per output-head chunk: at most this x vocab float32 logits at once
    # Before any weights load: the per-device memory plan against the devices' free memory (RAM on CPU).
    # error: a run that cannot fit stops, naming what would; warn: logs that and goes on; off: no check.
    memory_check: Literal["error", "warn", "off"] = "error"

    def problems(self) -> list[str]:
        found = []
        for key in (
            "lora_rank",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "loss_chunk_rows",
        ):
            if getattr(self, key) < 1:
                found.append(f"{key}: must be positive, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            found.append(f"learning_rate: must be positive, got {self.learning_rate}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            found.append("num_train_epochs: must be positive when max_steps is not set")
        if not 0.0 <= self.lora_dropout < 1.0:
            found.append(f"lora_dropout: must be within [0, 1), got {self.lora_dropout}")
        if self.quantization_bit not in (None, 4, 8):
            found.append(f"quantization_bit: 4 or 8, got {self.quantization_bit}")
        elif self.quantization_bit and self.finetuning_type != "lora":
            found.append(
                f"quantization_bit: QLoRA trains adapters; it needs finetuning_type lora, not {self.finetuning_type}"
            )
        if self.bf16 and self.fp16:
            found.append("fp16: choose bf16 or fp16, not both")
        if self.flash_attn == "fa2" and not (self.bf16 or self.fp16):
            found.append("flash_attn: fa2 runs in 16-bit only; set bf16 (or fp16) with it, or use sdpa")
        if self.neat_packing and self.padding_free:
            found.append("padding_free: choose neat_packing or padding_free, not both")
        if self.packing and self.padding_free:
            found.append("padding_free: choose packing or padding_free, not both")
        if self.save_steps < 0:
            found.append(f"save_steps: must be 0 (no checkpoints) or positive, got {self.save_steps}")
        if self.freeze_trainable_layers == 0:
            found.append("freeze_trainable_layers: must not be 0")
        return found + self._eval_problems()

    def _eval_problems(self) -> list[str]:
        found = [
            f"{key}: must be positive, got {getattr(self, key)}"
            for key in ("eval_steps", "eval_max_samples")
            if getattr(self, key) is not None and getattr(self, key) < 1
        ]
        if self.early_stopping_patience < 0:
            found.append(f"early_stopping_patience: must be 0 (off) or positive, got {self.early_stopping_patience}")
        needs_eval = [k for k in ("load_best_model_at_end", "early_stopping_patience") if getattr(self, k)]
        needs_eval += ["generation_eval"] if self.generation_eval.samples else []
        if needs_eval and self.eval_strategy == "no":
            found.append(f"{needs_eval[0]}: needs evaluations while training; set eval_strategy: steps (or epoch)")
        every = self.eval_steps or self.logging_steps
        steps = self.eval_strategy == "steps"
        if self.load_best_model_at_end and self.save_steps and steps and self.save_steps % every:
            found.append(
                f"save_steps: {self.save_steps} is not a multiple of eval_steps {every}: load_best_model_at_end can "
                "only return a checkpoint saved at an evaluation (or set save_steps: 0 to save the best one only)"
            )
        return found


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """``params:merge``: the adapter merged into the base and exported (LLaMA-Factory's export_* names)."""

    export_size: float = 5.0  # GB (10^9 bytes) per weight shard; more weights give more shards
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the base model's own dtype
    export_device: str = "cpu"  # where the merge arithmetic runs: cpu, auto (cuda when present), cuda, cuda:N
    export_legacy_format: bool = False  # write pytorch_model*.bin instead of safetensors
    method: Literal["auto", "streamed", "in_memory"] = "auto"  # auto: streamed, tensor by tensor, when possible
    check_tolerance: float | None = (
        None  # max |logit diff|; null: 0.1% of the largest logit (float32), 2% of the range (16-bit)
    )
    check_texts: list[str] = dataclasses.field(  # fixed inputs for the logit check (control tokens allowed)
        default_factory=lambda: [
            "<|im_start|>user\nMerging must not change what the model says.<|im_end|>\n"
            "<|im_start|>assistant\nIt must not: same weights, same answers.<|im_end|>\n",
            "<|im_start|>user\n合并后的模型必须给出相同的结果。<|im_end|>\n<|im_start|>assistant\n是的。<|im_end|>\n",
        ]
    )

    def problems(self) -> list[str]:
        found = []
        if self.export_size <= 0:
            found.append(f"export_size: must be positive (GB per shard), got {self.export_size}")
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.export_device):
            found.append(f"export_device: cpu, auto, cuda or cuda:N, got {self.export_device!r}")
        if self.check_tolerance is not None and self.check_tolerance <= 0:
            found.append(f"check_tolerance: must be positive, got {self.check_tolerance}")
        if not self.check_texts or not all(t.strip() for t in self.check_texts):
            found.append("check_texts: give at least one non-empty text")
        return found


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """``params:evaluate``: eval loss and generation metrics, base model beside the fine-tuned one."""

    batch_size: int = 4  # examples per forward pass / generate call
    max_samples: int | None = None  # validation examples to generate answers for (null: all)
    max_new_tokens: int = 128  # generation length limit
    do_sample: bool = False  # false: greedy, deterministic
    temperature: float = 0.95  # used only when do_sample
    top_p: float = 0.7  # used only when do_sample
    seed: int = 42  # used only when do_sample
    compare_base: bool = True  # evaluate the base model too, beside the fine-tuned one

    def problems(self) -> list[str]:
        found = []
        for key in ("batch_size", "max_new_tokens"):
            if getattr(self, key) < 1:
                found.append(f"{key}: must be positive, got {getattr(self, key)}")
        if self.max_samples is not None and self.max_samples < 0:
            found.append(f"max_samples: must be 0 or more, got {self.max_samples}")
        return found


# The blocks: every dataclass defined above.
__all__ = [
    name for name, value in list(globals().items()) if name.endswith("Config") and dataclasses.is_dataclass(value)
]
