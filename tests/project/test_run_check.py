"""The run check (``preflight.check_run``): a bad environment, pipeline name or parameter stops `kedro run`
before any node runs, in one message naming what is wrong and what is valid.

The CLI prints that message as ``Error: <message>`` and exits 1; tests/runs/test_cli_errors.py shows it end
to end for two of these cases. Each case here is the command line a user types, parsed as `kedro run` parses it.
"""

from __future__ import annotations

import shutil

import pytest
from helpers import PROJECT_ROOT
from kedro.framework import project as kedro_project
from omegaconf import OmegaConf

from qwen_pipeline.config import ConfigError
from qwen_pipeline.preflight import RunError, check_run


@pytest.fixture(scope="module")
def conf(tmp_path_factory):
    """The project's conf/ with an empty conf/local (a fresh checkout), and the project configured as `kedro run`
    configures it; the selected pipelines and package name put back afterwards."""
    conf = tmp_path_factory.mktemp("project") / "conf"
    shutil.copytree(PROJECT_ROOT / "conf", conf, ignore=shutil.ignore_patterns("__pycache__", "local"))
    (conf / "local").mkdir()
    package = kedro_project.PACKAGE_NAME
    kedro_project.configure_project("qwen_pipeline", preserve_logging=True)
    yield conf
    kedro_project.pipelines.set_requested(None)
    kedro_project.PACKAGE_NAME = package


def check(conf, *, pipelines: str = "", env: str | None = None, params: str = "") -> list[str]:
    """check_run for `kedro run --pipelines PIPELINES --env ENV --params PARAMS` (--params as Kedro splits it)."""
    runtime = OmegaConf.to_container(OmegaConf.from_dotlist(params.split(","))) if params else {}
    names = [name.strip() for name in pipelines.split(",") if name.strip()]
    return check_run(project=PROJECT_ROOT, env=env, conf_source=str(conf), params=runtime, pipeline_names=names)


def test_the_shipped_configuration_passes_without_warnings(conf):
    assert check(conf) == []
    assert check(conf, pipelines="sft", env="qwen2.5-0.5b") == []


def test_an_unknown_env_names_the_environments(conf):
    with pytest.raises(RunError) as error:
        check(conf, pipelines="sft", env="qwen2.5-05b")
    assert str(error.value) == "--env qwen2.5-05b: no folder conf/qwen2.5-05b; environments: local, qwen2.5-0.5b"


def test_an_unknown_pipeline_names_the_pipelines(conf):
    with pytest.raises(RunError) as error:
        check(conf, pipelines="sfft")
    assert str(error.value) == (
        "no pipeline named 'sfft'; pipelines: __default__, evaluate, format, ingest, merge, sft, train, validate"
    )


# Parameters: each case one ConfigError of one line, "invalid configuration: <problem>".
CONFIG_ERRORS = [
    (
        "misspelt parameter",
        "ingest,validate",
        "ingest.max_sample=3",
        "ingest.max_sample: unknown parameter (did you mean 'max_samples'?)",
    ),
    (
        "misspelt parameter of a later stage",
        "sft",
        "train.learnig_rate=1e-4",
        "train.learnig_rate: unknown parameter (did you mean 'learning_rate'?)",
    ),
    (
        "pack_length below cutoff_len",
        "sft",
        "train.packing=true,train.pack_length=256",
        "train.pack_length=256 is below format.cutoff_len=512: with packing every longer example would be cut to "
        "pack_length. Raise pack_length, or leave it unset (it then follows cutoff_len)",
    ),
    (
        "no validation split for evaluate",
        "",
        "format.val_size=0",
        "format.val_size is 0 and ingest.eval_dataset is empty: there is no validation split to evaluate on. "
        "Set format.val_size (e.g. 0.1) or ingest.eval_dataset",
    ),
]


@pytest.mark.parametrize(("name", "pipelines", "params", "problem"), CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_a_bad_parameter_is_one_configuration_error(conf, name, pipelines, params, problem):
    with pytest.raises(ConfigError) as error:
        check(conf, pipelines=pipelines, params=params)
    assert error.value.problems == [problem]
    assert str(error.value) == f"invalid configuration: {problem}"


def test_the_base_model_is_set_in_globals_and_a_misspelt_model_key_is_named(conf):
    assert check(conf, pipelines="sft", params="model.model_name_or_path=/models/q") == []  # one run's base model
    with pytest.raises(ConfigError) as error:
        check(conf, pipelines="merge", params="model.model_name=/models/q")
    assert str(error.value) == (
        "invalid configuration: model.model_name: unknown parameter (did you mean 'model_name_or_path'?)"
    )
    moved = conf.parent / "moved" / "conf"
    shutil.copytree(conf, moved)
    (moved / "local" / "parameters.yml").write_text("model:\n  model_name_or_path: Qwen/Qwen2.5-7B-Instruct\n")
    with pytest.raises(ConfigError) as error:
        check(moved, pipelines="sft")
    assert str(error.value) == (
        "invalid configuration: parameters: model.model_name_or_path is set in a parameters file, but the base "
        "model is now the base_model dataset: set it in conf/<env>/globals.yml (model: model_name_or_path: ...) "
        "or with --params model.model_name_or_path=..."
    )
