"""Model cards: ``models/<name>/model.yaml``, validated by pydantic.

A card says what a model is for, what it takes (modality, roles, preprocessing), what it
gives (labels with coded SNOMED CT category and type, or classes with thresholds), how it
runs (TorchScript or a state dict for a zoo architecture, weights and their sha256) and how
well it did on held-out data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ClassSpec",
    "Code",
    "InputSpec",
    "LabelSpec",
    "ModelCard",
    "OutputSpec",
    "PreprocessSpec",
    "RoleSpec",
    "RuntimeSpec",
]


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Code(_Card):
    """A coded concept, e.g. ``{value: "T-A1600", scheme: SRT, meaning: Hippocampus}``."""

    value: str
    scheme: str = "SCT"
    meaning: str


class RoleSpec(_Card):
    """One input series a model takes; ``required: false`` lets it run without it."""

    name: str = "image"
    required: bool = True


class PreprocessSpec(_Card):
    """How an input volume is prepared before the network."""

    target_spacing: list[float] | None = Field(default=None, min_length=3, max_length=3)
    orientation: Literal["LPS", "RAS"] | None = None
    intensity: Literal["none", "zscore", "window", "percentile"] = "zscore"
    window: list[float] | None = Field(default=None, min_length=2, max_length=2)
    percentiles: list[float] | None = Field(default=None, min_length=2, max_length=2)
    pad_to: list[int] | None = Field(default=None, min_length=3, max_length=3)


class InputSpec(_Card):
    """What the model takes."""

    modality: str
    roles: list[RoleSpec] = Field(default_factory=lambda: [RoleSpec()], min_length=1)
    preprocessing: PreprocessSpec = Field(default_factory=PreprocessSpec)


class LabelSpec(_Card):
    """One segmentation label: voxel value, name, coded category and type, display colour."""

    value: int = Field(ge=1, le=255)
    name: str
    category: Code
    type: Code
    color: list[int] = Field(min_length=3, max_length=3)


class ClassSpec(_Card):
    """One classifier output class and its decision threshold."""

    name: str
    threshold: float = Field(default=0.5, ge=0, le=1)
    finding: Code | None = None


class OutputSpec(_Card):
    """What the model gives."""

    labels: list[LabelSpec] = Field(default_factory=list)
    classes: list[ClassSpec] = Field(default_factory=list)


class RuntimeSpec(_Card):
    """How the model runs."""

    format: Literal["torchscript", "state_dict"]
    architecture: str | None = None
    architecture_args: dict[str, Any] = Field(default_factory=dict)
    weights: Path
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    patch_size: list[int] | None = Field(default=None, min_length=3, max_length=3)
    overlap: float = Field(default=0.25, ge=0, lt=1)
    batch_size: int = Field(default=4, ge=1)
    flip_tta: bool = False
    flip_axes: list[Literal["x", "y", "z"]] = Field(
        default=["x"], description="axes mirrored for test-time averaging"
    )


class ModelCard(_Card):
    """A model package's card."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    version: str
    task: Literal["segmentation", "classification"]
    description: str
    intended_use: str
    algorithm_family: Code | None = None
    inputs: InputSpec
    outputs: OutputSpec
    runtime: RuntimeSpec
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
