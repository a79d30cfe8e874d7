"""``python -m dpvision ...`` is the ``dpvision`` command (torchrun and other launchers need a module)."""

import sys

from dpvision.cli import main

if __name__ == "__main__":
    sys.exit(main())
