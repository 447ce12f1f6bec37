"""`kedro run`, checked first: a bad environment, pipeline name or parameter stops it in one message,
before any node runs (``preflight.check_run``). Everything else is Kedro's own run command."""

from __future__ import annotations

import logging
from pathlib import Path

import click
from kedro.framework.cli.project import run as kedro_run
from kedro.framework.startup import bootstrap_project
from kedro.utils import find_kedro_project

from .errors import QwenPipelineError
from .preflight import check_run

logger = logging.getLogger(__name__)


@click.group(name="qwen_pipeline")
def cli() -> None:
    """qwen_pipeline's project commands."""


def _checked_run(**kwargs):
    project = find_kedro_project(Path.cwd()) or Path.cwd()
    from kedro.framework.project import PACKAGE_NAME

    if PACKAGE_NAME is None:  # `kedro` has configured the project already; `python -m qwen_pipeline` may not
        bootstrap_project(project)
    names = kwargs.get("pipelines") or ([kwargs["pipeline"]] if kwargs.get("pipeline") else [])
    try:
        warnings = check_run(
            project=project,
            env=kwargs.get("env"),
            conf_source=kwargs.get("conf_source"),
            params=kwargs.get("params") or {},
            pipeline_names=list(names),
        )
    except QwenPipelineError as exc:
        raise click.ClickException(str(exc)) from None
    for warning in warnings:
        logger.warning("%s", warning)
    return kedro_run.callback(**kwargs)


run = click.Command(
    name="run", params=kedro_run.params, callback=_checked_run, help=kedro_run.help, short_help=kedro_run.short_help
)
cli.add_command(run)
