"""The dispatcher: complete series from the durable queue -> recorded jobs (real HippoCrop)."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from conftest import ROOT

from aenode.assemble import SERIES_TOPIC
from aenode.config import load_settings
from aenode.dispatch import Dispatcher
from aenode.select.rules import compile_rules
from aenode.select.studies import StudyTracker
from aenode.store import Store


def _dispatcher(tmp_path: Path) -> tuple[Store, Dispatcher]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"selection": yaml.safe_load((ROOT / "config.yaml").read_text())["selection"]}
        )
    )
    settings = load_settings(cfg, environ={})
    store = Store(tmp_path / "aenode.db")
    rules = compile_rules(settings.selection.rules)
    return store, Dispatcher(store, StudyTracker(store, rules, {}), poll_seconds=0.01)


def _hand_on(store: Store, series_uid: str, files: list[Path], description: str) -> None:
    now = time.time()
    store.execute(
        "INSERT INTO series (series_uid, revision, study_uid, modality, description,"
        " instance_count, first_arrival, last_arrival, state) VALUES (?, 0, '1.2', 'MR', ?, ?,"
        " ?, ?, 'complete')",
        (series_uid, description, len(files), now, now),
    )
    store.enqueue(
        SERIES_TOPIC,
        f"{series_uid}:0",
        {
            "study_uid": "1.2",
            "series_uid": series_uid,
            "revision": 0,
            "modality": "MR",
            "description": description,
            "files": [str(f) for f in files],
            "completed_at": now,
        },
    )


def test_hippocrop_becomes_one_job_and_other_series_none(tmp_path: Path, data_dir: Path) -> None:
    store, dispatcher = _dispatcher(tmp_path)
    study = data_dir / "udacity-mr" / "Study1"
    _hand_on(store, "1.2.3", sorted((study / "13_HCropVolume").glob("*.dcm")), "HippoCrop")
    _hand_on(store, "1.2.4", sorted((study / "12-T1post-05670").glob("*.dcm")), "T1post")
    jobs = dispatcher.step() + dispatcher.step()
    assert [(j.model, j.inputs["image"].series_uid) for j in jobs] == [("hippocampus", "1.2.3")]
    assert len(jobs[0].inputs["image"].files) == 32
    assert dispatcher.step() == []  # queue drained; nothing handed on twice
    rows = store.execute("SELECT model, state FROM jobs")
    assert [(r["model"], r["state"]) for r in rows] == [("hippocampus", "queued")]


def test_unreadable_series_is_rejected_with_the_file_named(tmp_path: Path) -> None:
    store, dispatcher = _dispatcher(tmp_path)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    _hand_on(store, "1.2.5", [bad], "HippoCrop")
    assert dispatcher.step() == []
    row = store.execute("SELECT state, reason FROM series WHERE series_uid='1.2.5'")[0]
    assert row["state"] == "rejected"
    assert str(bad) in row["reason"] and "cannot read header" in row["reason"]
    assert store.execute("SELECT state FROM queue")[0]["state"] == "failed"


def test_store_error_postpones_the_series_and_loses_nothing(tmp_path: Path, data_dir: Path) -> None:
    import sqlite3

    store, dispatcher = _dispatcher(tmp_path)
    real = dispatcher.tracker.on_series
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database is locked")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    dispatcher.tracker.on_series = flaky  # type: ignore[method-assign]
    crop = sorted((data_dir / "udacity-mr" / "Study1" / "13_HCropVolume").glob("*.dcm"))
    _hand_on(store, "1.2.3", crop, "HippoCrop")
    assert dispatcher.step() == []
    row = store.execute("SELECT state, error FROM queue")[0]
    assert row["state"] == "ready" and "database is locked" in row["error"]
    assert dispatcher.step(now=time.time()) == []  # not due yet
    jobs = dispatcher.step(now=time.time() + 2)
    assert [j.model for j in jobs] == ["hippocampus"]
