"""``python -m localsgd_ft.cleanup``: list, or remove, the folders earlier runs' files were set aside in.

The code lives in :mod:`localsgd_ft.storage.set_aside`.
"""

import sys

from localsgd_ft.storage.set_aside import main

if __name__ == "__main__":
    sys.exit(main())
