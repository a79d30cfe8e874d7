"""Jobs: the one training loop and what runs through it.

* :mod:`~dpvision.jobs.config`: the typed, validated config (data, model, optim, dp, run) and YAML recipes;
* :mod:`~dpvision.jobs.setup`: data, privacy plan (σ, δ, q from the N actually trained on), model and engine;
* :mod:`~dpvision.jobs.loop`: one (budget-aware) epoch, ε under every accountant, checkpoints;
* :mod:`~dpvision.jobs.train`: the job itself (``dpvision train``);
* :mod:`~dpvision.jobs.mnist_seed`, :mod:`~dpvision.jobs.celeba_seed`: the seeds' command lines on top of it.
"""

from dpvision.jobs.config import DataConfig, DPConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, load_recipe
from dpvision.jobs.train import run

__all__ = ["DPConfig", "DataConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig", "load_recipe", "run"]
