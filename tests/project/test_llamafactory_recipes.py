"""`kedro llamafactory import` / `export`: LLaMA-Factory 0.9.5's own example recipes (tests/fixtures/llamafactory,
moved to a Qwen2.5 model and the qwen template) and the Qwen2.5 guide's torchrun command line become environments
whose parameters carry each key's value; what cannot be honoured is refused with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import copy_project

FIXTURES = Path(__file__).parents[1] / "fixtures" / "llamafactory"
EXAMPLES = FIXTURES / "examples"
LLAMAFACTORY_PYTHON = Path(os.environ.get("QWEN_PIPELINE_LLAMAFACTORY_PYTHON", "/tmp/lfvenv/bin/python"))
QWEN = "Qwen/Qwen2.5-7B-Instruct"

# The Qwen2.5 fine-tuning guide's LLaMA-Factory command line (qwen.readthedocs.io, "LLaMA-Factory"), with
# $DISTRIBUTED_ARGS for one node of 8 GPUs and the placeholders filled in.
GUIDE = (
    "torchrun --nproc_per_node 8 --nnodes 1 --node_rank 0 --master_addr localhost --master_port 6601 src/train.py "
    "--deepspeed ds_z3_config.json --stage sft --do_train --use_fast_tokenizer --flash_attn fa2 "
    f"--model_name_or_path {QWEN} --dataset your_dataset --template qwen --finetuning_type lora "
    "--lora_target q_proj,v_proj --output_dir saves/qwen2.5-7b/lora --overwrite_cache --overwrite_output_dir "
    "--warmup_steps 100 --weight_decay 0.1 --per_device_train_batch_size 4 --gradient_accumulation_steps 4 "
    "--ddp_timeout 9000 --learning_rate 5e-6 --lr_scheduler_type cosine --logging_steps 1 --cutoff_len 4096 "
    "--save_steps 1000 --plot_loss --num_train_epochs 3 --bf16"
).split()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A copy of the project as the working directory, bootstrapped as `kedro` does."""
    from kedro.framework.startup import bootstrap_project

    root = copy_project(tmp_path / "project", demo_data=True)
    monkeypatch.chdir(root)
    bootstrap_project(root)
    return root


def kedro_llamafactory(*args: str):
    from qwen_pipeline.cli import llamafactory

    return CliRunner().invoke(llamafactory, list(args), catch_exceptions=False)


def moved_to_qwen25(example: str, folder: Path, *, uncomment_eval: bool = False) -> Path:
    """An example recipe with its model swapped for Qwen2.5 and its template for qwen (line by line, comments
    kept); with ``uncomment_eval``, its commented ``### eval`` settings switched on (eval_dataset left out: it
    names a training dataset, which a run here refuses)."""
    lines = []
    for line in (EXAMPLES / example).read_text().splitlines():
        if line.startswith("model_name_or_path:"):
            line = f"model_name_or_path: {QWEN}"
        elif line.startswith("template:"):
            line = "template: qwen"
        elif uncomment_eval and line.startswith("# ") and ":" in line and "eval_dataset" not in line:
            line = line[2:]
        lines.append(line)
    target = folder / example
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n")
    return target


def environment(root: Path, env: str) -> dict:
    """conf/<env>'s blocks, with its globals' model block as "model"."""
    blocks = yaml.safe_load((root / "conf" / env / "parameters.yml").read_text()) or {}
    if (root / "conf" / env / "globals.yml").is_file():
        blocks["model"] = yaml.safe_load((root / "conf" / env / "globals.yml").read_text())["model"]
    return blocks


def flat(blocks: dict) -> dict:
    return {f"{block}.{key}": value for block, values in blocks.items() for key, value in values.items()}


def test_the_guides_torchrun_command_line_becomes_an_environment(project):
    result = kedro_llamafactory("import", "--env", "guide", "--", *GUIDE)
    assert result.exit_code == 0, result.output
    got = flat(environment(project, "guide"))
    expected = {
        "model.model_name_or_path": QWEN,
        "model.use_fast_tokenizer": True,
        "ingest.dataset": ["your_dataset"],
        "processing.overwrite_cache": True,
        "format.template": "qwen",
        "format.cutoff_len": 4096,
        "train.deepspeed": "conf/base/deepspeed/zero3.json",  # LLaMA-Factory's ds_z3_config.json is our zero3.json
        "train.flash_attn": "fa2",
        "train.finetuning_type": "lora",
        "train.lora_target": ["q_proj", "v_proj"],
        "train.overwrite_output_dir": True,
        "train.warmup_steps": 100,
        "train.weight_decay": 0.1,
        "train.per_device_train_batch_size": 4,
        "train.gradient_accumulation_steps": 4,
        "train.ddp_timeout": 9000,
        "train.learning_rate": 5e-6,
        "train.lr_scheduler_type": "cosine",
        "train.logging_steps": 1,
        "train.save_steps": 1000,
        "train.num_train_epochs": 3.0,
        "train.bf16": True,
        "train.nproc_per_node": 8,
        "train.nnodes": 1,
        # left out of the command line: LLaMA-Factory's defaults, where conf/base says otherwise
        "format.val_size": 0.0,
        "train.lora_alpha": None,
        "train.warmup_ratio": 0.0,
        "train.gradient_checkpointing": True,
        "train.save_total_limit": None,
    }
    assert got == expected
    text = (project / "conf/guide/parameters.yml").read_text()
    for key in ("do_train", "output_dir", "plot_loss", "launcher --master_port"):
        assert f"#   {key}: " in text and f"not used here: {key}: " in result.output
    assert "#   train.gradient_checkpointing: True (disable_gradient_checkpointing)" in text


EXPECTED_EXAMPLES = {
    "train_lora/qwen3_lora_sft.yaml": {
        "train.finetuning_type": "lora", "train.lora_rank": 8, "train.lora_target": "all",
        "train.learning_rate": 1e-4, "train.num_train_epochs": 3.0, "train.lr_scheduler_type": "cosine",
        "train.warmup_ratio": 0.1, "train.bf16": True, "train.ddp_timeout": 180000000,
        "train.per_device_train_batch_size": 1, "train.gradient_accumulation_steps": 8, "train.logging_steps": 10,
        "train.save_steps": 500, "train.overwrite_output_dir": True, "ingest.dataset": ["identity", "alpaca_en_demo"],
        "ingest.max_samples": 1000, "format.cutoff_len": 2048, "processing.num_proc": 16,
        "format.val_size": 0.1, "train.per_device_eval_batch_size": 1, "train.eval_strategy": "steps",
        "train.eval_steps": 500,
    },
    "train_lora/qwen3_lora_sft_ds3.yaml": {
        "train.deepspeed": "conf/base/deepspeed/zero3.json", "train.lora_rank": 8, "train.learning_rate": 1e-4,
        "train.per_device_train_batch_size": 1, "train.gradient_accumulation_steps": 2, "train.bf16": True,
    },
    "train_full/qwen3_full_sft.yaml": {
        "train.finetuning_type": "full", "train.deepspeed": "conf/base/deepspeed/zero3.json",
        "train.learning_rate": 1e-5, "train.gradient_accumulation_steps": 2, "train.bf16": True,
    },
    "train_qlora/qwen3_lora_sft_otfq.yaml": {
        "train.quantization_bit": 4, "train.finetuning_type": "lora", "train.lora_rank": 8,
        "train.learning_rate": 1e-4, "train.bf16": True,
    },
    "merge_lora/qwen3_lora_sft.yaml": {
        "merge.export_size": 5, "merge.export_device": "cpu", "merge.export_legacy_format": False,
        "format.template": "qwen",
    },
}  # fmt: skip


@pytest.mark.parametrize("example", sorted(EXPECTED_EXAMPLES))
def test_llamafactorys_own_examples_import_with_every_value(project, tmp_path, example):
    recipe = moved_to_qwen25(example, tmp_path / "recipes", uncomment_eval=True)
    result = kedro_llamafactory("import", str(recipe), "--env", "imported")
    assert result.exit_code == 0, result.output
    got = flat(environment(project, "imported"))
    assert got["model.model_name_or_path"] == QWEN and got["model.trust_remote_code"] is True
    expected = EXPECTED_EXAMPLES[example]
    assert {key: got.get(key) for key in expected} == expected
    given = yaml.safe_load(recipe.read_text())
    assert got["format.template"] == "qwen"
    for key in ("output_dir", "report_to", "plot_loss", "adapter_name_or_path", "export_dir"):
        assert (key in given) == (f"#   {key}: " in (project / "conf/imported/parameters.yml").read_text())


def test_a_deepspeed_config_of_its_own_is_copied_into_the_environment(project, tmp_path):
    settings = json.loads((EXAMPLES / "deepspeed/ds_z3_config.json").read_text())
    settings["zero_optimization"]["stage3_max_live_parameters"] = 5e8  # not one of ours any more
    (tmp_path / "my_z3.json").write_text(json.dumps(settings))
    result = kedro_llamafactory(
        "import", "--env", "own", "--", *GUIDE[14:], "--deepspeed", str(tmp_path / "my_z3.json")
    )
    assert result.exit_code == 0, result.output
    assert environment(project, "own")["train"]["deepspeed"] == "conf/own/deepspeed/my_z3.json"
    assert json.loads((project / "conf/own/deepspeed/my_z3.json").read_text()) == settings


@pytest.mark.parametrize(
    ("recipe", "says"),
    [
        ("train_lora/qwen3_lora_sft.yaml",  # as LLaMA-Factory ships it: a Qwen3 template
         "template: 'qwen3_nothink' cannot be honoured: only the qwen template is built here"),
        ("other/qwen3_lora_dpo.yaml", "stage: 'dpo' cannot be honoured: only supervised fine-tuning"),
        ("train_qlora/llama3_lora_sft_gptq.yaml", None),
    ],
)  # fmt: skip
def test_a_recipe_that_cannot_run_here_is_refused_and_nothing_is_written(project, recipe, says):
    result = kedro_llamafactory("import", str(EXAMPLES / recipe), "--env", "refused")
    assert result.exit_code == 1
    assert "cannot import, nothing written" in result.output
    if says:
        assert says in result.output
    assert not (project / "conf" / "refused").exists()


def test_a_misspelt_key_is_refused_with_did_you_mean(project, tmp_path):
    recipe = moved_to_qwen25("train_lora/qwen3_lora_sft.yaml", tmp_path)
    recipe.write_text(recipe.read_text().replace("learning_rate:", "learning_rte:"))
    result = kedro_llamafactory("import", str(recipe), "--env", "typo")
    assert result.exit_code == 1
    assert "learning_rte: not an argument of LLaMA-Factory 0.9.5 (did you mean 'learning_rate'?)" in result.output
    assert not (project / "conf" / "typo").exists()


def test_an_existing_environment_is_replaced_only_when_asked(project):
    assert kedro_llamafactory("import", "--env", "guide", "--", *GUIDE).exit_code == 0
    (project / "conf/guide/parameters.yml").write_text("# mine\n")
    again = kedro_llamafactory("import", "--env", "guide", "--", *GUIDE)
    assert again.exit_code == 1 and "conf/guide exists: choose another --env, or --force to replace it" in again.output
    assert (project / "conf/guide/parameters.yml").read_text() == "# mine\n"
    assert kedro_llamafactory("import", "--env", "guide", "--force", "--", *GUIDE).exit_code == 0
    assert environment(project, "guide")["train"]["learning_rate"] == 5e-6


def test_export_then_import_gives_the_same_parameters(project, tmp_path):
    assert kedro_llamafactory("import", "--env", "guide", "--", *GUIDE).exit_code == 0
    exported = kedro_llamafactory("export", "--env", "guide", "--out", str(tmp_path / "lf"))
    assert exported.exit_code == 0, exported.output
    train = yaml.safe_load((tmp_path / "lf/train.yaml").read_text())
    assert train["lora_target"] == "q_proj,v_proj" and train["learning_rate"] == 5e-6
    assert train["disable_gradient_checkpointing"] is False and train["deepspeed"] == "conf/base/deepspeed/zero3.json"
    again = kedro_llamafactory(
        "import", str(tmp_path / "lf/train.yaml"), str(tmp_path / "lf/merge.yaml"), "--env", "back"
    )
    assert again.exit_code == 0, again.output
    first, second = flat(environment(project, "guide")), flat(environment(project, "back"))
    launcher = {"train.nproc_per_node", "train.nnodes"}  # torchrun's, not in a LLaMA-Factory recipe
    assert {k: v for k, v in second.items() if k in first} == {k: v for k, v in first.items() if k not in launcher}


def llamafactory_parses(path: Path, kind: str) -> dict:
    """LLaMA-Factory 0.9.5's own parsing of ``path`` (tests/workers/llamafactory_parse.py in its venv)."""
    worker = Path(__file__).parents[1] / "workers" / "llamafactory_parse.py"
    done = subprocess.run([str(LLAMAFACTORY_PYTHON), str(worker), str(path), kind], capture_output=True, text=True)
    answer = json.loads(done.stdout or "{}")
    assert answer.get("ok"), (answer, done.stderr[-2000:])
    return answer["parsed"]


@pytest.mark.slow  # ~15 s each: LLaMA-Factory imports torch and transformers
@pytest.mark.skipif(
    not LLAMAFACTORY_PYTHON.is_file(),
    reason=f"no LLaMA-Factory 0.9.5 venv at {LLAMAFACTORY_PYTHON} (set QWEN_PIPELINE_LLAMAFACTORY_PYTHON; "
    "`pip install llamafactory==0.9.5` into a venv of its own, as benchmarks/ do)",
)
@pytest.mark.parametrize("recipe", ["guide", "train_lora/qwen3_lora_sft.yaml", "train_qlora/qwen3_lora_sft_otfq.yaml"])
def test_llamafactory_accepts_what_export_wrote(project, tmp_path, recipe):
    if recipe == "guide":  # without its DeepSpeed config, which LLaMA-Factory parses only under torchrun
        args = [a for a in GUIDE if a not in ("--deepspeed", "ds_z3_config.json")]
        result = kedro_llamafactory("import", "--env", "mine", "--", *args)
    else:
        result = kedro_llamafactory("import", str(moved_to_qwen25(recipe, tmp_path)), "--env", "mine")
    assert result.exit_code == 0, result.output
    assert kedro_llamafactory("export", "--env", "mine", "--out", str(tmp_path / "lf")).exit_code == 0
    written = yaml.safe_load((tmp_path / "lf/train.yaml").read_text())
    parsed = llamafactory_parses(tmp_path / "lf/train.yaml", "train")
    assert set(parsed) == set(written)  # every key taken by one of its argument classes
    same = ("learning_rate", "cutoff_len", "lora_rank", "per_device_train_batch_size", "bf16", "template", "dataset")
    assert {k: parsed[k] for k in same} == {k: written[k] for k in same} | {"dataset": written["dataset"].split(",")}
    assert parsed["lora_target"] == written["lora_target"].split(",")  # LLaMA-Factory splits it as we do
    merged = llamafactory_parses(tmp_path / "lf/merge.yaml", "export")
    assert merged["export_dir"] == yaml.safe_load((tmp_path / "lf/merge.yaml").read_text())["export_dir"]


@pytest.mark.slow  # ~100 s: the imported recipe's 90 steps on the embedded model, then its merge
def test_an_imported_recipe_runs_with_the_model_swapped(tmp_path, model_cache):
    """LLaMA-Factory's LoRA SFT example and its merge example in one environment; the run swaps the model for the
    embedded one and the example's datasets (identity, alpaca_en_demo) for the demo's; nothing else."""
    import sys

    root = copy_project(tmp_path / "project")
    recipes = [moved_to_qwen25(f"{kind}/qwen3_lora_sft.yaml", tmp_path) for kind in ("train_lora", "merge_lora")]
    env = {**os.environ, "QWEN_PIPELINE_CACHE": str(model_cache), "KEDRO_DISABLE_TELEMETRY": "true"}

    def kedro(*args):
        done = subprocess.run([sys.executable, "-m", "kedro", *args], cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    kedro("llamafactory", "import", *map(str, recipes), "--env", "lf")
    swap = "model.model_name_or_path=embedded:tiny-qwen2.5"
    trained = kedro("run", "--pipelines", "sft", "--env", "lf", "--params", f"{swap},ingest.dataset=alpaca_demo")
    # the recipe's own settings ran: 240 examples, 3 epochs of 8-example steps (batch 1 x accumulation 8) = 90
    assert "training: 90 steps" in trained and "next: kedro run --pipelines merge --env lf" in trained
    summary = json.loads((root / "data/08_reporting/training_summary.json").read_text())
    assert summary["global_steps"] == 90 and summary["epochs"] == pytest.approx(3.0)
    merged = kedro("run", "--pipelines", "merge", "--env", "lf", "--params", swap)
    assert "Merge check passed" in merged
    assert (root / "data/06_models/merged/model.safetensors").is_file()


def test_the_readme_key_map_lists_every_key_import_knows():
    from qwen_pipeline import llamafactory_recipes as lf

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme[readme.index("| LLaMA-Factory key | here | note |") :]
    rows = {line.split("|")[1].strip().strip("`") for line in table.splitlines() if line.startswith("| `")}
    assert rows == set(lf.MAPPED) | set(lf.IGNORED) | set(lf.ONLY)


def test_key_value_overrides_after_the_file_win_as_on_llamafactory_cli(project, tmp_path):
    recipe = moved_to_qwen25("train_lora/qwen3_lora_sft.yaml", tmp_path)
    result = kedro_llamafactory("import", str(recipe), "learning_rate=2e-5", "lora_target=q_proj,v_proj", "--env", "o")
    assert result.exit_code == 0, result.output
    train = environment(project, "o")["train"]
    assert (train["learning_rate"], train["lora_target"]) == (2e-5, ["q_proj", "v_proj"])


def test_lora_alpha_dropout_and_dora_carry_over(project):
    extra = ["--lora_alpha", "32", "--lora_dropout", "0.05", "--use_dora", "--lora_rank", "16", "--max_samples", "500"]
    result = kedro_llamafactory("import", "--env", "dora", "--", *GUIDE, *extra)
    assert result.exit_code == 0, result.output
    got = flat(environment(project, "dora"))
    assert {k: got[k] for k in ("train.lora_alpha", "train.lora_dropout", "train.use_dora", "train.lora_rank")} == {
        "train.lora_alpha": 32, "train.lora_dropout": 0.05, "train.use_dora": True, "train.lora_rank": 16,
    }  # fmt: skip
    assert got["ingest.max_samples"] == 500


@pytest.mark.parametrize(
    ("args", "key", "expected"),
    [
        (["--eval_strategy", "no"], "train.eval_strategy", "no"),  # text stays text, as LLaMA-Factory reads it
        (["--bf16", "no"], "train.bf16", False),  # a flag: yes / no / true / false
        (["--max_steps", "-1"], "train.max_steps", -1),
        (["--interleave_probs", "1", "--mix_strategy", "interleave_under"], "ingest.interleave_probs", [1.0]),
        (["--save_strategy", "no", "--save_steps", "500"], "train.save_steps", 0),
        (["--warmup_steps", "0.1"], "train.warmup_ratio", 0.1),  # transformers 5 reads warmup_steps < 1 as a ratio
        (["--disable_shuffling"], "train.shuffle", False),
    ],
)
def test_command_line_values_are_typed_as_llamafactory_types_them(project, args, key, expected):
    base = [{"fa2": "sdpa"}.get(a, a) for a in GUIDE[14:] if a != "--bf16"]  # bf16 given by some cases
    result = kedro_llamafactory("import", "--env", "typed", "--", *base, *args)
    assert result.exit_code == 0, result.output
    assert flat(environment(project, "typed"))[key] == expected


def test_launchers_and_environment_assignments_before_the_command(project):
    command = ["FORCE_TORCHRUN=1", "NNODES=2", "deepspeed", "--num_gpus", "4", "src/train.py", *GUIDE[14:]]
    result = kedro_llamafactory("import", "--env", "ds", "--", *command)
    assert result.exit_code == 0, result.output
    train = environment(project, "ds")["train"]
    assert (train["nproc_per_node"], train["nnodes"]) == (4, 2)
    assert "not used here: FORCE_TORCHRUN: kedro starts torchrun itself" in result.output


def test_warmup_ratio_and_steps_together_are_refused(project):
    result = kedro_llamafactory("import", "--env", "w", "--", *GUIDE[14:], "--warmup_ratio", "0.1")
    assert result.exit_code == 1
    assert "warmup_ratio: 0.1 and warmup_steps: 100 are both set" in result.output


def test_deepspeed_null_turns_deepspeed_off(project, tmp_path):
    recipe = moved_to_qwen25("train_lora/qwen3_lora_sft_ds3.yaml", tmp_path)
    result = kedro_llamafactory("import", str(recipe), "deepspeed=null", "--env", "off")
    assert result.exit_code == 0, result.output
    assert environment(project, "off")["train"]["deepspeed"] is None


EVALUATING = {  # an environment that evaluates on a dataset of its own, keeps the best step and stops early
    "ingest": {"dataset": ["alpaca_demo"], "eval_dataset": ["sharegpt_demo"]},
    "train": {"eval_strategy": "steps", "eval_steps": 10, "load_best_model_at_end": True, "save_steps": 0,
              "early_stopping_patience": 3, "warmup_steps": 10},
}  # fmt: skip


def export_evaluating(project: Path, out: Path) -> dict:
    (project / "conf/evaluating").mkdir()
    (project / "conf/evaluating/parameters.yml").write_text(yaml.safe_dump(EVALUATING))
    result = kedro_llamafactory("export", "--env", "evaluating", "--out", str(out))
    assert result.exit_code == 0, result.output
    return yaml.safe_load((out / "train.yaml").read_text())


def test_export_writes_what_llamafactory_needs_for_the_same_run(project, tmp_path):
    train = export_evaluating(project, tmp_path / "lf")
    assert train["save_strategy"] == "best" and "save_steps" not in train  # only the best step is kept, as here
    assert train["metric_for_best_model"] == "eval_loss" and train["early_stopping_steps"] == 3
    assert train["eval_dataset"] == "sharegpt_demo" and "val_size" not in train  # conf/base's val_size is unused
    assert train["warmup_steps"] == 10 and "warmup_ratio" not in train  # there a ratio would win over the steps


@pytest.mark.slow
@pytest.mark.skipif(not LLAMAFACTORY_PYTHON.is_file(), reason=f"no LLaMA-Factory 0.9.5 venv at {LLAMAFACTORY_PYTHON}")
def test_llamafactory_accepts_an_exported_evaluating_recipe(project, tmp_path):
    export_evaluating(project, tmp_path / "lf")
    parsed = llamafactory_parses(tmp_path / "lf/train.yaml", "train")
    assert (parsed["save_strategy"], parsed["load_best_model_at_end"]) == ("best", True)
