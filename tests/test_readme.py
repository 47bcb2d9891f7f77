"""The README's configuration reference is generated from the settings models and current."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from conftest import ROOT, dcmtk


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


def test_every_option_of_every_command_has_help() -> None:
    import argparse

    from aenode.cli import _build_parser

    def walk(parser: argparse.ArgumentParser, name: str) -> list[str]:
        missing = []
        for action in parser._actions:  # argparse's documented-enough surface for tests
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    missing += walk(sub, f"{name} {sub_name}")
            elif not action.help:
                missing.append(f"{name}: {action.dest}")
        return missing

    assert walk(_build_parser(), "aenode") == []


def _dcmtk_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("dcmtk:\n\n```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def _uids(folder: Path) -> set[str]:
    return {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        for f in folder.rglob("*.dcm")
    }


@pytest.mark.network
def test_readme_dcmtk_lines_work_as_written_on_compressed_data(
    tmp_path: Path, data_dir: Path
) -> None:
    """Each dcmtk (and aenode echo) line of the README, as written, against our SCP, with the
    real compressed files of dcm-qa-ts (RLE, JPEG lossless, JPEG-LS, JPEG 2000) and CQ500."""
    from test_receive import DCMTK_ENV, NodeProcess

    lossless = {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.4.70",
    }
    study, subset = tmp_path / "study", tmp_path / "lossless"
    for folder in (study / "mr", study / "ct", subset):
        folder.mkdir(parents=True)
    syntaxes = set()
    for f in sorted((data_dir / "dcm-qa-ts").glob("*.dcm")):
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        syntaxes.add(ts)
        shutil.copy(f, study / "mr" / f.name)
        if ts in lossless:
            shutil.copy(f, subset / f"mr-{f.name}")
    for f in sorted((data_dir / "cq500-ct0").glob("*.dcm"))[:20]:
        shutil.copy(f, study / "ct" / f.name)
        shutil.copy(f, subset / f"ct-{f.name}")
    assert {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"} <= syntaxes
    folders = {"path/to/study/": study, "path/to/lossless/": subset, "path/with/seg/": subset}
    node = NodeProcess(tmp_path, {"models": {"enabled": []}, "node": {"receivers": 1}}).start()
    try:
        lines = _dcmtk_lines()
        tools = [line.split()[0] for line in lines]
        assert tools == ["echoscu", "dcmsend", "storescu", "storescu", "aenode"]
        for line in lines:
            args = line.replace("11112", str(node.port)).split()
            sent = next((folders[a] for a in args if a in folders), None)
            args = [str(folders[a]) if a in folders else a for a in args]
            if args[0] == "aenode":
                args = [str(ROOT / ".venv/bin/aenode"), "--config", str(node.config), *args[1:]]
            else:
                args[0] = dcmtk(args[0])
            done = subprocess.run(
                args, env=DCMTK_ENV, capture_output=True, text=True, timeout=120, cwd=tmp_path
            )
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
            if sent is not None:
                stored = {r["sop_instance_uid"] for r in node.query("SELECT * FROM instances")}
                assert _uids(sent) <= stored, line
        assert "C-ECHO AENODE@127.0.0.1" in done.stdout
    finally:
        node.stop()
