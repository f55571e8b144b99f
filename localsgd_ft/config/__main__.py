"""``python -m localsgd_ft.config``: check a config and print it resolved, or print the reference."""

import sys

from localsgd_ft.config.schema import main

sys.exit(main(sys.argv[1:]))
