"""Which package may import which (issue 9, "the house"): dicom/ reads DICOM and knows no model."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edge_agent"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_dicom_imports_nothing_from_inference() -> None:
    leaks = {
        f"{path.name}: {module}"
        for path in sorted((PACKAGE / "dicom").glob("*.py"))
        for module in imported_modules(path)
        if module == "edge_agent.inference" or module.startswith("edge_agent.inference.")
    }
    assert not leaks


def test_the_header_record_lives_with_the_header() -> None:
    from edge_agent.dicom.header import InstanceMeta
    from edge_agent.journal import InstanceMeta as FromJournal

    assert InstanceMeta.__module__ == "edge_agent.dicom.header"
    assert FromJournal is InstanceMeta  # the old import path still works
    assert "edge_agent.journal" not in imported_modules(PACKAGE / "dicom" / "header.py")
    assert "edge_agent.journal" not in imported_modules(PACKAGE / "routing.py")
