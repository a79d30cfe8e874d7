"""Differentially private MNIST training with Opacus: ``python mnist.py [flags]``.

A thin front-end: the seed's flags and defaults (see README.md) mapped onto the one
training job, ``dpvision train --config recipes/mnist_seed.yaml``. Portions follow
Opacus's examples/mnist.py (Apache License 2.0, Meta Platforms, Inc.).
"""

import sys

from dpvision.jobs.mnist_seed import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
