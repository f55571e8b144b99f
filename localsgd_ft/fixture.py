"""``python -m localsgd_ft.fixture``: a small synthetic data set in CIFAR-10's file format.

The code lives in :mod:`localsgd_ft.storage.fixture`.
"""

import sys

from localsgd_ft.storage.fixture import main

if __name__ == "__main__":
    sys.exit(main())
