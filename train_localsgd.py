"""What torchrun runs in every replica group: a thin entry point into localsgd_ft.trainer."""

import sys

from localsgd_ft.trainer import main

if __name__ == "__main__":
    sys.exit(main())
