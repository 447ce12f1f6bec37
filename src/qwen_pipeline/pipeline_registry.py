"""Project pipelines: the six stages, ``sft`` (ingest..train) and ``__default__`` (all stages)."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

STAGES = ("ingest", "validate", "format", "train", "merge", "evaluate")  # in run order, the one list of them


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    stages = [pipelines[name] for name in STAGES if name in pipelines]
    if len(stages) == len(STAGES):  # all loaded (not a selective `--pipeline X` run)
        pipelines["__default__"] = sum(stages, Pipeline([]))
    return pipelines
