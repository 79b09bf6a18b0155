"""Write a simulated radiograph as a valid CR or DX (for presentation) DICOM file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def write_radiograph(
    path: Path,
    pixels: npt.NDArray[np.uint16],
    *,
    vendor_name: str,
    modality: str,
    bits: int,
    monochrome1: bool,
    writes_window: bool,
    pitch_mm: float,
    view: str,
    patient_id: str,
    uid_entropy: list[str],
) -> None:
    """One chest radiograph; UIDs are fresh but deterministic (derived from ``uid_entropy``)."""
    sop_class = CR_IMAGE_STORAGE if modality == "CR" else DX_PRESENTATION_STORAGE
    sop_instance = generate_uid(entropy_srcs=[*uid_entropy, "instance"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*uid_entropy, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*uid_entropy, "series"])
    ds.Modality = modality
    ds.Manufacturer = vendor_name
    ds.ManufacturerModelName = "Simulated"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.PatientName = f"SIMULATED^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDescription = f"CHEST {view}"
    ds.StudyDescription = "SIMULATED CHEST RADIOGRAPH"
    ds.PatientOrientation = ["L", "F"]  # columns towards the patient's left, rows towards the feet
    ds.ImageType = ["DERIVED", "PRIMARY"] if modality == "DX" else ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.ImagerPixelSpacing = [f"{pitch_mm:.4f}", f"{pitch_mm:.4f}"]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.ImageLaterality = "U"
    if writes_window:
        top = (1 << bits) - 1
        ds.WindowCenter = f"{top / 2:.1f}"
        ds.WindowWidth = f"{top:.1f}"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
