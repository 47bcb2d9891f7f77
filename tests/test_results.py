"""SEG, SC report and TID 1500 SR built from the real HippoCrop series and re-read.

Source: ../shared/data/udacity-mr/Study1/13_HCropVolume (32 slices of 51x35, 1 mm, real MR).
The mask is synthetic: two boxes labelled 1 (anterior) and 2 (posterior).
"""

from __future__ import annotations

import copy
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml

from aenode.config import ResultsSettings
from aenode.infer.cards import ModelCard
from aenode.records import Job, Prediction, SeriesInfo, Volume
from aenode.results import ResultError, label_volumes_mm3, write_results
from aenode.results.report import PAGE_SIZE
from aenode.results.seg import build_seg

ROOT = Path(__file__).resolve().parents[1]
HIPPO = "udacity-mr/Study1/13_HCropVolume"
ANATOMY = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}

CARD = {
    "name": "hippocampus",
    "version": "1.2.0",
    "task": "segmentation",
    "description": "Anterior and posterior hippocampus on T1 MR crops",
    "intended_use": "tests",
    "algorithm_family": {"value": "123110", "scheme": "DCM", "meaning": "Artificial Intelligence"},
    "inputs": {"modality": "MR"},
    "outputs": {
        "labels": [
            {
                "value": 1,
                "name": "anterior hippocampus",
                "category": {
                    "value": "91723000",
                    "scheme": "SCT",
                    "meaning": "Anatomical Structure",
                },
                "type": {"value": "5366008", "scheme": "SCT", "meaning": "Hippocampus"},
                "type_modifier": {"value": "255549009", "scheme": "SCT", "meaning": "Anterior"},
                "color": [255, 80, 80],
            },
            {
                "value": 2,
                "name": "posterior hippocampus",
                "category": {
                    "value": "91723000",
                    "scheme": "SCT",
                    "meaning": "Anatomical Structure",
                },
                "type": {"value": "5366008", "scheme": "SCT", "meaning": "Hippocampus"},
                "type_modifier": {"value": "255551008", "scheme": "SCT", "meaning": "Posterior"},
                "color": [80, 160, 255],
            },
        ]
    },
    "runtime": {"format": "torchscript", "weights": "model.pt", "sha256": "0" * 64},
}


def load_volume(folder: Path) -> Volume:
    """A Volume of a single-frame series, sorted along the slice normal (test helper)."""
    datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))))
    pixels = np.stack([d.pixel_array for d in datasets]).astype(np.int16)
    image = sitk.GetImageFromArray(pixels)
    pos = [np.asarray(d.ImagePositionPatient, float) for d in datasets]
    dz = float(np.dot(normal, pos[1] - pos[0]))
    row, col = (float(v) for v in datasets[0].PixelSpacing)
    image.SetSpacing((col, row, dz))
    image.SetOrigin(tuple(pos[0]))
    image.SetDirection(tuple(np.column_stack([iop[:3], iop[3:], normal]).ravel()))
    headers = []
    for d in datasets:
        h = copy.deepcopy(d)
        del h.PixelData
        headers.append(h)
    series = SeriesInfo(
        study_uid=datasets[0].StudyInstanceUID,
        series_uid=datasets[0].SeriesInstanceUID,
        revision=0,
        modality="MR",
        description=str(datasets[0].SeriesDescription),
        files=tuple(sorted(folder.glob("*.dcm"))),
    )
    return Volume(image=image, series=series, datasets=headers)


def box_mask(volume: Volume) -> np.ndarray:
    """Two non-overlapping boxes, (slices, rows, columns) uint8."""
    size = volume.image.GetSize()
    mask = np.zeros((size[2], size[1], size[0]), np.uint8)
    mask[5:15, 10:25, 8:20] = 1
    mask[15:25, 25:40, 12:26] = 2
    return mask


def prediction_for(volume: Volume, mask: np.ndarray, probs: np.ndarray | None = None) -> Prediction:
    labels = sitk.GetImageFromArray(mask)
    labels.CopyInformation(volume.image)
    return Prediction(
        model="hippocampus",
        version="1.2.0",
        task="segmentation",
        labels=labels,
        probabilities=probs,
    )


@pytest.fixture(scope="module")
def hippo(data_dir: Path) -> Volume:
    return load_volume(data_dir / HIPPO)


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.model_validate(CARD)


@pytest.fixture(scope="module")
def written(hippo: Volume, card: ModelCard, tmp_path_factory: pytest.TempPathFactory):
    mask = box_mask(hippo)
    job = Job(
        rule="hippo",
        model="hippocampus",
        study_uid=hippo.series.study_uid,
        inputs={"image": hippo.series},
        id=7,
    )
    out = tmp_path_factory.mktemp("results")
    result = write_results(
        job, {"image": hippo}, prediction_for(hippo, mask), card, ResultsSettings(), out
    )
    return result, mask


def test_write_results_lists_seg_report_sr(written) -> None:
    result, _ = written
    assert [p.name for p in result.files] == ["seg.dcm", "report.dcm", "sr.dcm"]
    assert all(p.is_file() for p in result.files)
    assert result.report_png is not None and result.report_png.is_file()
    assert result.notes == []


def test_seg_round_trip_matches_mask_and_source_slices(written, hippo: Volume) -> None:
    result, mask = written
    seg = hd.seg.segread(result.files[0])
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == hippo.series.study_uid
    assert seg.SeriesInstanceUID != hippo.series.series_uid
    assert seg.SeriesNumber == 9001
    assert seg.SeriesDescription == "AI hippocampus SEG (aenode)"
    assert seg.Manufacturer == "aenode"
    assert list(seg.SoftwareVersions)[1] == "hippocampus 1.2.0"
    source_uids = [d.SOPInstanceUID for d in hippo.datasets]
    pixels = seg.get_pixels_by_source_instance(source_uids, ignore_spatial_locations=False)
    # (slices, rows, columns, segments) voxel by voxel
    assert pixels.shape == mask.shape + (2,)
    assert np.array_equal(pixels[..., 0], mask == 1)
    assert np.array_equal(pixels[..., 1], mask == 2)
    # every stored frame references the source instance at its own position
    by_uid = {d.SOPInstanceUID: d for d in hippo.datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in by_uid[ref].ImagePositionPatient])
    assert seg.number_of_frames == 20  # empty frames omitted: 10 slices per box


def test_seg_segments_carry_card_codes(written) -> None:
    result, _ = written
    seg = hd.seg.segread(result.files[0])
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == ["anterior hippocampus", "posterior hippocampus"]
    for item in seg.SegmentSequence:
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "5366008"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("hippocampus", "1.2.0")


def test_seg_segment_codes_tell_anterior_from_posterior(written) -> None:
    result, _ = written
    seg = pydicom.dcmread(result.files[0])
    codes = []
    for item in seg.SegmentSequence:
        (kind,) = item.SegmentedPropertyTypeCodeSequence
        (modifier,) = kind.SegmentedPropertyTypeModifierCodeSequence
        codes.append(
            (
                kind.CodeValue,
                modifier.CodingSchemeDesignator,
                modifier.CodeValue,
                modifier.CodeMeaning,
            )
        )
    assert codes == [
        ("5366008", "SCT", "255549009", "Anterior"),
        ("5366008", "SCT", "255551008", "Posterior"),
    ]
    # the SR's volume groups say it too: finding site Hippocampus with the modifier
    sr = hd.sr.srread(result.files[2])
    sites = [g.finding_sites for g in sr.content.get_volumetric_roi_measurement_groups()]
    assert [[s.value.meaning for s in site] for site in sites] == [["Hippocampus"]] * 2
    modifiers = [site[0].ContentSequence[0].ConceptCodeSequence[0].CodeValue for site in sites]
    assert modifiers == ["255549009", "255551008"]


def test_the_shipped_card_codes_each_segment_distinctly() -> None:
    card = yaml.safe_load((ROOT / "models" / "hippocampus" / "model.yaml").read_text())
    assert [
        (label["type"]["value"], label["type_modifier"]["value"])
        for label in card["outputs"]["labels"]
    ] == [("5366008", "255549009"), ("5366008", "255551008")]


def test_sr_volumes_equal_mask_volumes(written, hippo: Volume) -> None:
    result, mask = written
    sr = hd.sr.srread(result.files[2])
    seg = pydicom.dcmread(result.files[0])
    assert sr.StudyInstanceUID == hippo.series.study_uid
    assert sr.SeriesNumber == 9003
    voxel = float(np.prod(hippo.image.GetSpacing()))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    expected = {
        "anterior hippocampus volume": np.count_nonzero(mask == 1) * voxel,
        "posterior hippocampus volume": np.count_nonzero(mask == 2) * voxel,
    }
    for number, group in enumerate(groups, start=1):
        (m,) = group.get_measurements()
        assert m.unit.value == "mm3"
        assert m.value == pytest.approx(expected[group.tracking_identifier])
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [number]
    assert result.volumes_mm3 == pytest.approx(
        {k.removesuffix(" volume"): v for k, v in expected.items()}
    )


def test_report_is_rgb_page_in_study(written, hippo: Volume) -> None:
    result, _ = written
    sc = pydicom.dcmread(result.files[1])
    assert sc.PhotometricInterpretation == "RGB"
    assert (sc.Columns, sc.Rows) == PAGE_SIZE
    assert sc.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert sc.StudyInstanceUID == hippo.series.study_uid
    assert sc.SeriesNumber == 9002
    page = sc.pixel_array
    assert page.shape == (PAGE_SIZE[1], PAGE_SIZE[0], 3)
    from PIL import Image

    png = np.asarray(Image.open(result.report_png).convert("RGB"))
    assert np.array_equal(png, page)
    # the disclaimer band is red, the key slices carry both label colours
    assert tuple(page[-10, 5]) == (180, 0, 0)
    assert page.std() > 10


def test_fractional_seg_round_trip(hippo: Volume, card: ModelCard, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    size = hippo.image.GetSize()
    probs = rng.random((2, size[2], size[1], size[0]), dtype=np.float32)
    probs[:, :3] = 0  # some empty slices
    mask = box_mask(hippo)
    settings = ResultsSettings(fractional=True)
    seg = build_seg(hippo, prediction_for(hippo, mask, probs), card, settings)
    path = tmp_path / "frac.dcm"
    seg.save_as(path)
    back = hd.seg.segread(path)
    assert back.SegmentationType == "FRACTIONAL"
    pixels = back.get_pixels_by_source_instance(
        [d.SOPInstanceUID for d in hippo.datasets], rescale_fractional=True
    )
    assert np.abs(pixels - np.moveaxis(probs, 0, -1)).max() <= 1 / 255 + 1e-6


def test_empty_mask_is_still_valid_seg_or_skipped(
    hippo: Volume, card: ModelCard, tmp_path: Path
) -> None:
    job = Job(rule="r", model="hippocampus", study_uid=hippo.series.study_uid, inputs={})
    empty = prediction_for(hippo, np.zeros_like(box_mask(hippo)))
    result = write_results(job, {"image": hippo}, empty, card, ResultsSettings(), tmp_path / "a")
    assert [p.name for p in result.files] == ["seg.dcm", "report.dcm", "sr.dcm"]
    assert "empty" in result.notes[0]
    seg = hd.seg.segread(result.files[0])
    pixels = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in hippo.datasets])
    assert not pixels.any()
    skipped = write_results(
        job, {"image": hippo}, empty, card, ResultsSettings(skip_empty_seg=True), tmp_path / "b"
    )
    assert [p.name for p in skipped.files] == ["report.dcm", "sr.dcm"]
    assert skipped.notes == ["SEG skipped: the segmentation is empty (results.skip_empty_seg)"]
    assert label_volumes_mm3(empty, card) == {
        "anterior hippocampus": 0.0,
        "posterior hippocampus": 0.0,
    }


def test_classifier_findings_in_sr(hippo: Volume, card: ModelCard, tmp_path: Path) -> None:
    clf = ModelCard.model_validate(
        {
            **CARD,
            "task": "classification",
            "outputs": {
                "head": "sigmoid",
                "classes": [
                    {
                        "name": "bleed",
                        "threshold": 0.5,
                        "code": {"value": "50960005", "scheme": "SCT", "meaning": "Hemorrhage"},
                    }
                ],
            },
        }
    )
    pred = Prediction(
        model="hippocampus",
        version="1.2.0",
        task="classification",
        class_probabilities={"bleed": 0.83},
    )
    job = Job(rule="r", model="x", study_uid=hippo.series.study_uid, inputs={})
    result = write_results(job, {"image": hippo}, pred, clf, ResultsSettings(), tmp_path)
    assert [p.name for p in result.files] == ["report.dcm", "sr.dcm"]
    sr = hd.sr.srread(result.files[1])
    (group,) = sr.content.get_image_measurement_groups()
    assert group.finding_type.value == "50960005"
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.value.meaning == "Present"
    (probability,) = group.get_measurements()
    assert probability.name.meaning == "Probability"
    assert probability.value == pytest.approx(0.83)


def test_prediction_off_grid_is_rejected(hippo: Volume, card: ModelCard) -> None:
    labels = sitk.Image(10, 10, 10, sitk.sitkUInt8)
    pred = Prediction(model="hippocampus", version="1", task="segmentation", labels=labels)
    with pytest.raises(ResultError, match=r"label map size \(10, 10, 10\) differs from series"):
        build_seg(hippo, pred, card, ResultsSettings())
    with pytest.raises(ResultError, match="no volume for reference role 'image'"):
        write_results(
            Job("r", "m", "1", {}), {}, pred, card, ResultsSettings(), Path("/nonexistent")
        )


DCIODVFY = shutil.which("dciodvfy")


@pytest.mark.skipif(DCIODVFY is None, reason="dicom3tools dciodvfy not installed")
@pytest.mark.parametrize("index", [0, 1, 2], ids=["seg", "report", "sr"])
def test_dciodvfy_reports_no_errors(written, index: int) -> None:
    result, _ = written
    proc = subprocess.run(
        [str(DCIODVFY), "-new", str(result.files[index])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]
    assert errors == []


def _dcmqi_tool() -> str | None:
    venv_bin = Path(sys.executable).parent
    return shutil.which("segimage2itkimage", path=f"{venv_bin}:{os.environ.get('PATH', '')}")


@pytest.mark.skipif(_dcmqi_tool() is None, reason="dcmqi not installed (pip install dcmqi)")
def test_dcmqi_reads_our_seg_back_as_the_mask(written, hippo: Volume, tmp_path: Path) -> None:
    result, mask = written
    proc = subprocess.run(
        [
            str(_dcmqi_tool()),
            "--inputDICOM",
            str(result.files[0]),
            "--outputDirectory",
            str(tmp_path),
            "-t",
            "nrrd",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outputs = sorted(glob.glob(str(tmp_path / "*.nrrd")))
    assert len(outputs) == 2, outputs
    for label, path in enumerate(outputs, start=1):
        image = sitk.ReadImage(path)
        # dcmqi's volume may cover only the non-empty frames: compare on our grid
        on_grid = sitk.Resample(
            image, hippo.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
        )
        assert np.array_equal(sitk.GetArrayFromImage(on_grid) > 0, mask == label), path


def test_seg_from_the_pipeline_volume_builder(data_dir: Path, card: ModelCard, tmp_path: Path):
    """The same round trip on a Volume made by aenode.volume (the pipeline's builder)."""
    volume_mod = pytest.importorskip("aenode.volume")
    volume = volume_mod.build_volume_from_files(sorted((data_dir / HIPPO).glob("*.dcm")))
    mask = box_mask(volume)
    seg = build_seg(volume, prediction_for(volume, mask), card, ResultsSettings())
    seg.save_as(tmp_path / "seg.dcm")
    back = hd.seg.segread(tmp_path / "seg.dcm")
    uids = [str(d.SOPInstanceUID) for d in volume.datasets]
    pixels = back.get_pixels_by_source_instance(uids, ignore_spatial_locations=False)
    assert np.array_equal(pixels[..., 0], mask == 1)
    assert np.array_equal(pixels[..., 1], mask == 2)
    # slice i of the volume is at ImagePositionPatient of datasets[i]
    for i, ds in enumerate(volume.datasets):
        point = volume.image.TransformIndexToPhysicalPoint((0, 0, i))
        assert np.allclose(point, [float(v) for v in ds.ImagePositionPatient], atol=1e-3)
