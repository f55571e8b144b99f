"""What torchrun runs in every replica group: a thin entry point into localsgd_ft.training.trainer."""

import sys

from localsgd_ft.launch.lifecycle import follow_torchrun

follow_torchrun()  # before torch is imported: a worker never outlives its torchrun

from localsgd_ft.training.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
