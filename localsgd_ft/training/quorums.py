"""Quorum ids that never repeat, even across restarts of the torchft lighthouse.

torchft's lighthouse numbers quorums from 1 each time it starts, and a repeated id makes groups
rendezvous among a previous quorum's keys or not reconfigure at all (docs/fault-tolerance.md). Every id
a Manager sees here carries the lighthouse's incarnation: ``incarnation * STRIDE + id``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

log = logging.getLogger("localsgd_ft.quorums")

# Ids per incarnation: far more quorum changes than any run makes between two restarts.
STRIDE = 1_000_000


class _Renumbered:
    """A torchft quorum result with its id moved into the incarnation's range."""

    def __init__(self, quorum: Any, quorum_id: int) -> None:
        self._quorum = quorum
        self.quorum_id = quorum_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._quorum, name)


class UniqueQuorums:
    """Stands in for ``Manager._client``; renumbers the quorums it returns."""

    def __init__(self, client: Any, incarnation: Callable[[], int]) -> None:
        self._client = client
        self._incarnation = incarnation
        self.last = 0  # the incarnation of the last quorum (kept when the service cannot answer)
        self._known = False  # whether ``last`` was read from the service at least once
        self._restart_seen_at: Optional[float] = None

    def take_restart(self) -> Optional[float]:
        """If the lighthouse restarted since this was last asked: when (monotonic) the quorum request that
        found the new lighthouse began (the group waited on the outage from then at the latest); else None."""
        seen_at, self._restart_seen_at = self._restart_seen_at, None
        return seen_at

    def _quorum(self, *args: Any, **kwargs: Any) -> Any:
        asked_at = time.monotonic()
        # torchft's manager server retries a failed request itself (quorum_retries): this returns once a
        # lighthouse, the old one or a restarted one, has formed a quorum.
        quorum = self._client._quorum(*args, **kwargs)
        before = self.last
        try:
            self.last = int(self._incarnation())
            if self._known and self.last != before:
                self._restart_seen_at = asked_at
            self._known = True
        except Exception as e:  # the lighthouse role busy: the last known incarnation is right almost always
            log.warning("could not read the lighthouse incarnation: %s", e)
        return _Renumbered(quorum, self.last * STRIDE + int(quorum.quorum_id))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def install(manager: Any, incarnation: Callable[[], int]) -> UniqueQuorums:
    """Make ``manager``'s quorum ids unique across lighthouse restarts (torchft 0.2.0's ``_client``)."""
    if not hasattr(manager, "_client") or not hasattr(manager._client, "_quorum"):
        raise RuntimeError("this torchft's Manager has no _client._quorum; localsgd_ft.training.quorums needs updating")
    wrapped = UniqueQuorums(manager._client, incarnation)
    manager._client = wrapped
    return wrapped
