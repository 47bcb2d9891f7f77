"""The ISLES'22 stroke case as three DICOM series: REAL pixels, MADE-UP headers.

``../shared/data/isles22/rawdata/sub-strokecase0009/ses-0001`` holds DWI (b1000), ADC and
FLAIR as NIfTI. This helper writes each as an MR Image Storage series of one invented study
(fictitious patient, generated UIDs, SeriesDescription ``DWI``/``ADC``/``FLAIR``), one slice
per file, with the NIfTI geometry turned into ImagePositionPatient/ImageOrientationPatient
(SimpleITK gives LPS). The float voxels are stored as int16 with a RescaleSlope, so values
are quantised to 1/32000 of the series' largest magnitude. Nothing here comes from a scanner's
DICOM header: use it for selection, study roles and volume geometry, never as header truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = ["CASE", "ROLES", "nifti_path", "write_isles_study"]

CASE = "sub-strokecase0009_ses-0001"
ROLES = ("dwi", "adc", "flair")


def nifti_path(data_dir: Path, role: str) -> Path:
    """The NIfTI file of one role (``dwi``, ``adc``, ``flair``)."""
    return data_dir / "isles22/rawdata/sub-strokecase0009/ses-0001" / f"{CASE}_{role}.nii.gz"


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
    """
    study_uid = generate_uid()
    frame_uid = generate_uid()
    written: dict[str, list[Path]] = {}
    for number, role in enumerate(roles, start=1):
        image = sitk.ReadImage(str(nifti_path(data_dir, role)))
        voxels = sitk.GetArrayFromImage(image).astype(np.float64)  # (z, y, x)
        slope = float(np.max(np.abs(voxels))) / 32000.0 or 1.0
        stored = np.round(voxels / slope).astype(np.int16)
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
            ds.SeriesNumber = number
            ds.InstanceNumber = k + 1
            ds.Modality = "MR"
            ds.ImageType = ["DERIVED", "PRIMARY", role.upper()]
            ds.ImagePositionPatient = [
                f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))
            ]
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
            ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
            ds.SliceThickness = f"{spacing[2]:.6f}"
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
