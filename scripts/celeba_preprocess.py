#!/usr/bin/env python
"""Centre-crop and resize a CelebA subset into <split>.pt tensors plus train statistics.

Example:
    python scripts/celeba_preprocess.py --subset-dir data/celeba/subsets/eyeglasses_balanced_20k_strat \
      --output-dir data/celeba/preprocessed/eyeglasses_64 --size 64 --crop 178
"""

import sys
from pathlib import Path

try:
    from dpvision.celeba.cli import preprocess_main
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from dpvision.celeba.cli import preprocess_main

if __name__ == "__main__":
    sys.exit(preprocess_main())
