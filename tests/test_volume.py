"""Volumes: real series against SimpleITK/GDCM, every transfer syntax, synthetic edge cases."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from aenode.records import SeriesInfo
from aenode.volume import VolumeError, build_volume, build_volume_from_files

UDACITY = [
    "Study1/12-T1post-05670",
    "Study1/13_HCropVolume",
    "Study1/34909-T1prereg-84610",
    "Study1/36459-FLAIRreg-76244",
    "Study1/37916-T2reg-88910",
    "Study2/14-T1post-22014",
    "Study2/14_HCropVolume",
    "Study2/32500-dT1-49467",
    "Study2/37623-FLAIRreg-62665",
    "Study2/37980-T2reg-88079",
]
CQ500_SERIES = "1.2.276.0.7230010.3.1.3.296485376.1.1521714308.2032152"


def _reference(folder: Path, series_uid: str | None = None) -> tuple[list[str], sitk.Image]:
    """GDCM's ordering and SimpleITK's ImageSeriesReader on the same files."""
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    reader = sitk.ImageSeriesReader()
    uid = series_uid or reader.GetGDCMSeriesIDs(str(folder))[0]
    names = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
    reader.SetFileNames(names)
    return names, reader.Execute()


def _assert_same(image: sitk.Image, ref: sitk.Image) -> None:
    assert image.GetSize() == ref.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), ref.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), ref.GetDirection(), atol=1e-5)
    ours = sitk.GetArrayViewFromImage(image).astype(np.float64)
    theirs = sitk.GetArrayViewFromImage(ref).astype(np.float64)
    # float32 output against GDCM's float64 for a non-integer RescaleSlope
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("series", UDACITY)
def test_udacity_series_match_simpleitk(data_dir: Path, series: str) -> None:
    folder = data_dir / "udacity-mr" / series
    names, ref = _reference(folder)
    files = sorted(folder.glob("*.dcm"), key=lambda p: p.name)  # name order, not slice order
    vol = build_volume_from_files(files)
    _assert_same(vol.image, ref)
    # slice order: the headers come back in GDCM's (position) order
    assert [Path(ds.filename).name for ds in vol.datasets] == [Path(n).name for n in names]
    assert all("PixelData" not in ds for ds in vol.datasets)
    assert vol.series.series_uid == vol.datasets[0].SeriesInstanceUID


def test_udacity_pixel_types(data_dir: Path) -> None:
    # int16 where the modality LUT is exact, float32 for the SC series with a real slope
    mr = build_volume_from_files(sorted((data_dir / "udacity-mr/Study1/13_HCropVolume").iterdir()))
    assert mr.image.GetPixelID() == sitk.sitkInt16
    sc = build_volume_from_files(sorted((data_dir / "udacity-mr/Study2/32500-dT1-49467").iterdir()))
    assert sc.image.GetPixelID() == sitk.sitkFloat32
    assert float(sc.datasets[0].RescaleSlope) == pytest.approx(1.35262501239776)


def test_cq500_rejected_for_tilt_and_gap(data_dir: Path) -> None:
    folder = data_dir / "cq500-ct0"
    files = [p for p in sorted(folder.iterdir()) if p.name != "CT000000.dcm"]
    with pytest.raises(VolumeError, match=r"gantry tilt of 8\.50 degrees") as info:
        build_volume_from_files(files)
    assert "GantryDetectorTilt 8.5" in str(info.value)
    assert "missing slice(s): 1.236 mm between CT000001.dcm and CT000008.dcm" in str(info.value)


def test_cq500_waived_matches_simpleitk(data_dir: Path) -> None:
    folder = data_dir / "cq500-ct0"
    names, ref = _reference(folder, CQ500_SERIES)
    files = [Path(n) for n in names]
    random.Random(3).shuffle(files)
    vol = build_volume_from_files(files, allow={"tilt", "gaps"})
    _assert_same(vol.image, ref)
    assert [Path(ds.filename).name for ds in vol.datasets] == [Path(n).name for n in names]
    # Hounsfield units: air and padding below -1000, brain around 20-50
    arr = sitk.GetArrayViewFromImage(vol.image)
    assert vol.image.GetPixelID() == sitk.sitkInt16
    assert arr.min() == -3024  # PixelPaddingValue -2000 after the -1024 intercept
    centre = arr[120, 240:272, 240:272]
    assert 0 < float(np.median(centre)) < 80


def test_cq500_gdcm_and_pydicom_decoders_agree(data_dir: Path) -> None:
    files = [data_dir / "cq500-ct0" / f"CT{k:06d}.dcm" for k in range(100, 112)]
    fast = build_volume_from_files(files, allow={"tilt", "gaps"})
    plain = build_volume_from_files(files, allow={"tilt", "gaps"}, decoder="pydicom")
    assert fast.image.GetPixelID() == plain.image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(fast.image), sitk.GetArrayViewFromImage(plain.image)
    )
    assert all("PixelData" not in ds for ds in fast.datasets + plain.datasets)


def test_cq500_stray_slice_single(data_dir: Path) -> None:
    path = data_dir / "cq500-ct0" / "CT000000.dcm"
    ref = sitk.ReadImage(str(path))
    vol = build_volume_from_files([path])
    _assert_same(vol.image, ref)


@pytest.mark.parametrize("decoder", ["auto", "pydicom"])
def test_dcm_qa_ts_all_transfer_syntaxes_identical(data_dir: Path, decoder: str) -> None:
    files = sorted((data_dir / "dcm-qa-ts").glob("*.dcm"))
    assert len(files) == 9
    arrays = []
    syntaxes = set()
    for path in files:
        vol = build_volume_from_files([path], decoder=decoder)  # type: ignore[arg-type]
        _assert_same(vol.image, sitk.ReadImage(str(path)))
        arrays.append(sitk.GetArrayFromImage(vol.image))
        syntaxes.add(vol.datasets[0].file_meta.TransferSyntaxUID)
    assert len(syntaxes) >= 7
    assert arrays[0].shape == (1, 384, 384)
    assert arrays[0].max() > 100
    for arr in arrays[1:]:
        np.testing.assert_array_equal(arr, arrays[0])


def test_unknown_allow_is_rejected(data_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"allow: unknown check\(s\) \['tilted'\]"):
        build_volume_from_files([data_dir / "dcm-qa-ts" / "1.dcm"], allow={"tilted"})


# -- synthetic edge cases ---------------------------------------------------------------

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _slice(
    series_uid: str,
    position: Sequence[float],
    value: int,
    *,
    orientation: Sequence[float] = AXIAL,
    rows: int = 6,
    columns: int = 8,
    instance: int = 1,
    slope: float | None = None,
    intercept: float | None = None,
    signed: bool = True,
    acquisition: int = 1,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPClassUID = MRImageStorage
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MR"
    ds.InstanceNumber = instance
    ds.AcquisitionNumber = acquisition
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [0.5, 0.75]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    pixels = np.full((rows, columns), value, dtype=np.int16 if signed else np.uint16)
    pixels[0, 0] = value + 1  # not uniform, so that a flip would show
    ds.PixelData = pixels.tobytes()
    return ds


def _write(folder: Path, datasets: Sequence[Dataset]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"im{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _stack(uid: str, n: int = 6, step: float = 2.0, start: float = -5.0) -> list[Dataset]:
    return [_slice(uid, (10.0, 20.0, start + k * step), 100 * k, instance=k + 1) for k in range(n)]


def test_shuffled_arrival_order_sorts_by_position(tmp_path: Path) -> None:
    uid = generate_uid()
    datasets = _stack(uid)
    order = list(range(6))
    random.Random(7).shuffle(order)
    shuffled = [datasets[i] for i in order]
    for ds in shuffled:
        ds.InstanceNumber = 7 - int(ds.InstanceNumber)  # misleading instance numbers
    paths = _write(tmp_path, shuffled)
    vol = build_volume_from_files(paths)
    arr = sitk.GetArrayFromImage(vol.image)
    assert arr.shape == (6, 6, 8)
    assert [int(arr[k, 1, 1]) for k in range(6)] == [0, 100, 200, 300, 400, 500]
    assert int(arr[2, 0, 0]) == 201
    assert vol.image.GetOrigin() == pytest.approx((10.0, 20.0, -5.0))
    assert vol.image.GetSpacing() == pytest.approx((0.75, 0.5, 2.0))
    assert vol.image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert [float(ds.ImagePositionPatient[2]) for ds in vol.datasets] == [-5, -3, -1, 1, 3, 5]


def test_missing_slice_is_named(tmp_path: Path) -> None:
    datasets = _stack(generate_uid())
    del datasets[3]
    paths = _write(tmp_path, datasets)
    with pytest.raises(
        VolumeError,
        match=r"missing slice\(s\): 4 mm between im002\.dcm and im003\.dcm where the series "
        r"steps 2 mm \(1 slice\(s\) missing\)",
    ):
        build_volume_from_files(paths)
    vol = build_volume_from_files(paths, allow={"gaps"})  # ITK's approximation, on request
    assert vol.image.GetSpacing()[2] == pytest.approx(2.5)


def test_non_uniform_spacing_is_named(tmp_path: Path) -> None:
    datasets = _stack(generate_uid())
    datasets[4].ImagePositionPatient = [10.0, 20.0, 3.3]
    paths = _write(tmp_path, datasets)
    with pytest.raises(VolumeError, match=r"non-uniform slice spacing: 2\.3 mm between im003"):
        build_volume_from_files(paths)
    # within a looser tolerance it builds
    vol = build_volume_from_files(paths, spacing_tolerance=0.2)
    assert vol.image.GetSize() == (8, 6, 6)


def test_duplicate_slice_is_named(tmp_path: Path) -> None:
    uid = generate_uid()
    datasets = [*_stack(uid), _slice(uid, (10.0, 20.0, 1.0), 7, instance=9)]
    paths = _write(tmp_path, datasets)
    with pytest.raises(
        VolumeError,
        match=r"duplicate slice position \(1 position\(s\) occur more than once\): "
        r"\[10, 20, 1\] in im003\.dcm, im006\.dcm",
    ):
        build_volume_from_files(paths)


def test_mixed_orientations_are_named(tmp_path: Path) -> None:
    uid = generate_uid()
    datasets = _stack(uid, n=4)
    datasets += [
        _slice(uid, (k * 2.0, 0.0, 0.0), 5, orientation=SAGITTAL, instance=10 + k) for k in range(2)
    ]
    paths = _write(tmp_path, datasets)
    with pytest.raises(
        VolumeError,
        match=r"ImageOrientationPatient \(mixed orientations\) differs within the series: "
        r"\[1, 0, 0, 0, 1, 0\] in 4 \(im000\.dcm, .*\); \[0, 1, 0, 0, 0, -1\] in 2 "
        r"\(im004\.dcm, im005\.dcm\)",
    ):
        build_volume_from_files(paths)


def test_rows_columns_must_agree(tmp_path: Path) -> None:
    uid = generate_uid()
    datasets = _stack(uid, n=3) + [_slice(uid, (10.0, 20.0, 1.0), 9, rows=4)]
    with pytest.raises(VolumeError, match=r"Rows/Columns differs within the series: 6x8 in 3"):
        build_volume_from_files(_write(tmp_path, datasets))


def test_tilted_stack_is_named(tmp_path: Path) -> None:
    uid = generate_uid()
    # 15 degrees: each 2 mm step along z also moves tan(15) * 2 mm along y
    shift = 2.0 * np.tan(np.radians(15.0))
    datasets = [_slice(uid, (0.0, k * shift, k * 2.0), 10 * k, instance=k + 1) for k in range(6)]
    datasets[0].GantryDetectorTilt = 15
    paths = _write(tmp_path, datasets)
    with pytest.raises(
        VolumeError,
        match=r"ImagePositionPatient not along the slice normal: gantry tilt of 15\.00 degrees",
    ):
        build_volume_from_files(paths)
    vol = build_volume_from_files(paths, allow={"tilt"})
    assert vol.image.GetSize() == (8, 6, 6)


def test_two_stacks_side_by_side_rejected(tmp_path: Path) -> None:
    uid = generate_uid()
    left = [_slice(uid, (0.0, 0.0, k * 2.0), k, instance=k + 1) for k in range(5)]
    right = [_slice(uid, (80.0, 0.0, k * 2.0 + 1), k, instance=k + 6) for k in range(3)]
    paths = _write(tmp_path, left + right)
    with pytest.raises(
        VolumeError,
        match=r"several stacks in one series \(2 stacks side by side: 5 slices \(im000\.dcm, "
        r"im001\.dcm, \.\.\. \(5 in all\)\); 3 slices .*rejected, send each stack as its own",
    ):
        build_volume_from_files(paths)


def test_two_acquisitions_at_the_same_positions_rejected(tmp_path: Path) -> None:
    uid = generate_uid()
    first = _stack(uid, n=4)
    second = _stack(uid, n=4)
    for ds in second:
        ds.AcquisitionNumber = 2
    paths = _write(tmp_path, first + second)
    with pytest.raises(
        VolumeError,
        match=r"several acquisitions in one series: each of 4 positions occurs 2 times "
        r"\(AcquisitionNumber 1, 2\)",
    ):
        build_volume_from_files(paths)


def test_modality_lut_float_and_int16(tmp_path: Path) -> None:
    uid = generate_uid()
    datasets = [
        _slice(uid, (0.0, 0.0, float(k)), 10 * k, slope=2.5, intercept=-10, instance=k + 1)
        for k in range(3)
    ]
    vol = build_volume_from_files(_write(tmp_path / "f", datasets))
    assert vol.image.GetPixelID() == sitk.sitkFloat32
    arr = sitk.GetArrayFromImage(vol.image)
    assert arr[:, 2, 2].tolist() == [-10.0, 15.0, 40.0]
    assert arr[1, 0, 0] == pytest.approx(11 * 2.5 - 10)

    uid = generate_uid()
    datasets = [
        _slice(uid, (0.0, 0.0, float(k)), 1000 + k, slope=1, intercept=-1024, instance=k + 1)
        for k in range(3)
    ]
    vol = build_volume_from_files(_write(tmp_path / "i", datasets))
    assert vol.image.GetPixelID() == sitk.sitkInt16
    assert sitk.GetArrayFromImage(vol.image)[:, 3, 3].tolist() == [-24, -23, -22]


def test_int16_overflow_switches_to_float32(tmp_path: Path) -> None:
    uid = generate_uid()
    datasets = [
        _slice(uid, (0.0, 0.0, float(k)), 30000 * k, signed=False, instance=k + 1) for k in range(3)
    ]
    vol = build_volume_from_files(_write(tmp_path, datasets))
    assert vol.image.GetPixelID() == sitk.sitkFloat32
    assert sitk.GetArrayFromImage(vol.image)[:, 3, 3].tolist() == [0.0, 30000.0, 60000.0]


def test_rle_compressed_series_equals_uncompressed(tmp_path: Path) -> None:
    uid = generate_uid()
    plain = _stack(uid)
    paths = _write(tmp_path / "plain", plain)
    packed = []
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.compress(RLELossless)
        packed.append(ds)
    rle_paths = _write(tmp_path / "rle", packed)
    assert pydicom.dcmread(rle_paths[0]).file_meta.TransferSyntaxUID == RLELossless
    a = build_volume_from_files(paths)
    b = build_volume_from_files(rle_paths)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a.image), sitk.GetArrayFromImage(b.image))


def _enhanced(positions: Sequence[float], values: Sequence[int]) -> Dataset:
    ds = _slice(generate_uid(), (0.0, 0.0, 0.0), 0)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(ds, keyword)
    n = len(positions)
    ds.NumberOfFrames = n
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = list(AXIAL)
    shared.PlaneOrientationSequence = [orient]
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.5]
    measures.SliceThickness = 1.0
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for z in positions:
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, z]
        item.PlanePositionSequence = [pos]
        lut = Dataset()
        lut.RescaleSlope = 1
        lut.RescaleIntercept = 5
        item.PixelValueTransformationSequence = [lut]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    pixels = np.stack([np.full((6, 8), v, dtype=np.int16) for v in values])
    ds.PixelData = pixels.tobytes()
    return ds


def test_multiframe_read_through_functional_groups(tmp_path: Path) -> None:
    ds = _enhanced([4.0, 0.0, 2.0, 6.0], [40, 0, 20, 60])
    paths = _write(tmp_path, [ds])
    vol = build_volume_from_files(paths)
    arr = sitk.GetArrayFromImage(vol.image)
    assert arr[:, 1, 1].tolist() == [5, 25, 45, 65]  # sorted by position, intercept applied
    assert vol.image.GetSpacing() == pytest.approx((0.5, 0.5, 2.0))
    assert len(vol.datasets) == 1


def test_build_volume_checks_series_uid(tmp_path: Path) -> None:
    paths = _write(tmp_path, _stack(generate_uid(), n=2))
    info = SeriesInfo("1.2.3.4", "9.9.9", 0, "MR", "", tuple(paths))
    with pytest.raises(VolumeError, match=r"SeriesInstanceUID .* in .*im000\.dcm is not the"):
        build_volume(info)


def test_not_dicom_named(tmp_path: Path) -> None:
    bad = tmp_path / "junk.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(VolumeError, match=r"junk\.dcm: cannot read as DICOM"):
        build_volume_from_files([bad])


def test_no_full_copy_while_building(tmp_path: Path) -> None:
    # numpy allocations are traced; the output lives in SimpleITK's own buffer (not traced),
    # so a full-size numpy copy of the volume anywhere in the build would show here.
    import tracemalloc

    uid = generate_uid()
    datasets = [
        _slice(uid, (0.0, 0.0, float(k)), k, rows=512, columns=512, instance=k + 1)
        for k in range(20)
    ]
    paths = _write(tmp_path, datasets)
    volume_bytes = 20 * 512 * 512 * 2
    tracemalloc.start()
    try:
        vol = build_volume_from_files(paths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert vol.image.GetPixelID() == sitk.sitkInt16
    assert sitk.GetArrayViewFromImage(vol.image)[19, 5, 5] == 19
    assert peak < 0.5 * volume_bytes, f"traced peak {peak} bytes for a {volume_bytes}-byte volume"
