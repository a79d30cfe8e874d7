#!/usr/bin/env python
"""Build a balanced, optionally stratified CelebA subset (see docs/data/subset_strategy.md).

Example:
    python scripts/celeba_build_subset.py --archive-dir data/celeba/archive \
      --attribute Eyeglasses --use-landmarks --stratify-by interocular --iod-bins 4 \
      --output-dir data/celeba/subsets/eyeglasses_balanced_20k_strat \
      --link-mode copy --max-per-class-train 8000 --max-per-class-val 1000 --max-per-class-test 1000
"""

import sys
from pathlib import Path

try:
    from dpvision.celeba.cli import build_subset_main
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from dpvision.celeba.cli import build_subset_main

if __name__ == "__main__":
    sys.exit(build_subset_main())
