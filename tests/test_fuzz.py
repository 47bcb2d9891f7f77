"""The quick attack suite (issue 9): a full ``aenode serve`` node takes 300 fuzzed instances
mutated from real files, raw PDU abuse and the poison instance, then must still receive,
assemble and dispatch a valid study; and a receiver whose disk fills up must refuse what it
cannot store, lose nothing it acknowledged and accept again once space returns.

Real data (seeded mutations of): ../shared/data/udacity-mr/Study1/13_HCropVolume,
../shared/data/cq500-ct0 (first 8 files), ../shared/data/dcm-qa-ts. The long form is
``make stress`` (stress/).
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml
from conftest import ROOT
from fuzzing import Fuzzed, fuzz, pdu_abuse, rewrite_uids, send_raw, sources, split
from nodes import Receivers
from poison import write_poison
from pynetdicom import _config
from test_receive import NodeProcess, storescu

pytestmark = pytest.mark.network

ANSWERS = {0x0000, 0xC000, 0xA900, None, -1}  # None: the node aborted; -1: pynetdicom refused


def _hippocampus_rules() -> dict:
    """config.yaml's selection with only the rule of the one model these nodes load."""
    selection = yaml.safe_load((ROOT / "config.yaml").read_text())["selection"]
    selection["rules"] = [r for r in selection["rules"] if r["models"] == ["hippocampus"]]
    return selection


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess(
        tmp_path_factory.mktemp("fuzz"),
        {
            "node": {"artim_timeout": 2.0, "pdu_timeout": 2.0},
            "logging": {"level": "INFO"},
            "selection": _hippocampus_rules(),
        },
    ).start()
    yield proc
    proc.stop()


def _as_fuzzed(paths: list[Path], kind: str) -> list[Fuzzed]:
    out = []
    for path in paths:
        _, stream, ts, sop_class, uid = split(path)
        out.append(Fuzzed(path, kind, sop_class, uid, ts, stream))
    return out


def assert_acknowledged_kept(
    node: NodeProcess | Receivers, items: list[Fuzzed], answers: dict[str, int | None]
) -> int:
    kept = 0
    for item in items:
        if answers[item.sop_uid] != 0x0000:
            continue
        rows = node.query("SELECT path FROM instances WHERE sop_instance_uid=?", (item.sop_uid,))
        assert rows, f"{item.path.name} ({item.kind}) acknowledged but not recorded"
        spooled = node.storage / rows[0]["path"]
        assert spooled.read_bytes().endswith(item.stream), f"{item.path.name} changed on disk"
        kept += 1
    return kept


def test_fuzz_pdu_abuse_and_poison_then_a_valid_study_gets_through(
    node: NodeProcess, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(9)
    items = list(fuzz(sources(data_dir), 300, seed=9, out=tmp_path / "fuzz"))
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # bytes as they are
    answers = send_raw(node.port, items)
    assert set(answers.values()) <= ANSWERS, set(answers.values()) - ANSWERS
    refused = [i for i in items if answers[i.sop_uid] in (0xC000, 0xA900)]
    assert len(refused) >= 30, "the structural check refused almost nothing"
    assert assert_acknowledged_kept(node, items, answers) >= 30

    assert pdu_abuse(node.port, rng, 25) == 25  # every abusive connection was closed

    crop = sorted((data_dir / "udacity-mr" / "Study1" / "13_HCropVolume").glob("*.dcm"))
    poison = [write_poison(p, p) for p in rewrite_uids(crop, tmp_path / "poison", rng)]
    poison_answers = send_raw(node.port, _as_fuzzed(poison, "poison"))
    assert set(poison_answers.values()) == {0x0000}  # acknowledged: the header parses
    poison_series = str(pydicom.dcmread(poison[0], stop_before_pixels=True).SeriesInstanceUID)

    valid = rewrite_uids(crop, tmp_path / "valid", rng)
    done = storescu(node.port, *valid)
    assert done.returncode == 0, done.stderr
    series = str(pydicom.dcmread(valid[0], stop_before_pixels=True).SeriesInstanceUID)
    node.wait_for(lambda: bool(node.complete_series({series})), timeout=60)
    node.wait_for(
        lambda: any(series in r["inputs"] for r in node.query("SELECT inputs FROM jobs")),
        timeout=60,
    )
    assert len(node.query("SELECT 1 FROM instances WHERE series_uid=?", (series,))) == 32
    node.wait_for(
        lambda: any(
            "Modality cannot be read" in (r["reason"] or "")
            for r in node.query("SELECT reason FROM series WHERE series_uid=?", (poison_series,))
        ),
        timeout=60,
    )
    assert node.proc is not None and node.proc.poll() is None
    assert "Exception in thread" not in node.log_text()


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {exc}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10)


def test_full_disk_refuses_loses_nothing_and_recovers(
    tmpfs: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = Receivers(tmp_path, {"storage": {"path": str(tmpfs / "var"), "min_free_mb": 0}}).start()
    try:
        filler = tmpfs / "filler"
        filler.write_bytes(b"\0" * (8 << 20))  # leaves about 4 MB
        rng = random.Random(10)
        ct = sorted(p for p in (data_dir / "cq500-ct0").rglob("*") if p.is_file())[:40]
        items = _as_fuzzed(rewrite_uids(ct, tmp_path / "ct", rng), "ct")
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        answers = send_raw(node.port, items)
        statuses = set(answers.values())
        assert 0x0000 in statuses and statuses & {0xA700, 0x0110}, statuses
        kept = assert_acknowledged_kept(node, items, answers)
        assert kept < len(items)
        filler.unlink()  # space returns: no restart needed
        again = _as_fuzzed(rewrite_uids(ct[:3], tmp_path / "again", rng), "again")
        assert set(send_raw(node.port, again).values()) == {0x0000}
        assert assert_acknowledged_kept(node, again, {i.sop_uid: 0 for i in again}) == 3
    finally:
        node.stop()
