"""Model cards: ``models/<name>/model.yaml``, validated by pydantic.

A card says what a model is for, what it takes (modality, roles, preprocessing), what it
gives (labels with coded SNOMED CT category and type, or classes with an output head), how
it runs (TorchScript or a state dict for a zoo architecture, weights and their sha256) and
how well it did on held-out data. ``docs/models.md`` is the written contract; this module
enforces the parts a card alone can show (the registry checks the rest against the network).

Axis order: every size or spacing in a card is a list in **(x, y, z)** order (columns,
rows, slices: the order of DICOM, ITK and SimpleITK), or a mapping ``{x: .., y: .., z: ..}``
that says so. Tensors handed to the network are ``[batch, channel, z, y, x]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "ClassSpec",
    "Code",
    "GeometrySpec",
    "InputSpec",
    "LabelSpec",
    "ModelCard",
    "OutputSpec",
    "PreprocessSpec",
    "ResourceSpec",
    "RoleSpec",
    "RuntimeSpec",
]


def _card_error(message: str) -> PydanticCustomError:
    """A validation error whose message is shown as it is (it names the card field)."""
    return PydanticCustomError("card", message.replace("{", "(").replace("}", ")"))


def _xyz(value: Any) -> Any:
    """Accept ``{x: .., y: .., z: ..}`` for a 3-vector and turn it into ``[x, y, z]``."""
    if isinstance(value, dict):
        if sorted(value) != ["x", "y", "z"]:
            keys = sorted(value)
            raise _card_error(f"a mapping must have exactly the keys x, y and z, got {keys}")
        return [value["x"], value["y"], value["z"]]
    return value


XYZ = Annotated[list[float], BeforeValidator(_xyz), Field(min_length=3, max_length=3)]
XYZInt = Annotated[list[int], BeforeValidator(_xyz), Field(min_length=3, max_length=3)]


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Code(_Card):
    """A coded concept, e.g. ``{value: "5366008", scheme: SCT, meaning: Hippocampus}``."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(default="SCT", min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


class RoleSpec(_Card):
    """One input series a model takes; ``required: false`` lets it run without it.

    Roles become input channels in card order. A missing optional role is an all-zero
    channel (after normalisation); with ``inputs.presence_channels`` the network is also told.
    """

    name: str = "image"
    required: bool = True
    wait_seconds: float = Field(
        default=0,
        ge=0,
        le=86400,
        description="optional role: once the required roles are there, wait up to this many "
        "seconds for it before the job starts without it (0: do not wait)",
    )

    @model_validator(mode="after")
    def _wait_only_optional(self) -> RoleSpec:
        if self.required and self.wait_seconds:
            raise _card_error(
                f"wait_seconds: only for an optional role (role {self.name!r} is required; "
                "a job always waits for its required roles)"
            )
        return self


class PreprocessSpec(_Card):
    """How an input volume is prepared before the network (sizes and spacings in x, y, z)."""

    target_spacing: XYZ | None = Field(
        default=None, description="(x, y, z) voxel spacing in mm the volume is resampled to"
    )
    orientation: Literal["LPS", "RAS"] | None = Field(
        default=None, description="the volume is reoriented so +x, +y, +z point this way"
    )
    intensity: Literal["none", "zscore", "window", "percentile"] = Field(
        default="zscore", description="intensity normalisation (see docs/models.md)"
    )
    window: list[float] | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        validate_default=True,
        description="[lower, upper] mapped to [0, 1] and clipped; required by intensity: window",
    )
    percentiles: list[float] | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        description="[lo, hi] percentiles (0-100) mapped to [0, 1] for intensity: percentile; "
        "default [0.5, 99.5]",
    )
    pad_to: XYZInt | None = Field(
        default=None,
        description="(x, y, z) network input size in voxels: padded and centre-cropped to exactly "
        "this size, unless runtime.patch_size is set (then a minimum size, padded only)",
    )

    @field_validator("target_spacing")
    @classmethod
    def _positive_spacing(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and min(value) <= 0:
            raise _card_error(f"every spacing must be > 0 mm, got {value}")
        return value

    @field_validator("pad_to")
    @classmethod
    def _positive_size(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and min(value) < 1:
            raise _card_error(f"every size must be >= 1 voxel, got {value}")
        return value

    @field_validator("window")
    @classmethod
    def _window(cls, value: list[float] | None, info: ValidationInfo) -> list[float] | None:
        intensity = info.data.get("intensity")
        if value is None:
            if intensity == "window":
                raise _card_error("required when intensity is window: [lower, upper]")
            return value
        if intensity is not None and intensity != "window":
            raise _card_error(f"only used with intensity: window (intensity is {intensity})")
        lower, upper = value
        if not lower < upper:
            raise _card_error(f"lower {lower:g} must be below upper {upper:g}")
        return value

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, value: list[float] | None, info: ValidationInfo) -> list[float] | None:
        if value is None:
            return value
        intensity = info.data.get("intensity")
        if intensity is not None and intensity != "percentile":
            raise _card_error(f"only used with intensity: percentile (intensity is {intensity})")
        lo, hi = value
        if not 0 <= lo < hi <= 100:
            raise _card_error(f"need 0 <= lo < hi <= 100, got [{lo:g}, {hi:g}]")
        return value


class GeometrySpec(_Card):
    """Geometry checks this model waives or corrects (see ``volume.allow``)."""

    allow: list[Literal["tilt", "gaps", "spacing"]] = Field(
        default_factory=list,
        description="volume checks waived for this model (default: the global volume.allow); "
        "the volume gets ITK's approximate geometry",
    )
    correct: list[Literal["tilt", "gaps"]] = Field(
        default_factory=list,
        description="corrected instead of rejected: tilt resamples a gantry-tilted stack onto "
        "an orthogonal grid, gaps interpolates a single missing slice",
    )


class InputSpec(_Card):
    """What the model takes: roles in channel order, and how each volume is prepared."""

    modality: str
    roles: list[RoleSpec] = Field(default_factory=lambda: [RoleSpec()], min_length=1)
    preprocessing: PreprocessSpec = Field(default_factory=PreprocessSpec)
    presence_channels: bool = Field(
        default=False,
        description="after the role channels, one channel per optional role: 1 when the role's "
        "series is present, 0 when missing",
    )
    geometry: GeometrySpec = Field(default_factory=GeometrySpec)


class LabelSpec(_Card):
    """One segmentation label: voxel value, name, coded category and type, display colour."""

    value: int = Field(ge=1, le=255)
    name: str = Field(min_length=1)
    category: Code
    type: Code
    type_modifier: Code | None = Field(
        default=None,
        description="Segmented Property Type Modifier, e.g. SCT 255549009 Anterior, so that "
        "labels of one type can be told apart",
    )
    color: list[int] = Field(min_length=3, max_length=3)


class ClassSpec(_Card):
    """One classifier output class: its name, optional code and (sigmoid head) threshold."""

    name: str = Field(min_length=1)
    threshold: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="sigmoid head: present when probability >= threshold; not allowed with "
        "softmax (the most probable class is the finding)",
    )
    code: Code | None = Field(
        default=None,
        validation_alias=AliasChoices("code", "finding"),
        description="coded concept of the class for the SR (e.g. SCT 50960005 Hemorrhage)",
    )


class OutputSpec(_Card):
    """What the model gives: segmentation labels, or classes and their head."""

    head: Literal["softmax", "sigmoid"] | None = Field(
        default=None,
        description="classification: softmax (mutually exclusive classes, one finding) or "
        "sigmoid (independent labels, one finding each); segmentation is always a softmax "
        "over background + labels",
    )
    labels: list[LabelSpec] = Field(default_factory=list)
    classes: list[ClassSpec] = Field(default_factory=list)


class RuntimeSpec(_Card):
    """How the model runs (sizes in x, y, z).

    ``torchscript`` and ``state_dict`` run a torch network on the weights file the card
    names. ``python`` runs a function from a file in the package folder
    (``entry_point: "mismatch.py:predict"``, its ``sha256`` checked at load); ``weights``
    (with ``weights_sha256``) is then optional, ``parameters`` is handed to the entry point,
    and the torch fields (architecture, patch size, flips) are the model's own business.
    """

    format: Literal["torchscript", "state_dict", "python"]
    architecture: str | None = None
    architecture_args: dict[str, Any] = Field(default_factory=dict)
    weights: Path | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    entry_point: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.py:[A-Za-z_][A-Za-z0-9_]*$",
        description='format python: "<file in the package folder>.py:<function>"; sha256 '
        "is that file's",
    )
    weights_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="format python: sha256 of runtime.weights (required when weights is set)",
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="format python: a free mapping handed to the entry point (card.runtime)",
    )
    warmup: bool = Field(
        default=True,
        description="format python: false skips the start-up warm-up call (a model that "
        "cannot run on a synthetic volume)",
    )
    patch_size: XYZInt | None = Field(
        default=None,
        description="(x, y, z) window size of MONAI sliding-window inference (segmentation)",
    )
    overlap: float = Field(default=0.25, ge=0, lt=1)
    batch_size: int = Field(default=4, ge=1)
    flip_tta: bool = False
    flip_axes: list[Literal["x", "y", "z"]] = Field(
        default=["x"], description="axes mirrored for test-time averaging"
    )

    @field_validator("patch_size")
    @classmethod
    def _positive_patch(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and min(value) < 1:
            raise _card_error(f"every size must be >= 1 voxel, got {value}")
        return value

    @property
    def entry_file(self) -> str | None:
        """The entry point's file name (format python), else None."""
        return None if self.entry_point is None else self.entry_point.split(":")[0]

    @property
    def entry_function(self) -> str | None:
        """The entry point's function name (format python), else None."""
        return None if self.entry_point is None else self.entry_point.split(":")[1]


class ResourceSpec(_Card):
    """What one warm copy of the model asks of a Ray cluster (``runtime.executor: ray``).

    ``runtime.ray.resources.<model>`` in the node's configuration overrides either field.
    """

    num_gpus: float = Field(
        default=0.0, ge=0, description="GPUs per actor; fractional shares one GPU (0.25)"
    )
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs per actor")


class ModelCard(_Card):
    """A model package's card."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    version: str
    task: Literal["segmentation", "classification"]
    description: str
    intended_use: str
    limits: list[str] = Field(
        default_factory=list, description="what the model cannot do or claim, one line each"
    )
    algorithm_family: Code | None = None
    inputs: InputSpec
    outputs: OutputSpec
    runtime: RuntimeSpec
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _runtime_fits_the_format(self) -> ModelCard:
        rt = self.runtime
        if rt.format != "python":
            if rt.weights is None:
                raise _card_error(f"runtime.weights: required for format {rt.format}")
            for name in ("entry_point", "weights_sha256"):
                if getattr(rt, name) is not None:
                    raise _card_error(f"runtime.{name}: only used with format python")
            if rt.parameters:
                raise _card_error("runtime.parameters: only used with format python")
            if not rt.warmup:
                raise _card_error("runtime.warmup: only used with format python")
            return self
        if rt.entry_point is None:
            raise _card_error(
                'runtime.entry_point: required for format python ("<file>.py:<function>", '
                "e.g. mismatch.py:predict)"
            )
        if rt.weights is not None and rt.weights_sha256 is None:
            raise _card_error("runtime.weights_sha256: required when runtime.weights is set")
        if rt.weights is None and rt.weights_sha256 is not None:
            raise _card_error("runtime.weights_sha256: given without runtime.weights")
        return self

    @model_validator(mode="after")
    def _outputs_fit_the_task(self) -> ModelCard:
        out = self.outputs
        if self.task == "segmentation":
            if out.head == "sigmoid":
                raise _card_error(
                    "outputs.head: segmentation is a softmax over background + labels; "
                    "leave head out or set softmax"
                )
            if out.classes and self.runtime.format != "python":
                raise _card_error("outputs.classes: a segmentation model lists outputs.labels")
            _distinct_label_codes(out.labels)
            return self
        if out.labels:
            raise _card_error("outputs.labels: a classification model lists outputs.classes")
        if out.head is None:
            raise _card_error(
                "outputs.head: required for classification: softmax (mutually exclusive "
                "classes, e.g. no bleed / bleed) or sigmoid (independent labels)"
            )
        names = [c.name for c in out.classes]
        if len(set(names)) != len(names):
            raise _card_error(f"outputs.classes: duplicate class names {names}")
        if out.head == "softmax":
            if out.classes and len(out.classes) < 2:
                raise _card_error(
                    "outputs.classes: a softmax head needs at least two classes (list the "
                    "negative class too, or use head: sigmoid for one independent label)"
                )
            for i, spec in enumerate(out.classes):
                if "threshold" in spec.model_fields_set:
                    raise _card_error(
                        f"outputs.classes.{i}.threshold: not used with head softmax (the most "
                        "probable class is the finding); remove it or use head: sigmoid"
                    )
        if self.runtime.patch_size is not None and self.runtime.format != "python":
            raise _card_error(
                "runtime.patch_size: sliding-window inference is for segmentation; a classifier "
                "sees one input of inputs.preprocessing.pad_to"
            )
        return self

    @property
    def fixed_size(self) -> list[int] | None:
        """The exact (x, y, z) network input size, or None when the size may vary.

        ``inputs.preprocessing.pad_to`` without ``runtime.patch_size``: every input is padded
        and centre-cropped to it. With a patch size the network sees sliding windows of that
        size and ``pad_to`` is only a minimum.
        """
        if self.runtime.patch_size is not None:
            return None
        return self.inputs.preprocessing.pad_to

    @property
    def channels(self) -> int:
        """Input channels: one per role, plus one per optional role with presence_channels."""
        roles = self.inputs.roles
        extra = sum(not r.required for r in roles) if self.inputs.presence_channels else 0
        return len(roles) + extra


def _distinct_label_codes(labels: list[LabelSpec]) -> None:
    seen: dict[tuple[str, ...], str] = {}
    for spec in labels:
        key: tuple[str, ...] = (spec.type.scheme, spec.type.value)
        if spec.type_modifier is not None:
            key += (spec.type_modifier.scheme, spec.type_modifier.value)
        if key in seen:
            raise _card_error(
                f"outputs.labels: {seen[key]!r} and {spec.name!r} have the same type code "
                f"({' '.join(key)}); give each a distinguishing type_modifier (e.g. SCT "
                "255549009 Anterior / SCT 255551008 Posterior) or type"
            )
        seen[key] = spec.name
