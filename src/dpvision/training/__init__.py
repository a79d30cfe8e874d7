"""Training engines (stock Opacus and dpvision's fast engine) and evaluation."""

from dpvision.training.engine import (
    DPSettings,
    Engine,
    EpochResult,
    OptimizerSpec,
    build_engine,
    evaluate,
)

__all__ = ["DPSettings", "Engine", "EpochResult", "OptimizerSpec", "build_engine", "evaluate"]
