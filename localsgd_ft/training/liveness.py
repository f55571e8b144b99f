"""A trainer's sign of life for its replica role: a thread that touches this worker's pulse file.

A thread, so that the trainer beats while it waits (a collective on a slow link, a quorum, a heal): only a
process that is frozen, or stuck holding the interpreter, stops. Format and reader:
:mod:`localsgd_ft.contract.liveness`.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Optional

from localsgd_ft.contract.liveness import BEAT_S, pulse_path
from localsgd_ft.contract.names import LIVENESS_DIR_ENV
from localsgd_ft.storage.atomic import write_text_atomic


class Pulse:
    """Beats every ``BEAT_S`` on ``$LOCALSGD_FT_LIVENESS_DIR/worker-<LOCAL_RANK>.pid`` (nothing without it)."""

    def __init__(self) -> None:
        directory = os.environ.get(LIVENESS_DIR_ENV)
        self.path: Optional[Path] = (pulse_path(Path(directory), int(os.environ.get("LOCAL_RANK", "0")))
                                     if directory else None)

    def start(self) -> "Pulse":
        if self.path is None:
            return self
        # The pid first: the role must never read the previous incarnation's pid with a fresh beat.
        write_text_atomic(self.path, f"{os.getpid()}\n")
        threading.Thread(target=self._beat, name="liveness", daemon=True).start()
        return self

    def _beat(self) -> None:
        assert self.path is not None
        while True:  # a daemon thread: it ends with the trainer
            time.sleep(BEAT_S)
            try:
                os.utime(self.path)
            except OSError:  # the role removed its directory: it is ending; nothing to tell
                return
