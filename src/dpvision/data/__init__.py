"""Datasets as uint8 tensors, normalised on the fly."""

from dpvision.data.tensors import ImageTensors, NormalizedTensorDataset

__all__ = ["ImageTensors", "NormalizedTensorDataset"]
