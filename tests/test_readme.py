"""The README's configuration reference is generated from the settings models and current."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_config_reference_in_readme_is_current() -> None:
    generated = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_reference.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert generated in (ROOT / "README.md").read_text(), (
        "README configuration reference is stale: run python scripts/config_reference.py --write"
    )


def test_readme_opens_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head
