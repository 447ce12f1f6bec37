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


@cli.group(name="llamafactory")
def llamafactory() -> None:
    """LLaMA-Factory recipes in and out (llamafactory_recipes.py)."""


@llamafactory.command(name="import", context_settings={"ignore_unknown_options": True})
@click.option("--env", required=True, help="the configuration environment to write: conf/<env>/")
@click.option("--force", is_flag=True, help="replace conf/<env>/ when it exists")
@click.argument("recipe", nargs=-1, type=click.UNPROCESSED, required=True)
def import_recipe(env: str, force: bool, recipe: tuple[str, ...]) -> None:
    """A LLaMA-Factory recipe as the configuration environment conf/<env>/.

    RECIPE: LLaMA-Factory config files (YAML or JSON, as `llamafactory-cli train FILE` / `export FILE` take
    them; several are read in order, then key=value overrides), or, after `--`, the argument list of
    `llamafactory-cli train` / `src/train.py` (optionally from `torchrun ... src/train.py`)."""
    from . import llamafactory_recipes as lf

    project = find_kedro_project(Path.cwd()) or Path.cwd()
    try:
        combined, launcher, source = lf.read_recipes(list(recipe))
        first = Path(source.split(" + ")[0])
        recipe_dir = first.resolve().parent if first.is_file() else Path.cwd()
        imported = lf.import_recipe(
            combined, source, recipe_dir=recipe_dir, project=project, launcher=launcher, env=env,
            base_parameters=_parameters(project, "base"),  # what `kedro run --env <env>` adds the env to
        )  # fmt: skip
        written = lf.write_environment(imported, project / "conf", env, source, overwrite=force)
    except lf.RecipeError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"Wrote {', '.join(str(p.relative_to(project)) for p in written)}")
    for key, why in imported.ignored.items():
        click.echo(f"  not used here: {key}: {why}")
    if imported.at_default:
        click.echo(f"  at the value that runs here anyway: {', '.join(imported.at_default)}")
    for item in imported.filled:
        click.echo(f"  left out, so LLaMA-Factory's default: {item}")
    click.echo(f"Run it: kedro run --pipelines sft --env {env}, then kedro run --pipelines merge --env {env}")


@llamafactory.command(name="export")
@click.option("--env", default=None, help="the configuration environment to export (default: base)")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="folder for train.yaml and merge.yaml")
def export_recipe(env: str | None, out: Path) -> None:
    """An environment as LLaMA-Factory 0.9.5's train.yaml (and merge.yaml for LoRA).

    For side-by-side runs: `llamafactory-cli train OUT/train.yaml` from this project's folder (its dataset_dir is
    data/01_raw)."""
    import yaml

    from . import llamafactory_recipes as lf
    from .embedded import EMBEDDED_MODEL, ensure_embedded_model

    project = find_kedro_project(Path.cwd()) or Path.cwd()
    parameters = _parameters(project, env)
    model = dict(parameters.pop("model", None) or {})
    path = model.get("model_name_or_path", EMBEDDED_MODEL)
    model_path = str(ensure_embedded_model()) if path == EMBEDDED_MODEL else path
    train, merge, lost = lf.export_recipe(parameters, model, model_path=model_path, out_name=env or "base")
    out.mkdir(parents=True, exist_ok=True)
    version = lf.LLAMAFACTORY_VERSION
    header = f"# conf/{env or 'base'} of qwen_pipeline for LLaMA-Factory {version} (kedro llamafactory export)\n"
    train_block = parameters.get("train") or {}
    nproc, nnodes = train_block.get("nproc_per_node", 1), train_block.get("nnodes", 1)
    if nproc > 1 or nnodes > 1:
        header += (
            f"# Launch: FORCE_TORCHRUN=1 NPROC_PER_NODE={nproc} NNODES={nnodes} llamafactory-cli train train.yaml\n"
        )
    if lost:
        header += "# Settings of ours with no LLaMA-Factory key (not carried over):\n"
        header += "".join(f"#   {item}\n" for item in lost)
    (out / "train.yaml").write_text(header + yaml.safe_dump(train, sort_keys=False, allow_unicode=True))
    written = [out / "train.yaml"]
    if merge:
        (out / "merge.yaml").write_text(header + yaml.safe_dump(merge, sort_keys=False, allow_unicode=True))
        written.append(out / "merge.yaml")
    click.echo(f"Wrote {', '.join(map(str, written))}")
    for item in lost:
        click.echo(f"  no LLaMA-Factory key, not carried over: {item}")


def _parameters(project: Path, env: str | None) -> dict:
    """An environment's parameters as a run reads them, with its globals' ``model`` block as ``model``."""
    from kedro.framework.project import settings

    loader = settings.CONFIG_LOADER_CLASS(conf_source=str(project / "conf"), env=env, **settings.CONFIG_LOADER_ARGS)
    return {**loader["parameters"], "model": dict(loader["globals"].get("model") or {})}
