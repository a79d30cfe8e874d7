"""dpvision: differentially private training of image classifiers (DP-SGD) in PyTorch."""

__version__ = "0.1.0"
