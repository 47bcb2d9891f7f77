"""Inference: model cards, the registry of packages, the device-worker runtime, training.

``cards`` (pure pydantic) is re-exported here; ``registry``, ``runtime``, ``train`` and
``zoo`` import torch and are imported where they are used.
"""

from __future__ import annotations

from aenode.infer.cards import (
    ClassSpec,
    Code,
    InputSpec,
    LabelSpec,
    ModelCard,
    OutputSpec,
    PreprocessSpec,
    ResourceSpec,
    RoleSpec,
    RuntimeSpec,
)

__all__ = [
    "ClassSpec",
    "Code",
    "InputSpec",
    "LabelSpec",
    "ModelCard",
    "OutputSpec",
    "PreprocessSpec",
    "ResourceSpec",
    "RoleSpec",
    "RuntimeSpec",
]
