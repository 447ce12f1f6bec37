"""`kedro run`, checked first: a bad environment, pipeline name or parameter stops it in one message,
before any node runs (``preflight.check_run``); an error the user can fix that a node raises (bad data, a run
that cannot fit) ends it in one message too, not a traceback (``QWEN_PIPELINE_TRACEBACK=1`` keeps the
traceback). Everything else is Kedro's own run command."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click
from kedro.framework.cli.project import run as kedro_run
from kedro.framework.startup import bootstrap_project
from kedro.utils import find_kedro_project

from .errors import QwenPipelineError, user_error
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
    try:
        return kedro_run.callback(**kwargs)
    except Exception as exc:
        found = user_error(exc)  # a node's QwenPipelineError, maybe wrapped by Kedro's dataset or runner errors
        if found is None or os.environ.get("QWEN_PIPELINE_TRACEBACK"):
            raise
        raise click.ClickException(f"{found}\n(set QWEN_PIPELINE_TRACEBACK=1 to see the full traceback)") from None


run = click.Command(
    name="run", params=kedro_run.params, callback=_checked_run, help=kedro_run.help, short_help=kedro_run.short_help
)
cli.add_command(run)
