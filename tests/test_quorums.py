"""Quorum ids stay unique across lighthouse restarts (pure logic; the real thing runs in test_storm)."""

from __future__ import annotations

from types import SimpleNamespace

from localsgd_ft.training.quorums import STRIDE, UniqueQuorums


class _Client:
    """torchft's ManagerClient as the Manager sees it: _quorum returns a result with a quorum_id."""

    def __init__(self, ids):
        self.ids = list(ids)

    def _quorum(self, **kwargs):
        return SimpleNamespace(quorum_id=self.ids.pop(0), store_address="h:1", max_step=7)

    def should_commit(self, *args):
        return True


def test_a_restarted_lighthouse_never_repeats_an_id():
    incarnation = {"n": 1}
    wrapped = UniqueQuorums(_Client([1, 2, 3, 1, 1, 2]), lambda: incarnation["n"])
    seen = [wrapped._quorum(timeout=1).quorum_id for _ in range(3)]
    incarnation["n"] = 2  # the lighthouse restarted: it counts quorums from 1 again
    seen += [wrapped._quorum(timeout=1).quorum_id for _ in range(3)]
    assert seen == [STRIDE + 1, STRIDE + 2, STRIDE + 3, 2 * STRIDE + 1, 2 * STRIDE + 1, 2 * STRIDE + 2]
    assert wrapped.should_commit() is True  # everything else passes through


def test_an_unanswered_incarnation_keeps_the_last_one():
    answers = iter([3, RuntimeError("busy")])

    def incarnation():
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    wrapped = UniqueQuorums(_Client([4, 5]), incarnation)
    first, second = wrapped._quorum().quorum_id, wrapped._quorum()
    assert (first, second.quorum_id, second.max_step) == (3 * STRIDE + 4, 3 * STRIDE + 5, 7)


def test_a_quorum_from_a_restarted_lighthouse_is_reported_once():
    incarnation = {"n": 1}
    wrapped = UniqueQuorums(_Client([1, 2, 1, 2]), lambda: incarnation["n"])
    wrapped._quorum()
    assert wrapped.take_restart() is None  # the first incarnation seen is no restart
    wrapped._quorum()
    incarnation["n"] = 2
    wrapped._quorum()
    assert wrapped.take_restart() is not None and wrapped.take_restart() is None
    wrapped._quorum()
    assert wrapped.take_restart() is None
