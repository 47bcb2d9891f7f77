"""Helpers shared by the benchmarks: loopback ports and synthetic CT slices."""

from __future__ import annotations

import socket
import time

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["ct_slice", "free_port", "wait_port"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0, what: str = "server") -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not listening on {port} within {timeout} s")


def ct_slice(
    study: str,
    series: str,
    index: int,
    pixels: np.ndarray,
    *,
    z: float,
    pixel_spacing: float = 0.5,
    slice_thickness: float = 1.0,
    bits_stored: int = 16,
    rescale_intercept: float = 0.0,
) -> Dataset:
    """One axial CT slice (Explicit VR LE) of a synthetic series; ``pixels`` int16 or uint16."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID = "Bench^Synthetic", "BENCH"
    ds.Modality, ds.SeriesDescription, ds.InstanceNumber = "CT", "aenode bench", index + 1
    ds.ImagePositionPatient = [-128.0, -128.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [pixel_spacing, pixel_spacing], slice_thickness
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.RescaleIntercept, ds.RescaleSlope = rescale_intercept, 1
    ds.PixelData = pixels.tobytes()
    return ds
