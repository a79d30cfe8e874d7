"""Models (a registry comes with the one-training-job issue)."""

from dpvision.models.convnets import CelebaCNN, SampleConvNet

__all__ = ["CelebaCNN", "SampleConvNet"]
