"""Checks a `kedro run` before any node runs: its environment, pipeline names and parameters.

Everything wrong is found at once, in a second, before MLflow starts a run or a data file is read:
an unknown ``--env`` or pipeline name (with the valid ones), every problem of every ``params:*``
block the run reads, and the rules that span stages (``config.run_problems``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import ConfigError, run_problems
from .errors import QwenPipelineError
from .pipeline_registry import STAGES

logger = logging.getLogger(__name__)


class RunError(QwenPipelineError):
    """A `kedro run` that cannot start: names what is wrong and what is valid."""


def environments(conf_root: Path) -> list[str]:
    """The configuration environments: the folders of ``conf/`` other than base."""
    return sorted(p.name for p in conf_root.iterdir() if p.is_dir() and p.name != "base")


def pipeline_names_of_project() -> list[str]:
    """The registered pipeline names, without importing any pipeline: the packages under
    ``<package>/pipelines`` that have a ``pipeline.py`` (Kedro's own discovery), and ``__default__``."""
    from importlib.resources import files

    from kedro.framework.project import PACKAGE_NAME

    folder = files(f"{PACKAGE_NAME}.pipelines")
    found = [p.name for p in folder.iterdir() if p.is_dir() and (p / "pipeline.py").is_file()]
    return sorted([*found, "__default__"])


def check_run(
    *, project: Path, env: str | None, conf_source: str | None, params: dict[str, Any], pipeline_names: list[str]
) -> list[str]:
    """Raise ``RunError`` / ``ConfigError`` naming every problem of this run; return its warnings."""
    from kedro.framework.project import pipelines, settings
    from kedro.pipeline import Pipeline

    conf_root = Path(conf_source) if conf_source else project / settings.CONF_SOURCE
    if env and conf_root.is_dir() and env not in (known := environments(conf_root)):
        raise RunError(f"--env {env}: no folder {conf_root.name}/{env}; environments: {', '.join(known)}")
    names = pipeline_names or ["__default__"]
    if unknown := [name for name in names if name not in (known := pipeline_names_of_project())]:
        raise RunError(f"no pipeline named {', '.join(map(repr, unknown))}; pipelines: {', '.join(known)}")
    pipelines.set_requested(names)  # only those, as `kedro run` loads them (evaluate's imports cost a second)
    selected = sum((pipelines[name] for name in names), start=Pipeline([]))
    # A node's stage is the pipeline package its function lives in (qwen_pipeline.pipelines.<stage>.nodes).
    stages = {node.func.__module__.split(".")[2] for node in selected.nodes} & set(STAGES)
    blocks = {name.split(":", 1)[1] for name in selected.inputs() if name.startswith("params:")}
    if conf_root.is_dir():
        loader = settings.CONFIG_LOADER_CLASS(
            conf_source=str(conf_root), env=env, runtime_params=params, **settings.CONFIG_LOADER_ARGS
        )
        parameters = loader["parameters"]
    else:  # a packaged conf_source (tar/zip): the nodes check their own blocks
        return []
    problems, warnings = run_problems(parameters, blocks, stages)
    if moved := sorted(set(parameters.get("model") or {}) - set(params.get("model") or {})):
        problems.append(
            f"parameters: model.{moved[0]} is set in a parameters file, but the base model is now the "
            "base_model dataset: set it in conf/<env>/globals.yml (model: model_name_or_path: ...) or with "
            "--params model.model_name_or_path=..."
        )
    if problems:
        raise ConfigError(problems)
    return warnings
