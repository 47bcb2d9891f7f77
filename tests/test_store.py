"""The store: a var/ written by the first release (schema 1) upgrades in place; the queue."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest
from conftest import ROOT

from aenode.assemble import recent_series
from aenode.jobs import claim_job, recent_jobs
from aenode.states import JobState, QueueState
from aenode.store import SCHEMA_VERSION, Store, StoreError

SCHEMA_V1 = (ROOT / "tests" / "schema_v1.sql").read_text()


def _v1_store(path: Path, *, with_study_tables: bool) -> None:
    """A store as aenode 0.1.0 left it, with a series, a queued job and a study role."""
    script = SCHEMA_V1
    if not with_study_tables:  # a node that never ran a study rule had none
        script = script[: script.index("CREATE TABLE IF NOT EXISTS select_roles")]
    conn = sqlite3.connect(path)
    conn.executescript(script)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema', '1')")
    conn.execute(
        "INSERT INTO series (series_uid, revision, study_uid, modality, first_arrival,"
        " last_arrival, state, completed_by) VALUES ('1.2.3', 0, '1.2', 'MR', 1, 2,"
        " 'complete', 'count')"
    )
    image = {"study_uid": "1.2", "series_uid": "1.2.3", "revision": 0, "modality": "MR"}
    inputs = {"image": {**image, "description": "", "files": ["/spool/a.dcm"]}}
    conn.execute(
        "INSERT INTO jobs (rule, model, study_uid, inputs, state, created_at, updated_at)"
        " VALUES ('r', 'hippocampus', '1.2', ?, 'queued', 1, 1)",
        (json.dumps(inputs),),
    )
    conn.execute(
        "INSERT INTO queue (topic, key, payload, state, created_at, updated_at)"
        " VALUES ('series.complete', '1.2.3:0', '{}', 'claimed', 1, 1)"
    )
    if with_study_tables:
        conn.execute(
            "INSERT INTO select_studies (rule, study_uid, state, first_match, last_match)"
            " VALUES ('isles', '1.2', 'waiting', 1, 1)"
        )
    conn.commit()
    conn.close()


@pytest.mark.parametrize("with_study_tables", [True, False])
def test_a_schema_1_store_upgrades_in_place(tmp_path: Path, with_study_tables: bool) -> None:
    db = tmp_path / "var" / "aenode.db"
    db.parent.mkdir()
    _v1_store(db, with_study_tables=with_study_tables)
    store = Store(db)
    assert store.schema_version == SCHEMA_VERSION
    (series,) = recent_series(store)
    assert (series.series_uid, series.state, series.completed_by) == ("1.2.3", "complete", "count")
    (job,) = recent_jobs(store)
    assert job.state is JobState.QUEUED
    claimed = claim_job(store)
    assert claimed is not None and claimed.inputs["image"].files == (Path("/spool/a.dcm"),)
    assert store.requeue_claimed("series.complete") == 1
    assert store.counts("series.complete") == {QueueState.READY: 1}
    studies = store.execute("SELECT rule, state FROM select_studies")
    assert [tuple(r) for r in studies] == ([("isles", "waiting")] if with_study_tables else [])
    indexes = {r["name"] for r in store.execute("SELECT name FROM sqlite_master")}
    assert "outbox_job" in indexes
    assert {"audit", "refusals"} <= {
        r["name"] for r in store.execute("SELECT name FROM sqlite_master")
    }
    # the claim above is in the audit trail; the jobs table took the volume-stage column
    (event,) = store.execute("SELECT event, job_id FROM audit")
    assert tuple(event) == ("job", claimed.id)
    assert "t_volume" in {r["name"] for r in store.execute("PRAGMA table_info(jobs)")}
    store.close()
    again = Store(db)  # a second start finds nothing to do
    assert again.schema_version == SCHEMA_VERSION
    again.close()


def test_a_fresh_store_and_many_openers_at_once(tmp_path: Path) -> None:
    db = tmp_path / "aenode.db"
    errors: list[BaseException] = []

    def open_close() -> None:
        try:
            Store(db).close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_close) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = Store(db)
    assert store.schema_version == SCHEMA_VERSION
    assert store.execute("SELECT COUNT(*) AS n FROM meta")[0]["n"] == 1
    store.close()


def test_a_newer_schema_is_refused_naming_the_file(tmp_path: Path) -> None:
    db = tmp_path / "aenode.db"
    Store(db).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=r"aenode\.db: schema version 99 is newer"):
        Store(db)


def test_in_memory_store_has_the_same_interface() -> None:
    store = Store(":memory:")
    assert store.schema_version == SCHEMA_VERSION
    assert store.enqueue("t", "k", {"x": 1})
    assert not store.enqueue("t", "k", {"x": 2})
    item = store.claim("t")
    assert item is not None and item.payload == {"x": 1} and item.attempts == 1
    store.nack(item.id, "busy", retry_at=0.0)
    assert store.has_ready("t")
    again = store.claim("t")
    assert again is not None and again.attempts == 2
    store.close()
