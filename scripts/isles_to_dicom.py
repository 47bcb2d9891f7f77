"""The ISLES'22 stroke case as a DICOM study of three series: REAL pixels, MADE-UP headers.

``python scripts/isles_to_dicom.py OUT [--data ../shared/data]`` writes
``OUT/dwi``, ``OUT/adc`` and ``OUT/flair``, one MR Image Storage file per slice, for
``make demo DEMO_STUDY=OUT`` and for the tests (``tests/isles.py`` calls
:func:`write_isles_study`).

Source: ``../shared/data/isles22/rawdata/sub-strokecase0009/ses-0001`` (ISLES'22, CC BY-SA
4.0): DWI (trace), ADC and FLAIR as NIfTI, from a Philips Achieva dStream 3 T (BIDS sidecars).
The pixels are the scanner's; every header is invented here and says so
(``ImageComments``, ``StudyDescription``, ``Manufacturer``): a fictitious patient, generated
UIDs, ``SeriesDescription`` ``DWI``/``ADC``/``FLAIR``, the NIfTI geometry as
ImagePositionPatient/ImageOrientationPatient (SimpleITK gives LPS). The acquisition values
(TR, TE, TI, field strength, b value) are copied from the BIDS sidecars, which came from the
scanner's headers; the coded values follow the usual vendor conventions so that selection
rules can be tested on them: ``ImageType`` ``ORIGINAL\\PRIMARY\\DIFFUSION\\TRACEW`` for the
trace, ``DERIVED\\PRIMARY\\DIFFUSION\\ADC`` for the ADC (Siemens' spelling), ``ScanningSequence``
``EP`` for both and ``IR`` with an ``InversionTime`` for FLAIR. Note that the sidecar gives
b = 800 s/mm^2 for this trace, not 1000; we write what the sidecar says.

Pixels: ADC is stored as vendors store it, integers in 1e-6 mm^2/s (the NIfTI holds floats in
1e-3 mm^2/s; negative noise is clipped to 0). DWI and FLAIR floats are stored as int16 with a
RescaleSlope, so values are quantised to 1/32000 of the series' largest magnitude.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = ["CASE", "ROLES", "nifti_path", "write_isles_study"]

CASE = "sub-strokecase0009_ses-0001"
ROLES = ("dwi", "adc", "flair")
MADE_UP = (
    "MADE-UP HEADER written by aenode scripts/isles_to_dicom.py; pixels are real "
    "(ISLES'22 sub-strokecase0009, CC BY-SA 4.0); not a scanner's DICOM"
)
# Coded values per role: vendor-like, so that selection rules can be exercised.
_CODED: dict[str, dict[str, Any]] = {
    "dwi": {
        "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW", "ND"],
        "ScanningSequence": "EP",
        "SequenceVariant": ["SK", "SP"],
        "SequenceName": "ep_b800t",
    },
    "adc": {
        "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"],
        "ScanningSequence": "EP",
        "SequenceVariant": ["SK", "SP"],
        "SequenceName": "ep_b0_800",
    },
    "flair": {
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"],
        "ScanningSequence": "IR",
        "SequenceVariant": ["SK", "SP", "MP"],
        "SequenceName": "tir2d1_38",
    },
}


def nifti_path(data_dir: Path, role: str) -> Path:
    """The NIfTI file of one role (``dwi``, ``adc``, ``flair``)."""
    return data_dir / "isles22/rawdata/sub-strokecase0009/ses-0001" / f"{CASE}_{role}.nii.gz"


def _sidecar(data_dir: Path, role: str) -> dict[str, Any]:
    path = nifti_path(data_dir, role).with_name(f"{CASE}_{role}.json")
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def _stored(role: str, voxels: np.ndarray) -> tuple[np.ndarray, float]:
    """Stored values and RescaleSlope: ADC as 1e-6 mm^2/s integers, the rest int16 scaled."""
    if role == "adc":
        return np.round(np.clip(voxels, 0.0, None) * 1000.0).astype(np.int16), 1.0
    slope = float(np.max(np.abs(voxels))) / 32000.0 or 1.0
    return np.round(voxels / slope).astype(np.int16), slope


def _acquisition(ds: Dataset, role: str, sidecar: dict[str, Any]) -> None:
    for keyword, value in _CODED[role].items():
        setattr(ds, keyword, value)
    ds.MRAcquisitionType = "2D"
    for keyword in (
        "RepetitionTime",
        "EchoTime",
        "InversionTime",
        "MagneticFieldStrength",
        "FlipAngle",
        "EchoTrainLength",
    ):
        if keyword in sidecar:
            setattr(ds, keyword, f"{float(sidecar[keyword]):.6g}")
    if role == "dwi" and "DiffusionBValue" in sidecar:
        ds.DiffusionBValue = float(sidecar["DiffusionBValue"])
        ds.DiffusionDirectionality = "ISOTROPIC"


def write_isles_study(
    out: Path, data_dir: Path, roles: tuple[str, ...] = ROLES
) -> tuple[str, dict[str, list[Path]]]:
    """Write the roles as DICOM series of one made-up study.

    Parameters
    ----------
    out : pathlib.Path
        Folder; one sub-folder per role is created.
    data_dir : pathlib.Path
        ``../shared/data``.
    roles : tuple of str
        Which of ``dwi``, ``adc``, ``flair`` to write.

    Returns
    -------
    tuple of (str, dict of str to list of pathlib.Path)
        The StudyInstanceUID and each role's files in slice order.

    Raises
    ------
    ValueError
        A role other than ``dwi``, ``adc``, ``flair``.
    """
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        raise ValueError(f"unknown ISLES role(s) {unknown}; choose from {ROLES}")
    study_uid = generate_uid()
    frame_uid = generate_uid()
    written: dict[str, list[Path]] = {}
    for number, role in enumerate(roles, start=1):
        image = sitk.ReadImage(str(nifti_path(data_dir, role)))
        stored, slope = _stored(role, sitk.GetArrayFromImage(image).astype(np.float64))
        sidecar = _sidecar(data_dir, role)
        direction = np.array(image.GetDirection()).reshape(3, 3)
        spacing = image.GetSpacing()
        series_uid = generate_uid()
        folder = out / role
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for k in range(stored.shape[0]):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientName = "ISLES^Synthetic header"
            ds.PatientID = "ISLES22-0009"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = frame_uid
            ds.StudyDescription = "MRI BRAIN STROKE (made-up header, ISLES'22 pixels)"
            ds.SeriesDescription = role.upper()
            ds.ImageComments = MADE_UP
            ds.Manufacturer = "aenode isles_to_dicom (made-up header)"
            ds.ManufacturerModelName = str(sidecar.get("ManufacturerModelName", "unknown"))
            ds.BodyPartExamined = "BRAIN"
            ds.SeriesNumber = number
            ds.InstanceNumber = k + 1
            ds.Modality = "MR"
            _acquisition(ds, role, sidecar)
            ds.ImagePositionPatient = [
                f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))
            ]
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
            ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
            ds.SliceThickness = f"{float(sidecar.get('SliceThickness', spacing[2])):.6f}"
            ds.SpacingBetweenSlices = f"{spacing[2]:.6f}"
            ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.RescaleSlope = f"{slope:.10g}"
            ds.RescaleIntercept = 0
            ds.PixelData = stored[k].tobytes()
            path = folder / f"{role}_{k:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        written[role] = paths
    return study_uid, written


def main(argv: list[str] | None = None) -> int:
    """Command line: write the study to a folder and print where."""
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (dwi/, adc/, flair/ inside)")
    parser.add_argument(
        "--data", type=Path, default=root / ".." / "shared" / "data", help="../shared/data"
    )
    args = parser.parse_args(argv)
    if not nifti_path(args.data, "dwi").is_file():
        print(f"isles_to_dicom: no ISLES'22 case under {args.data}", file=sys.stderr)
        return 2
    study_uid, files = write_isles_study(args.out, args.data.resolve())
    counts = ", ".join(f"{role} {len(paths)}" for role, paths in files.items())
    print(f"study {study_uid} in {args.out}: {counts} files (made-up headers, real pixels)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
