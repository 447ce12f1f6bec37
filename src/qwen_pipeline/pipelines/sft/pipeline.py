"""``sft`` = ingest + validate + format + train. A package of its own because
``kedro run --pipeline sft`` imports only ``pipelines/sft/``."""

from kedro.pipeline import Pipeline

from ..format.pipeline import create_pipeline as format_pipeline
from ..ingest.pipeline import create_pipeline as ingest_pipeline
from ..train.pipeline import create_pipeline as train_pipeline
from ..validate.pipeline import create_pipeline as validate_pipeline


def create_pipeline(**kwargs) -> Pipeline:
    return ingest_pipeline() + validate_pipeline() + format_pipeline() + train_pipeline()
