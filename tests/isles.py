"""The ISLES'22 stroke case as three DICOM series: REAL pixels, MADE-UP headers.

The writer lives in ``scripts/isles_to_dicom.py`` (also what ``make demo DEMO_STUDY=...``
is fed with); this module re-exports it for the tests, so there is one copy of it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "isles_to_dicom.py"
_spec = importlib.util.spec_from_file_location("isles_to_dicom", _SCRIPT)
assert _spec is not None and _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("isles_to_dicom", _module)
_spec.loader.exec_module(_module)

CASE: str = _module.CASE
ROLES: tuple[str, ...] = _module.ROLES
MADE_UP: str = _module.MADE_UP
nifti_path = _module.nifti_path
write_isles_study = _module.write_isles_study

__all__ = ["CASE", "MADE_UP", "ROLES", "nifti_path", "write_isles_study"]
