"""Selection rule specifications as they appear in ``config.yaml`` (pydantic, validated at load).

A rule feeds one or more models and has EITHER ``series:`` (one condition tree that a single
series must satisfy) OR ``roles:`` (role name -> condition tree; the study must bring one
series per role)::

    selection:
      rules:
        - name: hippocampus
          models: [hippocampus]
          series:
            all:
              - {tag: Modality, equals: MR}
              - {tag: SeriesDescription, regex: "HippoCrop"}
              - {instances: {min: 10, max: 400}}

A condition is one mapping with exactly one kind:

- ``{all: [...]}``, ``{any: [...]}``, ``{not: {...}}``: combinations;
- ``{tag: K, equals: V, ignore_case: true}``: value equality (numbers compare as numbers);
- ``{tag: K, regex: R}``: the whole value matches ``R`` (anchored);
- ``{tag: K, one_of: [A, B]}``: equals one of (``ignore_case`` applies);
- ``{tag: K, min: 0.5, max: 3}``: numeric range (either bound may be left out);
- ``{tag: K, present: true}`` / ``false``: the attribute is there with a value / is not;
- ``{tag: K, contains: V}``: a multi-valued attribute (``ImageType``) has ``V`` among its values;
- ``{orientation: axial}``: slice orientation from ``ImageOrientationPatient``
  (``axial``, ``coronal``, ``sagittal`` or ``oblique``);
- ``{instances: {min, max}}``, ``{slices: {min, max}}``: instance count, or slice count
  (instances times frames);
- ``{sop_class: [uid or name, ...]}``: SOP Class UID (``CT Image Storage`` or ``1.2.840...``).

The shapes are checked here; the meaning (a known keyword, a valid regular expression,
exactly one kind per condition) by :func:`aenode.select.rules.compile_rules`, which runs when
the settings load and names the key path of what is wrong.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CountRange", "ConditionSpec", "RuleSpec", "Scalar"]

Scalar = str | int | float


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class CountRange(_Spec):
    """An inclusive count range; a missing bound is open."""

    min: int | None = Field(default=None, ge=0)
    max: int | None = Field(default=None, ge=0)


class ConditionSpec(_Spec):
    """One node of a condition tree (see the module docstring for the kinds)."""

    all: list[ConditionSpec] | None = None
    any: list[ConditionSpec] | None = None
    not_: ConditionSpec | None = Field(default=None, alias="not")
    tag: str | None = None
    equals: Scalar | None = None
    ignore_case: bool = False
    regex: str | None = None
    one_of: list[Scalar] | None = None
    min: float | None = None
    max: float | None = None
    present: bool | None = None
    contains: Scalar | None = None
    orientation: Literal["axial", "coronal", "sagittal", "oblique"] | None = None
    instances: CountRange | None = None
    slices: CountRange | None = None
    sop_class: str | list[str] | None = None


class RuleSpec(_Spec):
    """One selection rule: which series (or study roles) feed which models."""

    name: str = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    series: ConditionSpec | None = None
    roles: dict[str, ConditionSpec] | None = None
