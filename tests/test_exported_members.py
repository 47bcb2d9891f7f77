"""The public surface is deliberate: this list changes only on purpose."""

from __future__ import annotations

import subprocess
import sys

import aenode

EXPECTED = {
    "__version__",
    "AenodeError",
    "InputError",
    "PeerError",
    "InternalError",
    "IllegalTransition",
    "JobState",
    "SeriesState",
    "OutboxState",
    "ConfigError",
    "Settings",
    "load_settings",
    "Outbox",
    "SendOutcome",
    "send_files",
    "Registry",
    "RegistryError",
    "InferenceError",
    "Runtime",
    "JobRunner",
    "run_offline",
    "Node",
    "Job",
    "Prediction",
    "SeriesInfo",
    "Volume",
    "ResultSet",
    "write_results",
    "StudyTracker",
    "compile_rules",
    "Store",
    "VolumeError",
    "build_volume",
    "build_volume_from_files",
}


def test_public_names_are_pinned_and_resolve() -> None:
    assert set(aenode.__all__) == EXPECTED
    for name in aenode.__all__:
        assert getattr(aenode, name) is not None, name


def test_import_aenode_does_not_import_torch() -> None:
    code = (
        "import sys, aenode, aenode.config, aenode.receive, aenode.cli, aenode.status;"
        " print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
