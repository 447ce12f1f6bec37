"""Kedro datasets for what kedro-datasets lacks."""

from .base_model import BaseModel, BaseModelDataset
from .dataset_info import DatasetInfoDataset, RawDatasets
from .model_dataset import ModelBundle, ModelDataset, ModelFiles
from .model_metrics import ModelMetricsDataset
from .stage import StageDataset, StageOutput

__all__ = [
    "BaseModel",
    "BaseModelDataset",
    "DatasetInfoDataset",
    "ModelBundle",
    "ModelDataset",
    "ModelFiles",
    "ModelMetricsDataset",
    "RawDatasets",
    "StageDataset",
    "StageOutput",
]
