"""``python -m localsgd_ft.report``: the run report from an output directory.

The code lives in :mod:`localsgd_ft.results.report`.
"""

import sys

from localsgd_ft.results.report import main

if __name__ == "__main__":
    sys.exit(main())
