"""``python -m localsgd_ft.compare``: runs side by side; the code lives in :mod:`localsgd_ft.results.compare`."""

import sys

from localsgd_ft.results.compare import main

if __name__ == "__main__":
    sys.exit(main())
