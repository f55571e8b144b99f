"""``python -m localsgd_ft.replica``: a replica-group role (run by the component).

The code lives in :mod:`localsgd_ft.launch.replica_role`.
"""

import sys

from localsgd_ft.launch.replica_role import main

if __name__ == "__main__":
    sys.exit(main())
