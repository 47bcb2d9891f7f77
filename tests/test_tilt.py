"""Gantry-tilt correction and gap interpolation: CQ500 against independent references, and
synthetic stacks with a known answer.

Real data: ``../shared/data/cq500-ct0`` (CQ500-CT-0, 238 slices of 0.625 mm, GantryDetectorTilt
8.5, one slice missing between CT000001.dcm and CT000008.dcm; CT000000.dcm is a stray slice of
another scan and is left out). References:

- SimpleITK: every acquired slice placed at its own ``ImagePositionPatient`` and resampled with
  ITK's linear interpolator onto the corrected grid, which is itself derived here from the
  headers (bounding box of all slices in the row/column/normal frame);
- dcm2niix (Debian package ``dcm2niix``, installed by scripts/system-deps.sh), whose
  ``_Tilt_Eq_1`` output is its own tilt-corrected, gap-equalised volume; skipped when absent.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from aenode.records import Volume
from aenode.tilt import CorrectionMethod, GeometryCorrection, StackError, correct_stack
from aenode.volume import VolumeError, build_volume_from_files

STRAY = "CT000000.dcm"


def _cq500_files(data_dir: Path) -> list[Path]:
    return [p for p in sorted((data_dir / "cq500-ct0").glob("*.dcm")) if p.name != STRAY]


@pytest.fixture(scope="module")
def cq500(data_dir: Path) -> tuple[Volume, Volume]:
    """(corrected, acquired): the corrected volume and the acquired slices in stack order."""
    files = _cq500_files(data_dir)
    corrected = build_volume_from_files(files, correct={"tilt", "gaps"})
    acquired = build_volume_from_files(files, allow={"tilt", "gaps"})  # ITK's approximation
    return corrected, acquired


def _header_grid(datasets: Sequence[Dataset]) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """The orthogonal grid that holds every slice, derived from the headers alone."""
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    dy, dx = (float(v) for v in datasets[0].PixelSpacing)
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    depth = (pos - pos[0]) @ normal
    step = float(np.median(np.diff(depth)))
    count = int(round(depth[-1] / step)) + 1
    u = (pos - pos[0]) @ row / dx  # in-plane drift in pixels
    v = (pos - pos[0]) @ col / dy
    lo_u, lo_v = np.floor(min(0.0, u.min()) + 1e-3), np.floor(min(0.0, v.min()) + 1e-3)
    hi_u, hi_v = np.ceil(max(0.0, u.max()) - 1e-3), np.ceil(max(0.0, v.max()) - 1e-3)
    origin = pos[0] + lo_u * dx * row + lo_v * dy * col
    size = (
        int(datasets[0].Columns + hi_u - lo_u),
        int(datasets[0].Rows + hi_v - lo_v),
        count,
    )
    spacing = np.array([dx, dy, depth[-1] / (count - 1)])
    direction = np.stack([row, col, normal], axis=1)
    return origin, spacing, direction, size


def _head_mask(ref: np.ndarray) -> np.ndarray:
    """Voxels inside the head (above -500 HU), away from the scanner's padding by 3 pixels."""
    padding = ndimage.binary_dilation(ref <= -2000, structure=np.ones((1, 7, 7), bool))
    return (ref > -500) & ~padding


def _agreement(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Mean absolute difference (HU) and Pearson correlation of two voxel sets."""
    x = ours.astype(np.float64)
    y = ref.astype(np.float64)
    mad = float(np.mean(np.abs(x - y)))
    x -= x.mean()
    y -= y.mean()
    return mad, float(x @ y / np.sqrt((x @ x) * (y @ y)))


def test_cq500_default_still_rejects(data_dir: Path) -> None:
    with pytest.raises(VolumeError, match=r"gantry tilt of 8\.50 degrees"):
        build_volume_from_files(_cq500_files(data_dir))


def test_cq500_correction_record(cq500: tuple[Volume, Volume]) -> None:
    corrected, acquired = cq500
    rec = corrected.correction
    assert rec is not None and acquired.correction is None
    assert rec.methods == (CorrectionMethod.TILT_SHEAR, CorrectionMethod.GAP_LINEAR)
    assert rec.tilt_degrees == pytest.approx(8.5, abs=0.01)
    assert rec.gantry_tilt_tag == 8.5
    # the gap lies between CT000001 (z 133.975) and CT000008 (z 135.225) along the stack
    names = [Path(ds.filename).name for ds in acquired.datasets]
    below = names.index("CT000001.dcm")
    assert names[below + 1] == "CT000008.dcm"
    assert rec.interpolated_indices == (below + 1,)
    (pos,) = rec.interpolated_positions
    normal = np.array(corrected.image.GetDirection()).reshape(3, 3)[:, 2]
    d_lo, d_hi = (
        float(np.dot(normal, [float(v) for v in acquired.datasets[i].ImagePositionPatient]))
        for i in (below, below + 1)
    )
    assert float(np.dot(normal, pos)) == pytest.approx((d_lo + d_hi) / 2, abs=1e-3)
    assert "gantry tilt of 8.50 degrees" in rec.describe()
    assert "1 missing slice(s) interpolated" in rec.describe()
    assert len(corrected.datasets) == 238 and corrected.image.GetSize()[2] == 239


def test_cq500_geometry_matches_headers(cq500: tuple[Volume, Volume]) -> None:
    corrected, acquired = cq500
    origin, spacing, direction, size = _header_grid(acquired.datasets)
    image = corrected.image
    assert image.GetSize() == size == (512, 562, 239)
    np.testing.assert_allclose(image.GetSpacing(), spacing, rtol=1e-4)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), direction, atol=1e-6)
    # within a small fraction of a voxel (the fit smooths DS rounding of the positions)
    assert np.linalg.norm(np.array(image.GetOrigin()) - origin) < 0.05 * min(spacing)
    # orthogonal output: the direction matrix is a rotation
    d = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-5)


def test_cq500_matches_simpleitk_from_true_positions(cq500: tuple[Volume, Volume]) -> None:
    corrected, acquired = cq500
    image = corrected.image
    ours = sitk.GetArrayViewFromImage(image)
    src_stack = sitk.GetArrayViewFromImage(acquired.image)
    direction = image.GetDirection()
    normal = np.array(direction).reshape(3, 3)[:, 2]
    origin = np.array(image.GetOrigin())
    sx, sy, sz = image.GetSpacing()
    fill = float(src_stack.min())
    reference = np.full(ours.shape, fill, dtype=np.float32)
    acquired_k = []
    d0 = float(np.dot(normal, [float(v) for v in acquired.datasets[0].ImagePositionPatient]))
    for i, ds in enumerate(acquired.datasets):
        pos = np.array([float(v) for v in ds.ImagePositionPatient])
        k = int(round((float(np.dot(normal, pos)) - d0) / sz))
        acquired_k.append(k)
        if i % 2:
            continue  # every other slice is plenty, and keeps the test fast
        # a three-slice slab of the same slice around its true position: ITK interpolates
        # in-plane only; the slab is constant along the normal
        slab = sitk.GetImageFromArray(np.repeat(src_stack[i][None].astype(np.float32), 3, axis=0))
        slab.SetSpacing((sx, sy, 1.0))
        slab.SetDirection(direction)
        slab.SetOrigin([float(v) for v in pos - normal])
        grid = sitk.Image([image.GetSize()[0], image.GetSize()[1], 1], sitk.sitkFloat32)
        grid.SetSpacing((sx, sy, sz))
        grid.SetDirection(direction)
        grid.SetOrigin([float(v) for v in origin + k * sz * normal])
        out = sitk.Resample(slab, grid, sitk.Transform(), sitk.sitkLinear, fill)
        reference[k] = sitk.GetArrayViewFromImage(out)[0]
    assert sorted(set(acquired_k)) == [k for k in range(239) if k != 236]
    ref = reference[acquired_k[::2]]
    got = ours[acquired_k[::2]].astype(np.float32)
    mask = _head_mask(ref)
    assert mask.sum() > 2_500_000
    mad, corr = _agreement(got[mask], ref[mask])
    print(f"CQ500 vs SimpleITK from true positions: head MAD {mad:.3f} HU, 1 - r = {1 - corr:.1e}")
    assert mad < 0.5, mad  # HU; int16 rounding alone is 0.25
    assert corr > 0.999, corr
    # the whole grid, padding edges included
    assert float(np.mean(np.abs(got - ref))) < 2.0


def test_cq500_matches_dcm2niix(cq500: tuple[Volume, Volume], tmp_path: Path) -> None:
    exe = shutil.which("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix not installed (Debian package dcm2niix; scripts/system-deps.sh)")
    corrected, acquired = cq500
    src = tmp_path / "in"
    src.mkdir()
    for ds in acquired.datasets:
        (src / Path(ds.filename).name).symlink_to(Path(ds.filename).resolve())
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        [exe, "-z", "n", "-f", "cq500", "-o", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (tilted,) = out.glob("cq500_Tilt*.nii")
    # NIfTI stores the rows bottom-up: flip to DICOM row order for a voxel-wise comparison
    ref = sitk.Flip(sitk.ReadImage(str(tilted)), [False, True, False])
    image = corrected.image
    assert ref.GetSize()[:2] == image.GetSize()[:2] == (512, 562)
    voxel = min(image.GetSpacing())
    assert np.linalg.norm(np.subtract(ref.GetOrigin(), image.GetOrigin())) < voxel
    np.testing.assert_allclose(ref.GetSpacing(), image.GetSpacing(), rtol=1e-4)
    np.testing.assert_allclose(ref.GetDirection(), image.GetDirection(), atol=1e-4)
    # dcm2niix's gap equalisation keeps 238 slices at the same step (its rounding drops the
    # top one); its slice k is ours for every k below the gap, compared voxel by voxel on
    # every other slice
    assert ref.GetSize()[2] == 238
    theirs = sitk.GetArrayViewFromImage(ref)[:236:2]
    ours = sitk.GetArrayViewFromImage(image)[:236:2].astype(np.float32)
    mask = _head_mask(theirs)
    mad, corr = _agreement(ours[mask], theirs[mask])
    print(f"CQ500 vs dcm2niix (slices 0-235, every other): MAD {mad:.3f} HU, 1-r {1 - corr:.1e}")
    assert mad < 0.5, mad
    assert corr > 0.999, corr
    # the interpolated slice (236) against dcm2niix's own interpolation there
    m = _head_mask(sitk.GetArrayViewFromImage(ref)[236:237])[0]
    diff = sitk.GetArrayViewFromImage(image)[236][m] - sitk.GetArrayViewFromImage(ref)[236][m]
    print(f"CQ500 interpolated slice vs dcm2niix's: head MAD {np.mean(np.abs(diff)):.2f} HU")
    assert float(np.mean(np.abs(diff))) < 5.0


# -- synthetic stacks with a known answer ----------------------------------------------


def _linear_field(points: np.ndarray) -> np.ndarray:
    """A field linear in LPS mm: bilinear resampling reproduces it exactly."""
    return 100.0 + 3.0 * points[..., 0] - 2.0 * points[..., 1] + 5.0 * points[..., 2]


def _sheared_stack(
    n: int, tilt_deg: float, rows: int = 20, columns: int = 16, dy: float = 0.5, dx: float = 0.8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slices tilted about the x axis, the table moving along z: as a GE scanner writes them."""
    t = np.radians(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(t), -np.sin(t)])
    iop = np.concatenate([row, col])
    table = 1.25  # mm per slice along z
    positions = np.array([[-5.0, -4.0, 10.0 + k * table] for k in range(n)])
    jj, ii = np.mgrid[0:rows, 0:columns]
    pixels = np.empty((n, rows, columns), dtype=np.float32)
    for k in range(n):
        pts = positions[k] + ii[..., None] * dx * row + jj[..., None] * dy * col
        pixels[k] = _linear_field(pts)
    return pixels, positions, iop


def _inside(rec: GeometryCorrection, shape: tuple[int, ...], step: float) -> np.ndarray:
    """Output voxels whose source row lies inside the acquired slice (20 rows, drift < 0)."""
    assert rec.shift_mm[0] == 0.0 and rec.shift_mm[1] <= 0.0
    shift_rows = rec.shift_mm[1] * np.arange(shape[0]) * step / 0.5
    jj = np.arange(shape[1])[None, :, None]
    src_row = jj - rec.added_rows - shift_rows[:, None, None]
    return np.broadcast_to((src_row >= 0) & (src_row <= 19), shape)


def test_synthetic_shear_known_answer() -> None:
    tilt = 20.0
    pixels, positions, iop = _sheared_stack(12, tilt)
    image, rec = correct_stack(pixels, positions, iop, (0.5, 0.8), gantry_tilt=-tilt)
    assert rec.methods == (CorrectionMethod.TILT_SHEAR,)
    assert rec.tilt_degrees == pytest.approx(tilt, abs=1e-3)
    # the step along the normal is the table step times cos(tilt); the drift along the
    # column cosine is table * sin(tilt) per slice: 11 slices * 0.4275 mm / 0.5 mm = 9.4 rows
    step = 1.25 * np.cos(np.radians(tilt))
    assert image.GetSpacing() == pytest.approx((0.8, 0.5, step))
    assert rec.added_rows == 10 and rec.added_columns == 0
    assert image.GetSize() == (16, 30, 12)
    arr = sitk.GetArrayViewFromImage(image)
    # every output voxel whose source lies inside its slice equals the field at its centre
    zz, jj, ii = np.mgrid[0:12, 0:30, 0:16]
    idx = np.stack([ii, jj, zz], axis=-1).reshape(-1, 3).astype(float)
    pts = np.array([image.TransformContinuousIndexToPhysicalPoint(p) for p in idx])
    expected = _linear_field(pts).reshape(arr.shape)
    inside = _inside(rec, arr.shape, step)
    assert inside.sum() > 0.6 * arr.size
    np.testing.assert_allclose(arr[inside], expected[inside], atol=1e-2)
    # and the first slice is the acquired one, untouched, at its own position
    top = rec.added_rows
    np.testing.assert_array_equal(arr[0, top : top + 20], pixels[0])
    np.testing.assert_allclose(
        image.TransformIndexToPhysicalPoint((0, top, 0)), positions[0], atol=1e-9
    )


def test_synthetic_single_gap_interpolated_exactly() -> None:
    pixels, positions, iop = _sheared_stack(10, 12.0)
    keep = [k for k in range(10) if k != 4]
    image, rec = correct_stack(pixels[keep], positions[keep], iop, (0.5, 0.8))
    assert rec.methods == (CorrectionMethod.TILT_SHEAR, CorrectionMethod.GAP_LINEAR)
    assert rec.interpolated_indices == (4,)
    full, _ = correct_stack(pixels, positions, iop, (0.5, 0.8))
    a, b = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(full)
    assert a.shape == b.shape
    inside = _inside(rec, a.shape, 1.25 * np.cos(np.radians(12.0)))
    inner = inside[3] & inside[5]
    assert inner.sum() > 200
    np.testing.assert_allclose(a[4][inner], b[4][inner], atol=1e-2)  # linear field: exact
    # the position of the interpolated slice is the acquired one, projected on the grid
    normal = np.cross(iop[:3], iop[3:])
    assert np.dot(normal, rec.interpolated_positions[0]) == pytest.approx(
        np.dot(normal, positions[4])
    )


def test_two_missing_slices_rejected_naming_the_gap() -> None:
    pixels, positions, iop = _sheared_stack(10, 12.0)
    keep = [k for k in range(10) if k not in (4, 5)]
    names = [f"im{k:03d}.dcm" for k in keep]
    with pytest.raises(
        StackError,
        match=r"2 slices missing, at most 1 is interpolated: 2 slice\(s\) missing between "
        r"im003\.dcm and im006\.dcm \(3\.668 mm where the series steps 1\.223 mm\)",
    ):
        correct_stack(pixels[keep], positions[keep], iop, (0.5, 0.8), names=names)
    # two separate single gaps are two missing slices too
    keep = [k for k in range(10) if k not in (2, 6)]
    with pytest.raises(StackError, match=r"2 slices missing.*im001\.dcm and im003\.dcm.*im005"):
        correct_stack(
            pixels[keep], positions[keep], iop, (0.5, 0.8), names=[f"im{k:03d}.dcm" for k in keep]
        )


def test_tag_disagreeing_with_positions_rejected() -> None:
    pixels, positions, iop = _sheared_stack(6, 12.0)
    with pytest.raises(
        StackError, match=r"GantryDetectorTilt 20 in slice 0 disagrees with the 12\.00"
    ):
        correct_stack(pixels, positions, iop, (0.5, 0.8), gantry_tilt=20.0)


def test_correction_needs_permission() -> None:
    pixels, positions, iop = _sheared_stack(6, 12.0)
    with pytest.raises(StackError, match=r"gantry tilt of 12\.00 degrees .*not allowed"):
        correct_stack(pixels, positions, iop, (0.5, 0.8), correct={"gaps"})
    keep = [0, 1, 3, 4, 5]
    with pytest.raises(StackError, match=r"gap interpolation not allowed: 1 slice\(s\) missing"):
        correct_stack(pixels[keep], positions[keep], iop, (0.5, 0.8), correct={"tilt"})
    with pytest.raises(ValueError, match=r"correct: unknown correction\(s\) \['tilted'\]"):
        correct_stack(pixels, positions, iop, (0.5, 0.8), correct={"tilted"})


def test_untilted_stack_with_gap_is_only_filled() -> None:
    pixels, positions, iop = _sheared_stack(6, 0.0)
    keep = [0, 1, 2, 4, 5]
    image, rec = correct_stack(pixels[keep], positions[keep], iop, (0.5, 0.8))
    assert rec.methods == (CorrectionMethod.GAP_LINEAR,)
    assert rec.tilt_degrees == 0.0 and rec.added_rows == 0
    arr = sitk.GetArrayViewFromImage(image)
    np.testing.assert_array_equal(arr[keep], pixels[keep])
    np.testing.assert_allclose(arr[3], pixels[3], atol=1e-3)
    assert image.GetOrigin() == pytest.approx(tuple(positions[0]))


# -- through build_volume_from_files, synthetic DICOM ------------------------------------


def _write_ct(
    folder: Path, pixels: np.ndarray, positions: np.ndarray, iop: np.ndarray, tilt: float
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    paths = []
    for k, (plane, pos) in enumerate(zip(pixels, positions, strict=True)):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", uid, "CT"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.PixelSpacing = [0.5, 0.8]
        ds.GantryDetectorTilt = tilt
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (np.rint(plane) + 1024).astype(np.int16).tobytes()
        path = folder / f"im{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_volume_corrects_on_request_and_names_two_gaps(tmp_path: Path) -> None:
    pixels, positions, iop = _sheared_stack(10, 15.0)
    keep = [k for k in range(10) if k != 6]
    paths = _write_ct(tmp_path / "one", pixels[keep], positions[keep], iop, 15.0)
    with pytest.raises(VolumeError, match=r"gantry tilt of 15\.00 degrees.*missing slice"):
        build_volume_from_files(paths)
    vol = build_volume_from_files(paths, correct={"tilt", "gaps"})
    assert vol.correction is not None
    assert vol.correction.interpolated_indices == (6,)
    assert vol.image.GetPixelID() == sitk.sitkInt16
    assert vol.image.GetSize() == (16, 20 + vol.correction.added_rows, 10)
    assert len(vol.datasets) == 9
    # correcting one problem while waiving the other is refused
    with pytest.raises(VolumeError, match=r"gaps waived and tilt corrected"):
        build_volume_from_files(paths, correct={"tilt"}, allow={"gaps"})
    keep = [k for k in range(10) if k not in (5, 6)]
    paths = _write_ct(tmp_path / "two", pixels[keep], positions[keep], iop, 15.0)
    with pytest.raises(
        VolumeError,
        match=r"2 slices missing, at most 1 is interpolated: 2 slice\(s\) missing "
        r"between im004\.dcm and im005\.dcm",
    ):
        build_volume_from_files(paths, correct={"tilt", "gaps"})
    with pytest.raises(ValueError, match=r"correct: unknown correction\(s\) \['spacing'\]"):
        build_volume_from_files(paths, correct={"spacing"})
