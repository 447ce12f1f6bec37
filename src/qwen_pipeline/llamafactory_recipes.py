"""LLaMA-Factory recipes in and out: a ``llamafactory-cli train`` / ``export`` config (YAML or JSON) or command
line becomes a configuration environment (``conf/<env>/parameters.yml`` + ``globals.yml``), and an environment
becomes ``train.yaml`` / ``merge.yaml`` that LLaMA-Factory 0.9.5 accepts.

Every LLaMA-Factory 0.9.5 key (``resources/llamafactory_0.9.5_keys.json``: each train/export argument and its
default) is either mapped to the parameter of the stage that uses it (``MAPPED``), listed with why it means
nothing here (``IGNORED``), or honoured only at values we can (``ONLY``); any other key at a value other than its
default is refused, as is a key LLaMA-Factory does not know ("did you mean").
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Callable, Iterable
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from .errors import QwenPipelineError

LLAMAFACTORY_VERSION = "0.9.5"


class RecipeError(QwenPipelineError):
    """A recipe that cannot be carried over: every reason at once."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}: cannot import, nothing written:\n" + "\n".join(f"  - {p}" for p in problems))


def _comma_list(value: Any) -> Any:
    """LLaMA-Factory's "a,b" lists (lora_target, dataset, additional_target) as lists; "all" stays a word."""
    if isinstance(value, str) and value != "all":
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _flash_attn(value: Any) -> Any:
    """``--flash_attn`` given bare (older LLaMA-Factory, the Qwen2.5 guide) meant FlashAttention-2."""
    return "fa2" if value is True else value


@dataclasses.dataclass(frozen=True)
class Mapped:
    """Where an LLaMA-Factory key goes: one or more ``block.key`` parameters, through ``convert``."""

    to: tuple[str, ...]
    convert: Callable[[Any], Any] | None = None
    back: Callable[[Any], Any] | None = None  # our value as LLaMA-Factory writes it
    none: Any = None  # our value for LLaMA-Factory's null


def _to(*targets: str, convert=None, back=None, none=None) -> Mapped:
    return Mapped(targets, convert, back, none)


# LLaMA-Factory key -> our parameter(s). "model.*" go to globals.yml (the base_model dataset's settings).
MAPPED: dict[str, Mapped] = {
    # the base model
    "model_name_or_path": _to("model.model_name_or_path"),
    "trust_remote_code": _to("model.trust_remote_code"),
    "use_fast_tokenizer": _to("model.use_fast_tokenizer"),
    # data
    "dataset": _to("ingest.dataset", convert=_comma_list),
    "eval_dataset": _to("ingest.eval_dataset", convert=_comma_list, none=[]),
    "max_samples": _to("ingest.max_samples"),
    "mix_strategy": _to("ingest.mix_strategy"),
    "interleave_probs": _to(
        "ingest.interleave_probs",
        convert=lambda v: [float(x) for x in (_comma_list(v) if isinstance(v, (str, list)) else [v])],
    ),
    "overwrite_cache": _to("processing.overwrite_cache"),
    "preprocessing_num_workers": _to("processing.num_proc"),
    "preprocessing_batch_size": _to("processing.batch_size"),
    "template": _to("format.template"),
    "cutoff_len": _to("format.cutoff_len"),
    "train_on_prompt": _to("format.train_on_prompt"),
    "mask_history": _to("format.mask_history"),
    "val_size": _to("format.val_size"),
    "packing": _to("train.packing"),
    "neat_packing": _to("train.neat_packing"),
    # method
    "finetuning_type": _to("train.finetuning_type"),
    "lora_rank": _to("train.lora_rank"),
    "lora_alpha": _to("train.lora_alpha"),
    "lora_dropout": _to("train.lora_dropout"),
    "lora_target": _to(
        "train.lora_target", convert=_comma_list, back=lambda v: v if isinstance(v, str) else ",".join(v)
    ),
    "additional_target": _to("train.additional_target", convert=_comma_list, back=lambda v: ",".join(v)),
    "use_dora": _to("train.use_dora"),
    "use_rslora": _to("train.use_rslora"),
    "quantization_bit": _to("train.quantization_bit"),
    "freeze_trainable_layers": _to("train.freeze_trainable_layers"),
    "flash_attn": _to("train.flash_attn", convert=_flash_attn),
    # optimisation
    "learning_rate": _to("train.learning_rate", convert=float),
    "num_train_epochs": _to("train.num_train_epochs", convert=float),
    "max_steps": _to("train.max_steps"),
    "per_device_train_batch_size": _to("train.per_device_train_batch_size"),
    "per_device_eval_batch_size": _to("train.per_device_eval_batch_size"),
    "gradient_accumulation_steps": _to("train.gradient_accumulation_steps"),
    "lr_scheduler_type": _to("train.lr_scheduler_type"),
    "warmup_ratio": _to("train.warmup_ratio", convert=float, none=0.0),
    "warmup_steps": _to("train.warmup_steps"),
    "weight_decay": _to("train.weight_decay", convert=float),
    "max_grad_norm": _to("train.max_grad_norm", convert=float),
    "logging_steps": _to("train.logging_steps"),
    "seed": _to("train.seed", "format.seed", "ingest.seed"),  # LLaMA-Factory has one seed for all of them
    "disable_shuffling": _to("train.shuffle", convert=lambda v: not v, back=lambda v: not v),
    "bf16": _to("train.bf16"),
    "fp16": _to("train.fp16"),
    "disable_gradient_checkpointing": _to(
        "train.gradient_checkpointing", convert=lambda v: not v, back=lambda v: not v
    ),
    "deepspeed": _to("train.deepspeed"),  # resolved to a config file here (import_recipe)
    "ddp_timeout": _to("train.ddp_timeout"),
    "save_steps": _to("train.save_steps"),
    "save_total_limit": _to("train.save_total_limit"),
    "overwrite_output_dir": _to("train.overwrite_output_dir"),
    "eval_strategy": _to("train.eval_strategy"),
    "eval_steps": _to("train.eval_steps"),
    "load_best_model_at_end": _to("train.load_best_model_at_end"),
    "metric_for_best_model": _to("train.metric_for_best_model", convert=lambda v: "eval_loss", none="eval_loss"),
    "early_stopping_steps": _to("train.early_stopping_patience", none=0),
    # export (merge)
    "export_size": _to("merge.export_size"),
    "export_device": _to("merge.export_device"),
    "export_legacy_format": _to("merge.export_legacy_format"),
    "infer_dtype": _to("merge.export_dtype"),
}

# LLaMA-Factory key -> why it means nothing here (listed in the output and in the written file).
IGNORED: dict[str, str] = {
    "do_train": "the train pipeline trains; there is no separate switch",
    "do_eval": "evaluation while training is eval_strategy; after training, the evaluate pipeline",
    "output_dir": "checkpoints go to train.output_dir, a folder per data + model + hyperparameters; the adapter "
    "to data/06_models/trained (catalog trained_model)",
    "export_dir": "the merged model goes to data/06_models/merged (catalog merged_model) and to MLflow",
    "adapter_name_or_path": "merge takes the adapter the train stage saved (data/06_models/trained)",
    "dataset_dir": "datasets are read from data/01_raw (its dataset_info.json and the files it names): copy them there",
    "report_to": "every run logs to MLflow through kedro-mlflow (conf/base/mlflow.yml)",
    "run_name": "the MLflow run is named after the pipelines run",
    "logging_dir": "logs go to MLflow",
    "plot_loss": "the loss curve is always drawn (data/08_reporting/training_loss.png) and logged to MLflow",
    "resume_from_checkpoint": "a rerun resumes from the last complete checkpoint by itself "
    "(train.overwrite_output_dir: true starts over)",
    "save_only_model": "checkpoints hold what resuming needs",
    "gradient_checkpointing": "LLaMA-Factory turns it on itself unless disable_gradient_checkpointing (mapped)",
    "ddp_find_unused_parameters": "set by the Trainer",
    "dataloader_num_workers": "batches are built in the training process",
    "tokenized_path": "the format stage caches its output itself (data/03_primary/sft_dataset)",
    "cache_dir": "models come from the Hugging Face cache or a local folder",
    "hf_hub_token": "log in with `huggingface-cli login` instead",
    "low_cpu_mem_usage": "models always load without a first random copy",
    "infer_backend": "the evaluate pipeline generates with transformers",
    "predict_with_generate": "the evaluate pipeline generates",
}

# LLaMA-Factory key -> the values we honour (others are refused, saying why).
ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "stage": (("sft",), "only supervised fine-tuning (stage: sft) is built here"),
    "template": (("qwen",), "only the qwen template is built here (Qwen2.5 chat models)"),
    "quantization_method": (("bnb", "bitsandbytes"), "QLoRA here is bitsandbytes only"),
    "quantization_type": (("nf4",), "QLoRA 4-bit here is nf4"),
    "double_quantization": ((True,), "QLoRA 4-bit here always uses double quantization"),
    "optim": (("adamw_torch", "adamw_torch_fused"), "the optimizer here is the Trainer's AdamW"),
    "metric_for_best_model": (("eval_loss", "loss"), "the best model here is the lowest eval loss"),
    "streaming": ((False,), "the data stages stream from disk already; streaming datasets are not read"),
    "eval_strategy": (("no", "steps", "epoch"), "eval_strategy is no, steps or epoch"),
    "save_strategy": (("steps", "no", "best"), "checkpoints are every save_steps steps (no / best: save_steps 0)"),
    "model_revision": (("main",), "the model is read at the revision in the Hugging Face cache or the folder"),
}


def llamafactory_keys() -> dict[str, Any]:
    """Every train / export argument of LLaMA-Factory 0.9.5 and its default (``null`` where it has none)."""
    path = files("qwen_pipeline") / "resources" / f"llamafactory_{LLAMAFACTORY_VERSION}_keys.json"
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------- reading


def read_recipe_file(path: Path) -> dict[str, Any]:
    """A recipe file as ``llamafactory-cli`` reads it: YAML (.yaml / .yml) or JSON (.json), one mapping."""
    if not path.is_file():
        raise RecipeError(str(path), ["no such file"])
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise RecipeError(str(path), [f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), ["expected a mapping of LLaMA-Factory arguments"])
    return data


RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


def read_recipes(items: list[str]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """What ``kedro llamafactory import`` was given: recipe files then ``key=value`` overrides, or a command line.
    Returns (the recipe, the launcher's settings, where it came from)."""
    if items and Path(items[0]).suffix in RECIPE_SUFFIXES and "=" not in items[0]:
        recipe, files = read_recipe_files(items)
        return recipe, {}, " + ".join(files)
    recipe, launcher = read_command_line(items)
    return recipe, launcher, "the command line"


def read_recipe_files(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Recipe files read in order (a key given in two must agree), then ``key=value`` overrides as
    ``OmegaConf.from_cli`` reads them (what ``llamafactory-cli train FILE k=v`` does). Returns (recipe, files)."""
    files = [item for item in items if Path(item).suffix in RECIPE_SUFFIXES and "=" not in item]
    recipe: dict[str, Any] = {}
    for file in files:
        for key, value in read_recipe_file(Path(file)).items():
            if key in recipe and recipe[key] != value:
                raise RecipeError(" + ".join(files), [f"{key}: {recipe[key]!r} in one file, {value!r} in {file}"])
            recipe[key] = value
    for item in items:
        if item not in files:
            key, _, value = item.lstrip("-").partition("=")
            recipe[key] = _scalar(value)
    return recipe, files


LAUNCHERS = {  # the first words of a command line, before the script's own arguments
    "torchrun": "torchrun", "deepspeed": "deepspeed", "python": "python", "python3": "python",
}  # fmt: skip


def read_command_line(args: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The arguments ``llamafactory-cli train`` / ``src/train.py`` take (``--key value``, ``--key=value``, a bare
    ``--flag`` is true), typed as LLaMA-Factory's parser types them. They may follow environment assignments
    (``FORCE_TORCHRUN=1 NPROC_PER_NODE=8``), ``llamafactory-cli train`` or ``export``, or a launcher and its
    options before the script (``torchrun --nproc_per_node 8 src/train.py``, ``deepspeed --num_gpus 8 ...``,
    ``python src/train.py``). Returns (the recipe, the launcher's settings: nproc_per_node, nnodes, and the
    other words it was given)."""
    args = list(args)
    launcher: dict[str, Any] = {}
    while args and "=" in args[0] and not args[0].startswith("-"):  # VAR=value before the command
        name, _, value = args.pop(0).partition("=")
        launcher[{"NPROC_PER_NODE": "nproc_per_node", "NNODES": "nnodes"}.get(name, f"${name}")] = _scalar(value)
    if args and args[0] in LAUNCHERS:
        script = next((i for i, a in enumerate(args) if a.endswith(".py")), None)
        if script is None:
            raise RecipeError("command line", [f"{args[0]} without the training script (src/train.py)"])
        options = _options(args[1:script], args[0])
        renamed = {"num_gpus": "nproc_per_node", "num_nodes": "nnodes"}
        launcher |= {renamed.get(k.replace("-", "_"), k.replace("-", "_")): _scalar(v) if isinstance(v, str) else v
                     for k, v in options.items()}  # fmt: skip
        args = args[script + 1 :]
    elif args[:1] == ["llamafactory-cli"] and args[1:2] in (["train"], ["export"]):
        args = args[2:]
    if args and not args[0].startswith("-"):  # llamafactory-cli train recipe.yaml key=value ...
        recipe, _ = read_recipe_files(args)
        return recipe, launcher
    known = llamafactory_keys()
    options = _options(args, "command line")
    return {key: _typed(value, known.get(key)) for key, value in options.items()}, launcher


def _options(args: list[str], source: str) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` as text, a bare ``--flag`` as True."""
    found: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise RecipeError(source, [f"expected --key, got {arg!r} (after {' '.join(args[:i])!r})"])
        key, equals, value = arg[2:].partition("=")
        if equals:
            found[key] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            found[key] = args[i + 1]
            i += 1
        else:
            found[key] = True
        i += 1
    return found


def _typed(text: Any, default: Any) -> Any:
    """A command-line value as LLaMA-Factory's argument parser reads it, by the argument's type (known from its
    default): yes/no/true/false for a flag, numbers for numbers, the text itself for text (eval_strategy no)."""
    if not isinstance(text, str):
        return text
    low = text.lower()
    if isinstance(default, bool) or (default is None and low in ("true", "false")):
        return {
            "true": True,
            "yes": True,
            "y": True,
            "1": True,
            "false": False,
            "no": False,
            "n": False,
            "0": False,
        }.get(low, text)
    if isinstance(default, str):
        return text
    number = _scalar(text)
    return number if isinstance(number, (int, float)) and not isinstance(number, bool) else text


def _scalar(text: str) -> Any:
    """A value typed as YAML would (OmegaConf.from_cli, for key=value overrides), with numbers such as 5e-6 read as
    numbers."""
    value = yaml.safe_load(text) if text else ""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return value


# ---------------------------------------------------------------------------------------------------- importing


@dataclasses.dataclass
class ImportedRecipe:
    """What an environment gets: its blocks by name (``model`` is globals.yml's), the keys ignored and why, and a
    DeepSpeed config to copy into the environment (source, file name) when the recipe's is not one of ours."""

    blocks: dict[str, dict[str, Any]]
    ignored: dict[str, str]
    at_default: list[str]
    deepspeed_copy: tuple[Path, str] | None = None
    filled: list[str] = dataclasses.field(default_factory=list)  # LLaMA-Factory defaults written (see import_recipe)


# Keys whose LLaMA-Factory default is not written for a recipe that leaves them out: required there, or a default
# that means something else here (null workers: one process there, the cores here; packing null: off for SFT).
NOT_FILLED = {
    "model_name_or_path", "trust_remote_code", "use_fast_tokenizer", "template", "dataset", "packing",
    "preprocessing_num_workers", "preprocessing_batch_size", "infer_dtype",
}  # fmt: skip
TRAIN_BLOCKS, EXPORT_BLOCKS = ("ingest", "processing", "format", "train"), ("merge",)


def import_recipe(
    recipe: dict[str, Any],
    source: str,
    *,
    recipe_dir: Path,
    project: Path,
    env: str,
    launcher: dict[str, Any] | None = None,
    base_parameters: dict[str, Any] | None = None,
) -> ImportedRecipe:
    """Map every key of ``recipe`` (see the module's docstring); raise ``RecipeError`` with every problem.

    A key the recipe leaves out runs at LLaMA-Factory's default there; here it would run at conf/base's value. Where
    the two differ (``base_parameters``: conf/base's blocks), LLaMA-Factory's default is written too (``filled``)."""
    known = llamafactory_keys()
    problems: list[str] = []
    blocks: dict[str, dict[str, Any]] = {}
    ignored: dict[str, str] = {}
    at_default: list[str] = []
    deepspeed_copy = None
    for key, value in recipe.items():
        if key in ONLY and value not in ONLY[key][0]:
            problems.append(f"{key}: {value!r} cannot be honoured: {ONLY[key][1]}")
            continue
        if key in MAPPED:
            mapped = MAPPED[key]
            converted = mapped.none if value is None else mapped.convert(value) if mapped.convert else value
            if key == "deepspeed" and value is not None:
                converted, deepspeed_copy, problem = _deepspeed(str(value), recipe_dir, project, env)
                if problem:
                    problems.append(problem)
                    continue
            for target in mapped.to:
                block, name = target.split(".", 1)
                blocks.setdefault(block, {})[name] = converted
        elif key in IGNORED:
            ignored[key] = IGNORED[key]
        elif key in ONLY:
            at_default.append(key)  # at a value we honour, which is what happens here anyway
        elif key in known:
            if _same(value, known[key]):
                at_default.append(key)
            else:
                problems.append(
                    f"{key}: {value!r} cannot be honoured: LLaMA-Factory's {key} has no counterpart here "
                    f"(its default, {known[key]!r}, is what runs here)"
                )
        else:
            close = difflib.get_close_matches(key, [*known, *MAPPED], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{key}: not an argument of LLaMA-Factory {LLAMAFACTORY_VERSION}{hint}")
    for key, value in (launcher or {}).items():
        if key in ("nproc_per_node", "nnodes") and isinstance(value, int) and not isinstance(value, bool):
            blocks.setdefault("train", {})[key] = value
        elif key in ("nproc_per_node", "nnodes"):
            ignored[f"launcher {key}"] = f"{value!r} is not a number: set train.{key} or the env var at run time"
        elif key == "$FORCE_TORCHRUN":
            ignored["FORCE_TORCHRUN"] = "kedro starts torchrun itself when train.nproc_per_node or nnodes is above 1"
        elif key.startswith("$"):
            ignored[key[1:]] = "an environment variable of the command line: set it when running kedro, if needed"
        else:
            ignored[f"launcher --{key}"] = "set by the environment at run time (NODE_RANK, MASTER_ADDR, MASTER_PORT)"
    problems += _recipe_rules(recipe, blocks)
    filled = _fill_defaults(recipe, blocks, known, base_parameters or {})
    problems += _check_blocks(blocks)
    if problems:
        raise RecipeError(source, problems)
    return ImportedRecipe(blocks, ignored, at_default, deepspeed_copy, filled)


def _fill_defaults(recipe, blocks, known, base_parameters) -> list[str]:
    """LLaMA-Factory's defaults of the keys ``recipe`` leaves out, where conf/base would give another value."""
    training = any(key in recipe for key in ("stage", "do_train", "dataset"))
    exporting = any(key.startswith("export_") or key == "adapter_name_or_path" for key in recipe)
    wanted = (TRAIN_BLOCKS if training else ()) + (EXPORT_BLOCKS if exporting else ())
    filled = []
    for key, mapped in MAPPED.items():
        if key in recipe or key in NOT_FILLED or key not in known:
            continue
        value = known[key]
        value = mapped.none if value is None else mapped.convert(value) if mapped.convert else value
        for target in mapped.to:
            block, name = target.split(".", 1)
            if block not in wanted or name in blocks.get(block, {}):
                continue
            if (base_parameters.get(block) or {}).get(name, value) != value:
                blocks.setdefault(block, {})[name] = value
                filled.append(f"{target}: {value!r} ({key})")
    return filled


def _recipe_rules(recipe: dict[str, Any], blocks: dict[str, dict[str, Any]]) -> list[str]:
    """Keys that change what another key means: save_strategy no / best (no periodic checkpoints), warmup_steps
    below 1 (a ratio, as transformers 5 reads it), and a ratio and a count of warmup steps together (there the
    ratio wins, here the steps: refused)."""
    train = blocks.setdefault("train", {})
    if recipe.get("save_strategy") in ("no", "best"):
        train["save_steps"] = 0  # best: with load_best_model_at_end, only the best is kept (TrainConfig's rule)
    steps, ratio = recipe.get("warmup_steps"), recipe.get("warmup_ratio")
    if isinstance(steps, float) and 0 < steps < 1:
        if ratio:
            return [f"warmup_steps: {steps} is a ratio (below 1) and warmup_ratio is {ratio}: give one"]
        train["warmup_ratio"], train["warmup_steps"] = steps, 0
    elif steps and ratio:
        return [
            f"warmup_ratio: {ratio} and warmup_steps: {steps} are both set; LLaMA-Factory (transformers 5) uses the "
            "ratio, this project the steps: give one"
        ]
    if not train:
        blocks.pop("train")
    return []


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, (int, float)) and isinstance(default, (int, float)) and not isinstance(value, bool):
        return math.isclose(float(value), float(default))
    return value == default or (value in ("", None) and default in ("", None))


def _check_blocks(blocks: dict[str, dict[str, Any]]) -> list[str]:
    """Our own checks of each block (types, ranges, rules within a block), as a run would make them."""
    from .config import ConfigError, parse_config
    from .config import blocks as configs

    by_block = {
        "model": configs.ModelConfig,
        "ingest": configs.IngestConfig,
        "processing": configs.ProcessingConfig,
        "format": configs.FormatConfig,
        "train": configs.TrainConfig,
        "merge": configs.MergeConfig,
    }
    problems = []
    for name, values in blocks.items():
        try:
            parse_config(by_block[name], values, name)
        except ConfigError as error:
            problems += [f"{p} (from the recipe)" for p in error.problems]
    return problems


OUR_DEEPSPEED = {  # LLaMA-Factory's example names -> ours (the same settings)
    "ds_z0_config.json": "zero0.json",
    "ds_z2_config.json": "zero2.json",
    "ds_z2_offload_config.json": "zero2_offload.json",
    "ds_z3_config.json": "zero3.json",
    "ds_z3_offload_config.json": "zero3_offload.json",
}


def _deepspeed(
    value: str, recipe_dir: Path, project: Path, env: str
) -> tuple[str | None, tuple[Path, str] | None, str | None]:
    """(the train.deepspeed path, a file to copy into the env, a problem): a config whose settings are one of
    conf/base/deepspeed's is referenced there; another is copied into conf/<env>/deepspeed/; a missing file is
    taken by LLaMA-Factory's example name, else refused."""
    ours = Path("conf/base/deepspeed")
    candidates = [Path(value), recipe_dir / value]  # as llamafactory-cli (run from its folder) or beside the recipe
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        if Path(value).name in OUR_DEEPSPEED:
            return str(ours / OUR_DEEPSPEED[Path(value).name]), None, None
        return None, None, f"deepspeed: no file {value} (looked in . and {recipe_dir})"
    try:
        settings = json.loads(found.read_text())
    except json.JSONDecodeError as error:
        return None, None, f"deepspeed: {found} is not valid JSON ({error})"
    for name in sorted(set(OUR_DEEPSPEED.values())):
        if (project / ours / name).is_file() and json.loads((project / ours / name).read_text()) == settings:
            return str(ours / name), None, None
    return f"conf/{env}/deepspeed/{found.name}", (found, found.name), None


# ---------------------------------------------------------------------------------------------------- writing


def write_environment(imported: ImportedRecipe, conf: Path, env: str, source: str, *, overwrite: bool) -> list[Path]:
    """``conf/<env>/parameters.yml`` (the stages' blocks), ``globals.yml`` (the model block) and a copied DeepSpeed
    config; the ignored keys as comments at the top of parameters.yml. Returns the files written."""
    folder = conf / env
    if folder.exists() and not overwrite:
        raise RecipeError(source, [f"{folder} exists: choose another --env, or --force to replace it"])
    folder.mkdir(parents=True, exist_ok=True)
    header = [f"# Imported from {source} (LLaMA-Factory {LLAMAFACTORY_VERSION}) by `kedro llamafactory import`."]
    if imported.ignored:
        header.append("# Keys with no meaning here:")
        header += [f"#   {key}: {why}" for key, why in imported.ignored.items()]
    if imported.at_default:
        header.append(f"# At the value that runs here anyway: {', '.join(imported.at_default)}")
    if imported.filled:
        header.append("# Left out of the recipe, so at LLaMA-Factory's default (conf/base says otherwise):")
        header += [f"#   {item}" for item in imported.filled]
    stages = {k: v for k, v in imported.blocks.items() if k != "model"}
    written = [folder / "parameters.yml"]
    text = "\n".join(header) + "\n" + (yaml.safe_dump(stages, sort_keys=False, allow_unicode=True) if stages else "")
    written[0].write_text(text)
    if "model" in imported.blocks:
        written.append(folder / "globals.yml")
        written[-1].write_text(
            f"# The base model of {source}\n" + yaml.safe_dump({"model": imported.blocks["model"]}, sort_keys=False)
        )
    if imported.deepspeed_copy:
        source_file, name = imported.deepspeed_copy
        (folder / "deepspeed").mkdir(exist_ok=True)
        written.append(folder / "deepspeed" / name)
        written[-1].write_bytes(source_file.read_bytes())
    return written


# ---------------------------------------------------------------------------------------------------- exporting


def export_recipe(
    parameters: dict[str, Any], model: dict[str, Any], *, model_path: str, out_name: str
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """An environment's parameters as LLaMA-Factory's ``train.yaml`` and ``merge.yaml``, and the settings of
    ours that LLaMA-Factory has no key for, where they differ from their defaults (they do not carry over)."""
    from .config import blocks as configs

    defaults = {
        "ingest": configs.IngestConfig(dataset=["x"]),
        "processing": configs.ProcessingConfig(),
        "format": configs.FormatConfig(),
        "train": configs.TrainConfig(),
        "merge": configs.MergeConfig(),
    }
    train: dict[str, Any] = {
        "model_name_or_path": model_path,
        "trust_remote_code": model.get("trust_remote_code", False),
    }
    train |= {"stage": "sft", "do_train": True}
    merge: dict[str, Any] = {"model_name_or_path": model_path, "template": "qwen", "finetuning_type": "lora"}
    carried = set()
    for key, mapped in MAPPED.items():
        if key in ("model_name_or_path", "trust_remote_code"):
            continue
        block, name = mapped.to[0].split(".", 1)
        if block == "model":
            value = model.get(name)
        else:
            value = (parameters.get(block) or {}).get(name, getattr(defaults[block], name, None))
        carried.update(mapped.to)
        if (
            value is None
            or (isinstance(value, list) and not value)
            or (mapped.none is not None and value == mapped.none)
        ):
            continue  # LLaMA-Factory's default there too
        value = mapped.back(value) if mapped.back else value
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        (merge if block == "merge" else train)[key] = value
    train["dataset_dir"] = "data/01_raw"
    train["output_dir"] = f"saves/{out_name}/sft"
    train["report_to"] = "none"
    train["plot_loss"] = True
    merge["adapter_name_or_path"] = train["output_dir"]
    merge["export_dir"] = f"saves/{out_name}/merged"
    if isinstance(merge.get("export_size"), float):
        merge["export_size"] = math.ceil(merge["export_size"])  # LLaMA-Factory takes whole GB
    ours = parameters.get("train") or {}
    if train.get("save_steps") == 0:  # ours: no checkpoints, or only the best one (with load_best_model_at_end)
        train.pop("save_steps")
        train["save_strategy"] = "best" if train.get("load_best_model_at_end") else "no"
    if train.get("early_stopping_steps") or train.get("load_best_model_at_end"):
        train["metric_for_best_model"] = "eval_loss"  # transformers' early stopping needs it named
    if train.get("eval_dataset"):
        train.pop("val_size", None)  # unused with an eval dataset, here as there; LLaMA-Factory refuses both
    if train.get("warmup_steps"):
        train.pop("warmup_ratio", None)  # the steps win here; there (transformers 5) a ratio would
    else:
        train.pop("warmup_steps", None)
    if merge.get("export_device", "cpu") != "cpu":
        merge["export_device"] = "auto"  # LLaMA-Factory's only other choice
    if train.get("finetuning_type") != "lora":
        merge = {}
    launcher = {"nproc_per_node", "nnodes"}  # LLaMA-Factory takes them from the environment (see the header)
    lost = []
    for block, config in defaults.items():
        for field in dataclasses.fields(config):
            name = f"{block}.{field.name}"
            value = (parameters.get(block) or {}).get(field.name)
            default = getattr(config, field.name)
            default = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
            if name not in carried and field.name not in launcher and value is not None and value != default:
                lost.append(f"{name}: {value!r}")
    for name in ("format.seed", "ingest.seed"):  # one seed there: train.seed's
        block, key = name.split(".")
        if (value := (parameters.get(block) or {}).get(key)) is not None and value != ours.get("seed", 42):
            lost.append(f"{name}: {value!r} (LLaMA-Factory has one seed, train.seed's {ours.get('seed', 42)})")
    return train, merge, lost
