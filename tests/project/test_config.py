"""Parameters become typed configs; every problem is reported at once, naming its key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader

from qwen_pipeline.config import (
    ConfigError,
    EvaluateConfig,
    FormatConfig,
    IngestConfig,
    MergeConfig,
    ModelConfig,
    ProcessingConfig,
    TrainConfig,
    ValidateConfig,
    parse_config,
)
from qwen_pipeline.settings import CONFIG_LOADER_ARGS

CONF = Path(__file__).resolve().parents[2] / "conf"
SECTIONS = {
    "ingest": IngestConfig,
    "validate": ValidateConfig,
    "processing": ProcessingConfig,
    "format": FormatConfig,
    "train": TrainConfig,
    "merge": MergeConfig,
    "evaluate": EvaluateConfig,
}


def test_every_shipped_parameters_file_loads_into_its_config():
    loader = OmegaConfigLoader(str(CONF), **CONFIG_LOADER_ARGS)
    params = loader["parameters"]
    assert set(params) == set(SECTIONS)
    for section, cls in SECTIONS.items():
        config = parse_config(cls, params[section], section)
        values = {key: getattr(config, key) for key in params[section]}
        values = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in values.items()}
        assert values == params[section]  # every value, as written (a nested block too)


@pytest.mark.parametrize(
    ("env", "runtime", "expected"),
    [
        ("local", {}, "embedded:tiny-qwen2.5"),
        ("qwen2.5-0.5b", {}, "Qwen/Qwen2.5-0.5B-Instruct"),
        ("qwen2.5-0.5b", {"model": {"model_name_or_path": "/models/q"}}, "/models/q"),
    ],
)
def test_the_base_model_is_a_catalog_dataset_set_in_globals_or_for_one_run(env, runtime, expected):
    from kedro.io import DataCatalog

    loader = OmegaConfigLoader(str(CONF), env=env, runtime_params=runtime, **CONFIG_LOADER_ARGS)
    entry = loader["catalog"]["base_model"]
    assert entry["model_name_or_path"] == expected
    assert (entry["trust_remote_code"], entry["use_fast_tokenizer"]) == (False, True)  # base's, kept by the env
    base = DataCatalog.from_config({"base_model": entry}).load("base_model")
    assert base.settings == ModelConfig(expected, trust_remote_code=False, use_fast_tokenizer=True)


def test_all_problems_are_collected_and_named():
    with pytest.raises(ConfigError) as info:
        parse_config(TrainConfig, {"lerning_rate": 1e-4, "lora_rank": "8", "finetuning_type": "qlora"}, "train")
    assert info.value.problems == [
        "train.lerning_rate: unknown parameter (did you mean 'learning_rate'?)",
        "train.finetuning_type: expected one of 'lora', 'full', 'freeze', got 'qlora'",
        "train.lora_rank: expected int, got '8'",
    ]


def test_value_checks_run_after_types():
    with pytest.raises(ConfigError) as info:
        parse_config(FormatConfig, {"cutoff_len": 0, "train_on_prompt": True, "mask_history": True}, "format")
    assert info.value.problems == [
        "format.cutoff_len: must be positive, got 0",
        "format.mask_history: cannot be combined with train_on_prompt",
    ]


def test_bool_is_not_an_int_and_int_is_a_float():
    assert parse_config(TrainConfig, {"learning_rate": 1}, "train").learning_rate == 1
    with pytest.raises(ConfigError, match="train.max_steps: expected int, got True"):
        parse_config(TrainConfig, {"max_steps": True}, "train")


def test_configs_are_frozen():
    config = parse_config(ModelConfig, {}, "model")
    with pytest.raises(AttributeError):
        config.model_name_or_path = "x"


def test_real_model_env_overrides_only_its_keys():
    loader = OmegaConfigLoader(str(CONF), **{**CONFIG_LOADER_ARGS, "default_run_env": "qwen2.5-0.5b"})
    params = loader["parameters"]
    assert "model" not in params  # the base model is a dataset: globals.yml (test above)
    assert params["train"]["learning_rate"] == 1e-4
    assert params["train"]["lora_rank"] == 8  # kept from base
    parse_config(TrainConfig, params["train"], "train")


def test_model_name_or_path_forms(embedded_dir):
    from qwen_pipeline.models import EMBEDDED_MODEL, load_tokenizer, resolve_model_path

    assert resolve_model_path(EMBEDDED_MODEL) == str(embedded_dir)
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"  # hub ids pass through
    assert load_tokenizer(str(embedded_dir))("Hello")["input_ids"] == [9707]  # a local directory


@pytest.mark.parametrize(
    ("name", "stage", "offload"),
    [
        ("zero0", 0, False),
        ("zero2", 2, False),
        ("zero2_offload", 2, True),
        ("zero3", 3, False),
        ("zero3_offload", 3, True),
    ],
)
def test_shipped_deepspeed_configs(name, stage, offload):
    import json

    from qwen_pipeline.training.checks import environment_problems

    path = CONF / "base" / "deepspeed" / f"{name}.json"
    config = json.loads(path.read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in config["zero_optimization"]) == offload
    # batch sizes, accumulation, clipping and precision come from the train parameters
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert config[key] == "auto"
    train = parse_config(TrainConfig, {"deepspeed": str(path)}, "train")
    assert environment_problems(train, cuda=False) == []
