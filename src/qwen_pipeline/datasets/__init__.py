"""Kedro datasets for what kedro-datasets lacks."""

from .dataset_info import DatasetInfoDataset, RawDatasets, RawRecord
from .model_dataset import ModelBundle, ModelDataset, ModelFiles

__all__ = ["DatasetInfoDataset", "ModelBundle", "ModelDataset", "ModelFiles", "RawDatasets", "RawRecord"]
