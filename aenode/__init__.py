"""aenode: a DICOM network inference node.

receive (DIMSE SCP, durable spool) -> assemble (series completion) -> select (rules on tags)
-> volume (geometry-checked) -> infer (torch, warm models) -> results (SEG, SC, SR)
-> export (C-STORE SCU, durable outbox).

The names below are the public surface; they are imported lazily so that ``import aenode``
(and the receiving processes) do not pay for torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from aenode.version import __version__

if TYPE_CHECKING:
    from aenode.config import ConfigError, Settings, load_settings
    from aenode.errors import AenodeError, InputError, InternalError, PeerError
    from aenode.export import Outbox, SendOutcome, send_files
    from aenode.infer.registry import Registry, RegistryError
    from aenode.infer.runtime import InferenceError, Runtime
    from aenode.jobs import JobRunner
    from aenode.offline import run_offline
    from aenode.pipeline import Node
    from aenode.records import Job, Prediction, SeriesInfo, Volume
    from aenode.results import ResultSet, write_results
    from aenode.select import StudyTracker, compile_rules
    from aenode.states import IllegalTransition, JobState, OutboxState, SeriesState
    from aenode.store import Store
    from aenode.volume import VolumeError, build_volume, build_volume_from_files

_WHERE = {
    "AenodeError": "aenode.errors",
    "InputError": "aenode.errors",
    "InternalError": "aenode.errors",
    "PeerError": "aenode.errors",
    "IllegalTransition": "aenode.states",
    "JobState": "aenode.states",
    "OutboxState": "aenode.states",
    "SeriesState": "aenode.states",
    "ConfigError": "aenode.config",
    "Settings": "aenode.config",
    "load_settings": "aenode.config",
    "Outbox": "aenode.export",
    "SendOutcome": "aenode.export",
    "send_files": "aenode.export",
    "Registry": "aenode.infer.registry",
    "RegistryError": "aenode.infer.registry",
    "InferenceError": "aenode.infer.runtime",
    "Runtime": "aenode.infer.runtime",
    "JobRunner": "aenode.jobs",
    "run_offline": "aenode.offline",
    "Node": "aenode.pipeline",
    "Job": "aenode.records",
    "Prediction": "aenode.records",
    "SeriesInfo": "aenode.records",
    "Volume": "aenode.records",
    "ResultSet": "aenode.results",
    "write_results": "aenode.results",
    "StudyTracker": "aenode.select",
    "compile_rules": "aenode.select",
    "Store": "aenode.store",
    "VolumeError": "aenode.volume",
    "build_volume": "aenode.volume",
    "build_volume_from_files": "aenode.volume",
}

__all__ = [
    "__version__",
    "AenodeError",
    "IllegalTransition",
    "InputError",
    "InternalError",
    "JobState",
    "OutboxState",
    "PeerError",
    "SeriesState",
    "ConfigError",
    "InferenceError",
    "Job",
    "JobRunner",
    "Node",
    "Outbox",
    "Prediction",
    "Registry",
    "RegistryError",
    "ResultSet",
    "Runtime",
    "SendOutcome",
    "SeriesInfo",
    "Settings",
    "Store",
    "StudyTracker",
    "Volume",
    "VolumeError",
    "build_volume",
    "build_volume_from_files",
    "compile_rules",
    "load_settings",
    "run_offline",
    "send_files",
    "write_results",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'aenode' has no attribute {name!r}")


logging.getLogger(__name__).addHandler(logging.NullHandler())
