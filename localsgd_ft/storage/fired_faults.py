"""Which planned failures have fired, kept beside the checkpoints so a whole-job restart does not fire them again.

A planned failure fires once per run (the completion service refuses a second report of its id). A job
that is restarted as a whole (Slurm requeues the job when a node of it fails; a user resubmits it)
resumes from the checkpoint directory, and with this file its new lighthouse role knows which failures
the earlier job already delivered: without it, a `host_down` replayed from step 0 would take down one
host after another. The file belongs with the checkpoints because it shares their fate: ``--fresh``
sets it aside with them, and the run starts over, failures included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List

from localsgd_ft.storage.atomic import write_json_atomic

FIRED_FILE = "faults_fired.json"
MAX_BYTES = 1 << 20  # the plan holds at most a few thousand failures: anything bigger is not ours


class FiredFaultsUnreadable(ValueError):
    """The record exists but cannot be trusted: the run refuses to start rather than fire a failure twice."""


def save(directory: Path, fault_ids: Iterable[int]) -> None:
    write_json_atomic(Path(directory) / FIRED_FILE, {"fired": sorted(set(fault_ids))})


def load(directory: Path, planned: Iterable[int]) -> List[int]:
    """The ids of ``planned`` failures an earlier job of this run fired (none when the file is missing);
    FiredFaultsUnreadable naming the file when it is unreadable, so nothing fires twice by mistake."""
    path = Path(directory) / FIRED_FILE
    if not path.is_file():
        return []
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        fired = json.loads(path.read_text())["fired"]
        if not isinstance(fired, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in fired):
            raise ValueError("'fired' is not a list of failure ids")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FiredFaultsUnreadable(f"{path} cannot be read ({e}): it says which planned failures already "
                                    "fired; remove it to fire them all again, or start over with --fresh") from None
    known = set(planned)
    return sorted(i for i in set(fired) if i in known)
