#!/usr/bin/env python
"""Train the small CelebA CNN on a preprocessed folder, without (baseline) or with DP-SGD.

Example:
    python scripts/celeba_train.py --data data/celeba/preprocessed/eyeglasses_64 --mode baseline
    python scripts/celeba_train.py --data data/celeba/preprocessed/eyeglasses_64 --mode dp --target-epsilon 8

Bad input exits with status 2 and one line naming the flag, before anything is written.
See ``python scripts/celeba_train.py --help`` and :mod:`dpvision.jobs.celeba_seed`.
"""

import sys

from dpvision.jobs.celeba_seed import main as train_main

if __name__ == "__main__":
    sys.exit(train_main())
