"""``aenode run``: the pipeline on a real study folder without networking."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import ROOT

from aenode.cli import main

# Per-label volume range of the 201 Decathlon labels (mm3), measured in tests/test_hippocampus.py.
DECATHLON_RANGE_MM3 = {
    "Anterior hippocampus": (1054.0, 2593.0),
    "Posterior hippocampus": (993.0, 2169.0),
}


def test_run_writes_seg_sc_sr_for_the_hippocrop_series_only(
    tmp_path: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    study = data_dir / "udacity-mr" / "Study1"
    out = tmp_path / "out"
    assert (
        main(
            ["--config", str(ROOT / "config.yaml"), "run", str(study), "--out", str(out), "--json"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    # Two jobs: hippocampus on the HippoCrop series (checked here), brain-tumour on the FLAIR
    # series (tests/test_brain_tumour.py).
    assert sorted(j["model"] for j in report["jobs"]) == ["brain-tumour", "hippocampus"]
    job = next(j for j in report["jobs"] if j["model"] == "hippocampus")
    assert job["model"] == "hippocampus" and job["state"] == "done"
    assert job["inputs"]["image"]["description"] == "HippoCrop"
    volumes = job["volumes_mm3"]
    assert set(volumes) == {"Anterior hippocampus", "Posterior hippocampus"}
    for label, mm3 in volumes.items():
        low, high = DECATHLON_RANGE_MM3[label]
        assert low <= mm3 <= high, (label, mm3)
    names = sorted(Path(p).name for p in job["files"])
    assert names == ["report.dcm", "seg.dcm", "sr.dcm"]
    # The SEG agrees with the reported volumes and references the HippoCrop instances.
    seg = hd.seg.segread(next(p for p in job["files"] if p.endswith("seg.dcm")))
    crop = [
        pydicom.dcmread(p, stop_before_pixels=True)
        for p in (study / "13_HCropVolume").glob("*.dcm")
    ]
    crop_uids = {str(ds.SOPInstanceUID) for ds in crop}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in crop_uids
    voxel = float(np.prod([float(v) for v in crop[0].PixelSpacing])) * float(crop[0].SliceThickness)
    for number in seg.get_segment_numbers():
        label = seg.get_segment_description(number).SegmentLabel
        mask = seg.get_volume(segment_numbers=[number], combine_segments=True).array
        assert np.count_nonzero(mask) * voxel == pytest.approx(volumes[label], rel=1e-6)


def test_run_without_a_match_says_so(
    tmp_path: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    t1 = data_dir / "udacity-mr" / "Study1" / "12-T1post-05670"
    assert (
        main(["--config", str(ROOT / "config.yaml"), "run", str(t1), "--out", str(tmp_path)]) == 1
    )
    assert "no series matched a selection rule" in capsys.readouterr().out
