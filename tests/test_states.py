"""Series, job, outbox, queue and study-rule states: every legal move, and illegal ones raise."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from aenode.jobs import claim_job, move, record_job, requeue_interrupted
from aenode.records import SeriesInfo
from aenode.states import (
    TRANSITIONS,
    IllegalTransition,
    JobState,
    OutboxState,
    QueueState,
    SeriesState,
    StudyRuleState,
    transition,
)
from aenode.store import Store

KINDS = [SeriesState, JobState, OutboxState, QueueState, StudyRuleState]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_every_state_has_its_row_of_moves(kind) -> None:
    assert set(TRANSITIONS[kind]) == set(kind)
    for targets in TRANSITIONS[kind].values():
        assert all(isinstance(t, kind) for t in targets)


LEGAL = [
    (kind, old, new)
    for kind in KINDS
    for old, targets in TRANSITIONS[kind].items()
    for new in sorted(targets)
]
ILLEGAL = [
    (kind, old, new)
    for kind in KINDS
    for old, new in itertools.product(kind, kind)
    if new not in TRANSITIONS[kind][old]
]


@pytest.mark.parametrize(("kind", "old", "new"), LEGAL, ids=lambda v: str(v))
def test_every_legal_move(kind, old, new) -> None:
    assert transition(old, new) is new
    assert transition(old.value, new) is new  # as read back from the store


@pytest.mark.parametrize(("kind", "old", "new"), ILLEGAL, ids=lambda v: str(v))
def test_every_illegal_move_raises(kind, old, new) -> None:
    with pytest.raises(IllegalTransition, match=f"{kind.__name__}: {old} -> {new} is not"):
        transition(old, new)


def test_a_state_production_never_writes_is_refused() -> None:
    with pytest.raises(IllegalTransition, match=r"JobState: unknown state 'written'"):
        transition("written", JobState.DONE)


def test_terminal_states() -> None:
    assert TRANSITIONS[JobState][JobState.DONE] == frozenset()
    assert TRANSITIONS[OutboxState][OutboxState.SENT] == frozenset()
    assert TRANSITIONS[SeriesState][SeriesState.REJECTED] == frozenset()


def _job(store: Store) -> int:
    series = SeriesInfo("1.2", "1.2.3", 0, "MR", "", (Path("/x.dcm"),), first_arrival=1.0)
    with store.transaction() as conn:
        job = record_job(conn, "r", "m", "1.2", {"image": series}, time.time())
    assert job is not None and job.id is not None
    return job.id


def test_the_jobs_owner_refuses_an_illegal_move_and_writes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "aenode.db")
    job = _job(store)
    with pytest.raises(IllegalTransition, match="queued -> done"):
        with store.transaction() as conn:
            move(conn, job, JobState.DONE)
    assert store.execute("SELECT state FROM jobs")[0]["state"] == "queued"
    claimed = claim_job(store)
    assert claimed is not None and claimed.id == job
    with pytest.raises(IllegalTransition, match="running -> exporting"):
        with store.transaction() as conn:
            move(conn, job, JobState.EXPORTING)
    assert requeue_interrupted(store) == 1
    assert store.execute("SELECT state FROM jobs")[0]["state"] == "queued"
    store.close()


def test_queue_ack_twice_is_illegal(tmp_path: Path) -> None:
    store = Store(tmp_path / "aenode.db")
    store.enqueue("t", "k", {"a": 1})
    item = store.claim("t")
    assert item is not None and item.payload == {"a": 1}
    store.ack(item.id)
    with pytest.raises(IllegalTransition, match="QueueState: done -> failed"):
        store.nack(item.id, "late")
    assert store.counts("t") == {QueueState.DONE: 1}
    store.close()
