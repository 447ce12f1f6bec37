"""MLflow records that kedro-mlflow's datasets do not make: a model directory logged as a registered model,
and a local store whose artifact locations stay relative to the project, so a moved project keeps working.

- ``store``: the hook that keeps a local SQLite store's artifact locations relative to the project;
- ``run_names``: the hook that names a run after its stages in run order;
- ``registry``: a model directory logged and registered, with its lineage as tags;
- ``workers``: what a torchrun worker needs to log into the driver's run.
"""

from .registry import SERVING_CODE, WEIGHT_SUFFIXES, lineage_tags, log_model_directory
from .run_names import RunNameHook
from .store import LOCATION_COLUMNS, PortableArtifactsHook, relative_artifact_locations, sqlite_database
from .workers import RUN_ID_ENV, tracking_environment

__all__ = [
    "LOCATION_COLUMNS",
    "RUN_ID_ENV",
    "SERVING_CODE",
    "WEIGHT_SUFFIXES",
    "PortableArtifactsHook",
    "RunNameHook",
    "lineage_tags",
    "log_model_directory",
    "relative_artifact_locations",
    "sqlite_database",
    "tracking_environment",
]
