"""Differentially private MNIST training with Opacus: ``python mnist.py [flags]``.

A thin wrapper: flags and defaults are the seed's table (see README.md); the
work is done by ``dpvision.mnist``. Portions follow Opacus's examples/mnist.py
(Apache License 2.0, Meta Platforms, Inc.).
"""

import sys

from dpvision.cli import mnist_main

if __name__ == "__main__":
    sys.exit(mnist_main(sys.argv[1:]))
