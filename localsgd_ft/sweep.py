"""``python -m localsgd_ft.sweep``: a grid of experiments; the code lives in :mod:`localsgd_ft.results.sweep`."""

import sys

from localsgd_ft.results.sweep import main

if __name__ == "__main__":
    sys.exit(main())
