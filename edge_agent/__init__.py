"""edge-agent: a streaming DICOM triage inference daemon for GPU edge boxes."""

__version__ = "0.1.0"
