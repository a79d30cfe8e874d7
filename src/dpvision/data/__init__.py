"""Datasets as uint8 tensors, normalised on the fly; ``load_dataset`` reads any supported dataset."""

from dpvision.data.files import DataError, DataNotFoundError
from dpvision.data.registry import (
    DATASET_REGISTRY, DATASETS, DEFAULT_IMAGE_SIZE, MAX_IMAGE_SIZE, Dataset, DatasetSplits, data_fingerprint,
    dataset_root_hint, load_dataset, register_dataset,
)  # fmt: skip
from dpvision.data.tensors import ImageTensors, NormalizedTensorDataset, channel_stats

__all__ = [
    "DATASETS", "DATASET_REGISTRY", "DEFAULT_IMAGE_SIZE", "MAX_IMAGE_SIZE", "DataError", "DataNotFoundError",
    "Dataset", "DatasetSplits", "ImageTensors", "NormalizedTensorDataset", "channel_stats", "data_fingerprint",
    "dataset_root_hint", "load_dataset", "register_dataset",
]
