"""``python -m localsgd_ft.lighthouse``: the lighthouse role (run by the component).

The code lives in :mod:`localsgd_ft.launch.lighthouse_role`.
"""

import sys

from localsgd_ft.launch.lighthouse_role import main

if __name__ == "__main__":
    sys.exit(main())
