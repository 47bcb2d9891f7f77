"""End to end with a real Orthanc as the PACS: a study goes in, SEG/SC/SR come back.

Real data: ../shared/data/udacity-mr/Study1 (5 MR series; the HippoCrop series is the one the
default hippocampus rule selects). Orthanc routes to aenode in the two ways hospitals use:
(a) Lua ``OnStoredInstance`` + ``SendToModality`` (one association per instance, as in the
course's set-up) and (b) ``OnStableStudy`` posting the study to ``/modalities/aenode/store``.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from conftest import ROOT, dcmtk, free_port
from orthanc import Orthanc
from test_receive import DCMTK_ENV, NodeProcess

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROUTE_PER_INSTANCE = (ROOT / "docker" / "orthanc" / "route-per-instance.lua").read_text()

ROUTE_STABLE_STUDY = (ROOT / "docker" / "orthanc" / "route-stable-study.lua").read_text()

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _setup(tmp: Path, lua: str) -> tuple[Orthanc, NodeProcess]:
    """Orthanc routing to aenode with ``lua``; aenode (default rules) sending back to Orthanc."""
    node_port = free_port()
    orthanc = Orthanc(
        tmp / "orthanc", modalities={"aenode": ("AENODE", "127.0.0.1", node_port)}, lua=lua
    )
    default = yaml.safe_load((ROOT / "config.yaml").read_text())
    (tmp / "node").mkdir()
    node = NodeProcess(
        tmp / "node",
        {
            "node": {"port": node_port},
            "models": {"enabled": None},  # every shipped model, as config.yaml
            "selection": default["selection"],
            "series": {"quiet_seconds": 2.0},
            "export": {
                "destinations": [
                    {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
                ],
                "retry": {"initial_seconds": 1.0, "max_interval_seconds": 4.0},
            },
            "logging": {"level": "INFO"},
        },
    )
    return orthanc.start(), node.start()


def _send_study(orthanc: Orthanc, folder: Path, *options: str) -> None:
    result = subprocess.run(
        [
            dcmtk("storescu"),
            *options,
            "-aec",
            "ORTHANC",
            "+sd",
            "+r",
            "127.0.0.1",
            str(orthanc.dicom_port),
            str(folder),
        ],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def _results(orthanc: Orthanc, study_uid: str, model: str = "hippocampus") -> dict[str, list[str]]:
    """The objects aenode stored in the study for ``model`` (by result series description)."""
    found: dict[str, list[str]] = {}
    for inst in orthanc.study_instances(study_uid):
        meta = orthanc.get_json(f"/instances/{inst['ID']}/metadata?expand")
        if meta.get("RemoteAET") == "AENODE":
            tags = orthanc.instance_tags(inst["ID"])
            if str(tags.get("SeriesDescription", "")).startswith(f"AI {model} "):
                found.setdefault(tags["SOPClassUID"], []).append(inst["ID"])
    return found


def _wait_results(
    orthanc: Orthanc,
    node: NodeProcess,
    study_uid: str,
    timeout: float,
    models: tuple[str, ...] = ("hippocampus", "brain-tumour"),
) -> dict[str, list[str]]:
    """Wait until every model's SEG, SC and SR are in the study; the hippocampus ones."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        each = [_results(orthanc, study_uid, m) for m in models]
        if all(all(k in found for k in (SEG, SC, SR)) for found in each):
            return each[0]
        time.sleep(0.5)
    jobs = node.query("SELECT id, state, reason FROM jobs")
    pytest.fail(
        f"results not in Orthanc within {timeout} s; jobs {[dict(j) for j in jobs]}\n"
        + node.log_text()[-4000:]
    )


def _download(orthanc: Orthanc, instance_id: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(orthanc._request("GET", f"/instances/{instance_id}/file")))


def _sr_volumes(sr: pydicom.Dataset) -> dict[str, float]:
    doc = hd.sr.Comprehensive3DSR.from_dataset(sr)
    volumes: dict[str, float] = {}
    for group in (
        doc.content.get_planar_roi_measurement_groups()
        + doc.content.get_volumetric_roi_measurement_groups()
    ):
        name = group.tracking_identifier
        for m in group.get_measurements():
            if m.name.meaning == "Volume":
                volumes[str(name)] = float(m.value)
    return volumes


def _check_round_trip(orthanc: Orthanc, study_dir: Path, found: dict[str, list[str]]) -> None:
    # Exactly one of each hippocampus object: from the HippoCrop series only.
    assert {k: len(v) for k, v in found.items()} == {SEG: 1, SC: 1, SR: 1}
    crop_files = sorted((study_dir / "13_HCropVolume").glob("*.dcm"))
    crop = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in crop_files)}
    crop_series = next(iter(crop.values())).SeriesInstanceUID
    seg_ds = _download(orthanc, found[SEG][0])
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert seg.StudyInstanceUID == next(iter(crop.values())).StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == crop_series
    # Every frame references a HippoCrop instance and sits at that instance's position.
    for frame in seg.PerFrameFunctionalGroupsSequence:
        src = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert src in crop
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, [float(v) for v in crop[src].ImagePositionPatient], atol=1e-3)
    # Per-label volumes in the SEG equal the SR's.
    spacing = [float(v) for v in next(iter(crop.values())).PixelSpacing]
    thickness = float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness)
    voxel = spacing[0] * spacing[1] * thickness
    sr_volumes = _sr_volumes(_download(orthanc, found[SR][0]))
    assert len(sr_volumes) == 2
    for number in seg.get_segment_numbers():
        label = seg.get_segment_description(number).SegmentLabel
        mask = seg.get_volume(segment_numbers=[number], combine_segments=True)
        mm3 = float(np.count_nonzero(mask.array)) * voxel
        assert mm3 > 100, f"{label}: {mm3} mm3"
        match = [v for k, v in sr_volumes.items() if label in k or k in label]
        assert match and abs(match[0] - mm3) <= 1e-3 * mm3 + 1e-6, (label, mm3, sr_volumes)
    sc = _download(orthanc, found[SC][0])
    assert sc.SamplesPerPixel == 3 and sc.Rows > 200


@pytest.mark.parametrize("routing", ["stable_study", "per_instance"])
def test_study_round_trip_through_orthanc(tmp_path: Path, data_dir: Path, routing: str) -> None:
    lua = ROUTE_STABLE_STUDY if routing == "stable_study" else ROUTE_PER_INSTANCE
    orthanc, node = _setup(tmp_path, lua)
    study_dir = data_dir / "udacity-mr" / "Study1"
    study_uid = str(
        pydicom.dcmread(next((study_dir / "13_HCropVolume").glob("*.dcm"))).StudyInstanceUID
    )
    try:
        _send_study(orthanc, study_dir)
        found = _wait_results(orthanc, node, study_uid, timeout=120)
        _check_round_trip(orthanc, study_dir, found)
        jobs = [j for j in node.query("SELECT * FROM jobs") if j["model"] == "hippocampus"]
        assert len(jobs) == 1
        assert jobs[0]["state"] == "done"
        assert all(
            jobs[0][k]
            for k in (
                "t_received",
                "t_completed",
                "t_started",
                "t_inferred",
                "t_written",
                "t_exported",
            )
        )
    finally:
        node.stop()
        orthanc.stop()


def test_results_survive_a_pacs_outage(tmp_path: Path, data_dir: Path) -> None:
    orthanc, node = _setup(tmp_path, ROUTE_STABLE_STUDY)
    study_dir = data_dir / "udacity-mr" / "Study1"
    study_uid = str(
        pydicom.dcmread(next((study_dir / "13_HCropVolume").glob("*.dcm"))).StudyInstanceUID
    )
    try:
        # The PACS goes down before the results exist (stopping it after the job starts
        # raced with a fast job): the study comes straight from the modality.
        orthanc.stop()
        sent = subprocess.run(
            [dcmtk("storescu"), "-aec", "AENODE", "+sd", "+r", "127.0.0.1", str(node.port)]
            + [str(study_dir)],
            capture_output=True,
            text=True,
            env=DCMTK_ENV,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        node.wait_for(
            lambda: bool(
                node.query("SELECT id FROM outbox WHERE attempts >= 1 AND last_error IS NOT NULL")
            ),
            timeout=60,
        )
        states = {j["model"]: j["state"] for j in node.query("SELECT model, state FROM jobs")}
        assert "exporting" in states.values() and "done" not in states.values(), states
        time.sleep(30)
        orthanc.start()
        found = _wait_results(orthanc, node, study_uid, timeout=60)
        time.sleep(2)  # nothing more may arrive
        found = _results(orthanc, study_uid)
        assert {k: len(v) for k, v in found.items()} == {SEG: 1, SC: 1, SR: 1}
        states = [j["state"] for j in node.query("SELECT state FROM jobs")]
        assert states == ["done", "done"]
    finally:
        node.stop()
        orthanc.stop()


def _numeric(items: object) -> list[tuple[str, float, str]]:
    found: list[tuple[str, float, str]] = []
    for item in items or []:  # type: ignore[attr-defined]
        if getattr(item, "ValueType", "") == "NUM" and "MeasuredValueSequence" in item:
            mv = item.MeasuredValueSequence[0]
            name = str(item.ConceptNameCodeSequence[0].CodeMeaning)
            found.append(
                (name, float(mv.NumericValue), mv.MeasurementUnitsCodeSequence[0].CodeValue)
            )
        found += _numeric(getattr(item, "ContentSequence", None))
    return found


def test_both_models_results_reach_the_study(tmp_path: Path, data_dir: Path) -> None:
    """Study1 yields two jobs: hippocampus on HippoCrop, brain-tumour on FLAIR; both come back."""
    orthanc, node = _setup(tmp_path, ROUTE_STABLE_STUDY)
    study_dir = data_dir / "udacity-mr" / "Study1"
    flair_files = sorted((study_dir / "36459-FLAIRreg-76244").glob("*.dcm"))
    flair = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(f) for f in flair_files)}
    first = next(iter(flair.values()))
    try:
        _send_study(orthanc, study_dir)
        hippo = _wait_results(orthanc, node, str(first.StudyInstanceUID), timeout=180)
        tumour = _results(orthanc, str(first.StudyInstanceUID), "brain-tumour")
        assert {k: len(v) for k, v in tumour.items()} == {SEG: 1, SC: 1, SR: 1}
        assert {k: len(v) for k, v in hippo.items()} == {SEG: 1, SC: 1, SR: 1}
        series = {
            m: {orthanc.instance_tags(i)["SeriesInstanceUID"] for ids in r.values() for i in ids}
            for m, r in (("hippocampus", hippo), ("brain-tumour", tumour))
        }
        assert not series["hippocampus"] & series["brain-tumour"]
        seg = hd.seg.Segmentation.from_dataset(_download(orthanc, tumour[SEG][0]))
        assert seg.StudyInstanceUID == first.StudyInstanceUID
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence:
            src = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            assert src in flair
        volume = seg.get_volume(segment_numbers=[1], combine_segments=True)
        sr = _download(orthanc, tumour[SR][0])
        scale = {"ml": 1.0, "mm3": 1e-3}
        ml = [v * scale[u] for n, v, u in _numeric(sr.ContentSequence) if u in scale]
        seg_ml = np.count_nonzero(volume.array) * float(np.prod(volume.spacing)) / 1000.0
        assert 40 < seg_ml < 150, seg_ml  # one large lesion (92.5 ml measured)
        assert len(ml) == 2 and all(v == pytest.approx(seg_ml, rel=1e-4) for v in ml), (seg_ml, ml)
        jobs = node.query("SELECT model, state FROM jobs ORDER BY model")
        assert [(j["model"], j["state"]) for j in jobs] == [
            ("brain-tumour", "done"),
            ("hippocampus", "done"),
        ]
    finally:
        node.stop()
        orthanc.stop()


def _content_items(items: Any) -> list[Any]:
    """Every content item of an SR tree, depth first."""
    out = []
    for item in items or []:
        out.append(item)
        out.extend(_content_items(getattr(item, "ContentSequence", None)))
    return out


def test_head_ct_classifier_through_orthanc(tmp_path: Path, data_dir: Path) -> None:
    """CQ500-CT-0 (tilted, one gap) in, the head CT classifier's SR and SC back, no SEG."""
    orthanc, node = _setup(tmp_path, ROUTE_STABLE_STUDY)
    folder = data_dir / "cq500-ct0"
    head = pydicom.dcmread(folder / "CT000001.dcm", stop_before_pixels=True)
    study_uid = str(head.StudyInstanceUID)
    sources = {
        str(ds.SOPInstanceUID)
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("CT*.dcm"))
        if ds.SeriesInstanceUID == head.SeriesInstanceUID
    }
    assert len(sources) == 238
    try:
        # JPEG lossless files: -xs sends them as they are (NOTES.md); the stray slice of
        # another study goes too and must not make a job
        _send_study(orthanc, folder, "-xs")
        deadline = time.monotonic() + 240
        found: dict[str, list[str]] = {}
        while time.monotonic() < deadline and not (SC in found and SR in found):
            time.sleep(0.5)
            found = _results(orthanc, study_uid, "head-ct-haemorrhage")
        jobs = [dict(j) for j in node.query("SELECT * FROM jobs")]
        assert SC in found and SR in found, (jobs, node.log_text()[-4000:])
        assert {k: len(v) for k, v in found.items()} == {SC: 1, SR: 1}  # a classifier: no SEG
        assert [(j["model"], j["state"]) for j in jobs] == [("head-ct-haemorrhage", "done")]
        record = json.loads(jobs[0]["findings"])
        p = record["class_probabilities"]["haemorrhage"]
        assert 0.0 < p < 1.0
        [finding] = record["findings"]
        assert finding["present"] == (p >= finding["threshold"])
        assert any("gantry tilt of 8.50 degrees" in n for n in record["notes"])
        # the job as `aenode jobs --json` shows it
        shown = subprocess.run(
            [
                str(ROOT / ".venv" / "bin" / "aenode"),
                "--config",
                str(node.config),
                "jobs",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        [listed] = json.loads(shown.stdout)["jobs"]
        assert listed["class_probabilities"]["haemorrhage"] == p
        sr = _download(orthanc, found[SR][0])
        items = _content_items(sr.ContentSequence)
        probabilities = [
            float(i.MeasuredValueSequence[0].NumericValue)
            for i in items
            if i.ValueType == "NUM"
            and "probability" in i.ConceptNameCodeSequence[0].CodeMeaning.lower()
            and "MeasuredValueSequence" in i
        ]
        assert probabilities and all(v == pytest.approx(p, abs=1e-6) for v in probabilities)
        texts = " ".join(str(i.TextValue) for i in items if i.ValueType == "TEXT")
        assert "gantry tilt of 8.50 degrees" in texts and "interpolated" in texts
        referenced = {
            str(r.ReferencedSOPInstanceUID)
            for i in items
            if i.ValueType == "IMAGE"
            for r in i.ReferencedSOPSequence
        }
        assert referenced and referenced <= sources
        sc = _download(orthanc, found[SC][0])
        assert sc.SamplesPerPixel == 3 and sc.Rows > 200
        assert sc.SeriesInstanceUID != head.SeriesInstanceUID
    finally:
        node.stop()
        orthanc.stop()
