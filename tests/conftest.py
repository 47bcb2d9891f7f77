"""Shared fixtures: the real data folder, dcmtk tools, free loopback ports."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()
# pynetdicom installs its own storescu/echoscu into the venv: always take dcmtk's.
DCMTK_PATH = "/usr/bin:/usr/local/bin:/bin"


def dcmtk(tool: str) -> str:
    """Absolute path of a dcmtk tool (not pynetdicom's same-named app)."""
    found = shutil.which(tool, path=DCMTK_PATH)
    if found is None:
        pytest.fail(f"dcmtk tool {tool!r} not found; run `make install`")
    return found


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``../shared/data``; the suite needs it (CI has it beside the clone)."""
    if not DATA.is_dir():
        pytest.fail(f"real data not found at {DATA}; see ../shared/data/README.md")
    return DATA
