"""Kedro datasets for what kedro-datasets lacks."""

from .dataset_info import DatasetInfoDataset, RawDatasets
from .model_dataset import ModelBundle, ModelDataset, ModelFiles
from .stage import StageDataset, StageOutput

__all__ = [
    "DatasetInfoDataset",
    "ModelBundle",
    "ModelDataset",
    "ModelFiles",
    "RawDatasets",
    "StageDataset",
    "StageOutput",
]
