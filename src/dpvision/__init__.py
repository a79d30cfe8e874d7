"""dpvision: differentially private training of image classifiers (DP-SGD) in PyTorch."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: ``import dpvision`` stays light; ``dpvision.fit`` pulls in torch, Opacus and the job.
    if name == "fit":
        from dpvision.api import fit

        return fit
    raise AttributeError(f"module 'dpvision' has no attribute {name!r}")
