"""The labelled cases a validation runs on: the labels CSV and the subgroups to break results down by.

Subgroups never read patient attributes: only the DICOM keywords in ``DICOM_SUBGROUPS`` are allowed, so
a report cannot carry names, IDs or UIDs from the files.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pydicom

from edge_agent.validate.stats import ValidationInputError

# Device and acquisition attributes only: none of them identifies a patient or a study.
DICOM_SUBGROUPS = frozenset(
    {
        "Manufacturer",
        "ManufacturerModelName",
        "Modality",
        "ViewPosition",
        "PhotometricInterpretation",
        "BodyPartExamined",
        "BitsStored",
        "Rows",
        "Columns",
        "PresentationIntentType",
    }
)
DEFAULT_DICOM_SUBGROUPS = ("Manufacturer", "ViewPosition", "PhotometricInterpretation", "Modality")
# A CSV column with more distinct values than this is an identifier or a measurement, not a subgroup.
MAX_SUBGROUP_VALUES = 20
# A numeric column with more distinct values than this is a measurement: bin it in the CSV instead.
MAX_NUMERIC_VALUES = 8
_NOT_SUBGROUPS = frozenset({"file", "label"})
# Never broken down by default, whatever their cardinality: they may identify people (ask for them by name).
_IDENTIFIER_HINTS = ("patient", "uid", "accession", "name", "birth")


def read_labels(labels_csv: Path, data_dir: Path) -> list[dict[str, str]]:
    """Rows of the labels CSV; needs columns file and label (0/1); files must stay inside ``data_dir``."""
    try:
        with labels_csv.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader)
    except OSError as exc:
        raise ValidationInputError(f"{labels_csv}: cannot read: {exc.strerror}") from None
    missing = [c for c in ("file", "label") if c not in columns]
    if missing:
        raise ValidationInputError(f"{labels_csv}: missing column(s) {', '.join(missing)}")
    if not rows:
        raise ValidationInputError(f"{labels_csv}: no rows")
    root = data_dir.resolve()
    for number, row in enumerate(rows, start=2):
        if row["label"] not in {"0", "1"}:
            raise ValidationInputError(f"{labels_csv}, line {number}: label must be 0 or 1")
        path = (data_dir / row["file"]).resolve()
        if not path.is_relative_to(root):
            raise ValidationInputError(f"{labels_csv}, line {number}: file is outside the data folder")
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _default_subgroup(column: str, values: list[str]) -> bool:
    """Whether a CSV column is a subgroup by default: few values, not a measurement, not an identifier."""
    if column in _NOT_SUBGROUPS or any(hint in column.lower() for hint in _IDENTIFIER_HINTS):
        return False
    distinct = set(values)
    if len(distinct) > MAX_SUBGROUP_VALUES:
        return False
    numeric = [v for v in distinct if v.strip()]
    many = len(numeric) > min(MAX_NUMERIC_VALUES, len(values) / 3)
    return not (numeric and all(_is_number(v) for v in numeric) and many)


def subgroup_columns(rows: list[dict[str, str]], requested: list[str] | None) -> tuple[list[str], list[str]]:
    """(CSV columns, DICOM keywords) to break the results down by."""
    columns = list(rows[0].keys())
    if requested is None:
        csv_cols = [c for c in columns if _default_subgroup(c, [r[c] for r in rows])]
        return csv_cols, [k for k in DEFAULT_DICOM_SUBGROUPS if k not in csv_cols]
    csv_cols, dicom = [], []
    for name in requested:
        if name in columns:
            csv_cols.append(name)
        elif name in DICOM_SUBGROUPS:
            dicom.append(name)
        else:
            raise ValidationInputError(
                f"subgroup {name!r} is neither a labels column nor an allowed DICOM attribute "
                f"({', '.join(sorted(DICOM_SUBGROUPS))})"
            )
    return csv_cols, dicom


def dicom_values(path: Path, keywords: list[str]) -> dict[str, str]:
    """The allowed attributes' values in one file ("(absent)" when missing, "unreadable" for a bad file)."""
    if not keywords:
        return {}
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=keywords)
    except Exception:
        return dict.fromkeys(keywords, "unreadable")
    return {k: str(ds.get(k, "")).strip() or "(absent)" for k in keywords}
