"""``python -m localsgd_ft.lighthouse_server``: torchft's lighthouse, a child of the lighthouse role.

The code lives in :mod:`localsgd_ft.launch.torchft_lighthouse`.
"""

import sys

from localsgd_ft.launch.torchft_lighthouse import main

if __name__ == "__main__":
    sys.exit(main())
