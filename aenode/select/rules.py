"""Compiled selection rules: checked once at start-up, then evaluated on series headers.

:func:`compile_rules` turns the pydantic specs of ``settings.selection.rules`` into
:class:`Rule` objects, rejecting a bad rule with :class:`aenode.config.ConfigError` naming
the key path (``selection.rules[0].series.all[1].regex: bad regular expression ...``).
:func:`evaluate` is a pure validator: it returns a :class:`Decision` whose ``reason`` names
the first condition that failed (``SeriesDescription 'T1post' does not match '^HippoCrop$'``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pydicom.uid
from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.uid import UID

from aenode.dicomread import read_float, read_text, read_value, why_unreadable
from aenode.errors import ConfigError
from aenode.select.spec import ConditionSpec, CountRange, RuleSpec, Scalar

__all__ = [
    "Condition",
    "Decision",
    "Rule",
    "compile_rules",
    "evaluate",
    "match_series",
    "slice_orientation",
]

_TAG_KINDS = ("equals", "regex", "one_of", "min/max", "present", "contains")
# pydicom's public UID constants (``pydicom.uid.CTImageStorage``, ...) with their names.
_NAME_TO_SOP_CLASS = {
    _norm: str(uid)
    for uid in vars(pydicom.uid).values()
    if isinstance(uid, UID) and uid.type == "SOP Class"
    for _norm in ("".join(uid.name.lower().split()), uid.keyword.lower())
    if _norm
}


class Condition(Protocol):
    """A compiled condition: ``check`` returns None when it holds, else the reason."""

    def check(self, header: Dataset, count: int) -> str | None:
        """None if the series satisfies the condition, else why not."""
        ...

    def describe(self) -> str:
        """The condition in words (``Modality is 'MR'``)."""
        ...


@dataclass(frozen=True)
class Decision:
    """The outcome of a rule on one series.

    Attributes
    ----------
    matched : bool
        Whether the series satisfies the rule (for a study rule: one of its roles).
    reason : str
        The first condition that failed; empty when matched.
    role : str or None
        The study role matched, None for a series rule or no match.
    """

    matched: bool
    reason: str = ""
    role: str | None = None


@dataclass(frozen=True)
class Rule:
    """A compiled rule: ``series`` for a series rule, or ``roles`` for a study rule."""

    name: str
    models: tuple[str, ...]
    series: Condition | None = None
    roles: dict[str, Condition] = field(default_factory=dict)

    @property
    def is_study(self) -> bool:
        """True for a study-level rule with roles."""
        return self.series is None


# -- values ------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value).strip()


def _q(value: Any) -> str:
    """Quoted for messages, without repr's doubled backslashes (``'DERIVED\\PRIMARY'``)."""
    return "'" + _text(value) + "'"


def _value(header: Dataset, keyword: str) -> Any:
    """The attribute's value, or None when absent, unreadable or empty."""
    elem = read_value(header, keyword)
    if elem is None:
        return None
    if elem == "" or (isinstance(elem, MultiValue | list) and len(elem) == 0):
        return None
    return elem


def _absent(header: Dataset, keyword: str) -> str:
    """``Modality is absent``, or why it cannot be read and is treated as absent."""
    problem = why_unreadable(header, keyword)
    if problem is None:
        return f"{keyword} is absent"
    return f"{problem}; treated as absent"


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt(value: Scalar) -> str:
    return _q(value) if isinstance(value, str) else f"{value:g}"


def _same(actual: Any, wanted: Scalar, ignore_case: bool) -> bool:
    if not isinstance(wanted, str):
        number = _number(actual)
        return number is not None and number == float(wanted)
    text = _text(actual)
    if ignore_case:
        return text.casefold() == wanted.casefold()
    return text == wanted


def slice_orientation(header: Dataset) -> str | None:
    """``axial``, ``coronal``, ``sagittal`` or ``oblique`` from ImageOrientationPatient.

    The slice normal's largest component decides when it is within 30 degrees of an axis
    (cos >= 0.866); further off it is ``oblique``. Enhanced objects are read through
    their shared (or first per-frame) PlaneOrientationSequence.

    Returns
    -------
    str or None
        None when no orientation is given.
    """
    iop = read_value(header, "ImageOrientationPatient")
    if iop is None:
        for seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            groups = read_value(header, seq)
            if groups and "PlaneOrientationSequence" in groups[0]:
                planes = read_value(groups[0], "PlaneOrientationSequence")
                iop = read_value(planes[0], "ImageOrientationPatient") if planes else None
                break
    try:
        v = np.array([float(x) for x in iop], dtype=float)
    except (TypeError, ValueError):
        return None
    if v.shape != (6,) or not np.all(np.isfinite(v)):
        return None
    normal = np.cross(v[:3], v[3:])
    norm = float(np.linalg.norm(normal))
    if norm == 0:
        return None
    normal = np.abs(normal) / norm
    axis = int(np.argmax(normal))
    if normal[axis] < 0.866:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


# -- conditions --------------------------------------------------------------------------


@dataclass(frozen=True)
class _All:
    parts: tuple[Condition, ...]

    def check(self, header: Dataset, count: int) -> str | None:
        for part in self.parts:
            reason = part.check(header, count)
            if reason is not None:
                return reason
        return None

    def describe(self) -> str:
        return "(" + " and ".join(p.describe() for p in self.parts) + ")"


@dataclass(frozen=True)
class _Any:
    parts: tuple[Condition, ...]

    def check(self, header: Dataset, count: int) -> str | None:
        reasons = []
        for part in self.parts:
            reason = part.check(header, count)
            if reason is None:
                return None
            reasons.append(reason)
        return "none of the alternatives holds: " + "; ".join(reasons)

    def describe(self) -> str:
        return "(" + " or ".join(p.describe() for p in self.parts) + ")"


@dataclass(frozen=True)
class _Not:
    part: Condition

    def check(self, header: Dataset, count: int) -> str | None:
        if self.part.check(header, count) is None:
            return f"excluded: {self.part.describe()}"
        return None

    def describe(self) -> str:
        return f"not {self.part.describe()}"


@dataclass(frozen=True)
class _Equals:
    tag: str
    value: Scalar
    ignore_case: bool

    def check(self, header: Dataset, count: int) -> str | None:
        actual = _value(header, self.tag)
        if actual is None:
            return f"{_absent(header, self.tag)} (wanted {_fmt(self.value)})"
        if _same(actual, self.value, self.ignore_case):
            return None
        return f"{self.tag} {_q(actual)} is not {_fmt(self.value)}"

    def describe(self) -> str:
        return f"{self.tag} is {_fmt(self.value)}"


@dataclass(frozen=True)
class _Regex:
    tag: str
    pattern: re.Pattern[str]

    @property
    def shown(self) -> str:
        p = self.pattern.pattern
        return ("" if p.startswith("^") else "^") + p + ("" if p.endswith("$") else "$")

    def check(self, header: Dataset, count: int) -> str | None:
        actual = _value(header, self.tag)
        if actual is None:
            return f"{_absent(header, self.tag)} (wanted a match of {_q(self.shown)})"
        if self.pattern.fullmatch(_text(actual)):
            return None
        return f"{self.tag} {_q(actual)} does not match {_q(self.shown)}"

    def describe(self) -> str:
        return f"{self.tag} matches {_q(self.shown)}"


@dataclass(frozen=True)
class _OneOf:
    tag: str
    values: tuple[Scalar, ...]
    ignore_case: bool

    def check(self, header: Dataset, count: int) -> str | None:
        listed = ", ".join(_fmt(v) for v in self.values)
        actual = _value(header, self.tag)
        if actual is None:
            return f"{_absent(header, self.tag)} (wanted one of {listed})"
        if any(_same(actual, v, self.ignore_case) for v in self.values):
            return None
        return f"{self.tag} {_q(actual)} is not one of {listed}"

    def describe(self) -> str:
        return f"{self.tag} is one of {', '.join(_fmt(v) for v in self.values)}"


def _bounds(low: float | None, high: float | None) -> str:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    return f"[{lo}, {hi}]"


@dataclass(frozen=True)
class _Range:
    tag: str
    low: float | None
    high: float | None

    def check(self, header: Dataset, count: int) -> str | None:
        actual = _value(header, self.tag)
        if actual is None:
            wanted = _bounds(self.low, self.high)
            return f"{_absent(header, self.tag)} (wanted a number in {wanted})"
        number = _number(actual)
        if number is None:
            return f"{self.tag} {_q(actual)} is not a number"
        if (self.low is not None and number < self.low) or (
            self.high is not None and number > self.high
        ):
            return f"{self.tag} {number:g} is not in {_bounds(self.low, self.high)}"
        return None

    def describe(self) -> str:
        return f"{self.tag} in {_bounds(self.low, self.high)}"


@dataclass(frozen=True)
class _Present:
    tag: str
    present: bool

    def check(self, header: Dataset, count: int) -> str | None:
        actual = _value(header, self.tag)
        if self.present and actual is None:
            return _absent(header, self.tag)
        if not self.present and actual is not None:
            return f"{self.tag} is present ({_q(actual)})"
        return None

    def describe(self) -> str:
        return f"{self.tag} is {'present' if self.present else 'absent'}"


@dataclass(frozen=True)
class _Contains:
    tag: str
    value: Scalar
    ignore_case: bool

    def check(self, header: Dataset, count: int) -> str | None:
        actual = _value(header, self.tag)
        if actual is None:
            return f"{_absent(header, self.tag)} (wanted it to contain {_fmt(self.value)})"
        values = list(actual) if isinstance(actual, MultiValue | list | tuple) else [actual]
        if any(_same(v, self.value, self.ignore_case) for v in values):
            return None
        return f"{self.tag} {_q(actual)} does not contain {_fmt(self.value)}"

    def describe(self) -> str:
        return f"{self.tag} contains {_fmt(self.value)}"


@dataclass(frozen=True)
class _Orientation:
    wanted: str

    def check(self, header: Dataset, count: int) -> str | None:
        actual = slice_orientation(header)
        if actual is None:
            return f"ImageOrientationPatient is absent (wanted {self.wanted})"
        if actual != self.wanted:
            return f"orientation is {actual}, not {self.wanted}"
        return None

    def describe(self) -> str:
        return f"orientation is {self.wanted}"


@dataclass(frozen=True)
class _Count:
    what: str  # "instances" or "slices"
    low: int | None
    high: int | None

    def check(self, header: Dataset, count: int) -> str | None:
        n = count
        if self.what == "slices":
            frames = read_float(header, "NumberOfFrames") or 1
            n = int(count * frames)
        if self.low is not None and n < self.low:
            return f"{n} {self.what}, fewer than {self.low}"
        if self.high is not None and n > self.high:
            return f"{n} {self.what}, more than {self.high}"
        return None

    def describe(self) -> str:
        return f"{self.what} in {_bounds(self.low, self.high)}"


@dataclass(frozen=True)
class _SopClass:
    uids: tuple[str, ...]

    def check(self, header: Dataset, count: int) -> str | None:
        actual = read_text(header, "SOPClassUID")
        if actual in self.uids:
            return None
        names = ", ".join(UID(u).name for u in self.uids)
        if not actual:
            return f"SOPClassUID is absent (wanted {names})"
        return f"SOPClassUID {UID(actual).name} is not {names}"

    def describe(self) -> str:
        return "SOP class is " + ", ".join(UID(u).name for u in self.uids)


# -- compiling ---------------------------------------------------------------------------


class _Errors:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path}: {message}")


def _kinds(spec: ConditionSpec) -> list[str]:
    kinds = []
    if spec.all is not None:
        kinds.append("all")
    if spec.any is not None:
        kinds.append("any")
    if spec.not_ is not None:
        kinds.append("not")
    if spec.equals is not None:
        kinds.append("equals")
    if spec.regex is not None:
        kinds.append("regex")
    if spec.one_of is not None:
        kinds.append("one_of")
    if spec.min is not None or spec.max is not None:
        kinds.append("min/max")
    if spec.present is not None:
        kinds.append("present")
    if spec.contains is not None:
        kinds.append("contains")
    if spec.orientation is not None:
        kinds.append("orientation")
    if spec.instances is not None:
        kinds.append("instances")
    if spec.slices is not None:
        kinds.append("slices")
    if spec.sop_class is not None:
        kinds.append("sop_class")
    return kinds


def _count_range(spec: CountRange, path: str, errors: _Errors) -> bool:
    if spec.min is None and spec.max is None:
        errors.add(path, "give min, max or both")
        return False
    if spec.min is not None and spec.max is not None and spec.min > spec.max:
        errors.add(path, f"min {spec.min} is greater than max {spec.max}")
        return False
    return True


def _sop_class_uid(value: str) -> str | None:
    if re.fullmatch(r"[0-9]+(\.[0-9]+)+", value):
        return value  # a UID, known to pydicom or not (a private SOP class)
    return _NAME_TO_SOP_CLASS.get("".join(value.lower().split()))


def _compile(spec: ConditionSpec, path: str, errors: _Errors) -> Condition | None:
    kinds = _kinds(spec)
    if not kinds:
        errors.add(path, "empty condition (give all, any, not, tag with an operator, "
                   "orientation, instances, slices or sop_class)")  # fmt: skip
        return None
    if len(kinds) > 1:
        errors.add(path, f"one condition per mapping, found {' and '.join(kinds)}")
        return None
    kind = kinds[0]
    if spec.tag is not None and kind not in _TAG_KINDS:
        errors.add(f"{path}.tag", f"'tag' does not go with {kind}")
        return None
    if spec.ignore_case and kind not in ("equals", "one_of", "regex", "contains"):
        errors.add(f"{path}.ignore_case", f"does not apply to {kind}")
        return None
    if kind in ("all", "any"):
        items = spec.all if kind == "all" else spec.any
        assert items is not None
        if not items:
            errors.add(f"{path}.{kind}", "empty list")
            return None
        parts = [_compile(s, f"{path}.{kind}[{i}]", errors) for i, s in enumerate(items)]
        if any(p is None for p in parts):
            return None
        kept = tuple(p for p in parts if p is not None)
        return _All(kept) if kind == "all" else _Any(kept)
    if kind == "not":
        assert spec.not_ is not None
        inner = _compile(spec.not_, f"{path}.not", errors)
        return None if inner is None else _Not(inner)
    if kind == "orientation":
        assert spec.orientation is not None
        return _Orientation(spec.orientation)
    if kind in ("instances", "slices"):
        rng = spec.instances if kind == "instances" else spec.slices
        assert rng is not None
        if not _count_range(rng, f"{path}.{kind}", errors):
            return None
        return _Count(kind, rng.min, rng.max)
    if kind == "sop_class":
        assert spec.sop_class is not None
        values = [spec.sop_class] if isinstance(spec.sop_class, str) else spec.sop_class
        if not values:
            errors.add(f"{path}.sop_class", "empty list")
            return None
        uids = []
        for i, value in enumerate(values):
            uid = _sop_class_uid(value)
            sub = f"{path}.sop_class" + ("" if isinstance(spec.sop_class, str) else f"[{i}]")
            if uid is None:
                errors.add(sub, f"unknown SOP class {value!r} (give a UID or a name such as "
                           "'CT Image Storage')")  # fmt: skip
                return None
            uids.append(uid)
        return _SopClass(tuple(uids))
    # the tag operators
    if spec.tag is None:
        errors.add(f"{path}.tag", f"{kind} needs a 'tag' (a DICOM keyword)")
        return None
    tag = spec.tag
    if tag_for_keyword(tag) is None:
        errors.add(f"{path}.tag", f"unknown DICOM keyword {tag!r}")
        return None
    if kind == "equals":
        assert spec.equals is not None
        return _Equals(tag, spec.equals, spec.ignore_case)
    if kind == "regex":
        assert spec.regex is not None
        try:
            pattern = re.compile(spec.regex, re.IGNORECASE if spec.ignore_case else 0)
        except re.error as exc:
            errors.add(f"{path}.regex", f"bad regular expression {spec.regex!r}: {exc}")
            return None
        return _Regex(tag, pattern)
    if kind == "one_of":
        assert spec.one_of is not None
        if not spec.one_of:
            errors.add(f"{path}.one_of", "empty list")
            return None
        return _OneOf(tag, tuple(spec.one_of), spec.ignore_case)
    if kind == "min/max":
        if spec.min is not None and spec.max is not None and spec.min > spec.max:
            errors.add(f"{path}.min", f"min {spec.min:g} is greater than max {spec.max:g}")
            return None
        return _Range(tag, spec.min, spec.max)
    if kind == "present":
        assert spec.present is not None
        return _Present(tag, spec.present)
    assert spec.contains is not None
    return _Contains(tag, spec.contains, spec.ignore_case)


def compile_rules(
    specs: Sequence[RuleSpec],
    known_models: Collection[str] | None = None,
    *,
    prefix: str = "selection.rules",
) -> list[Rule]:
    """Check and compile rule specs.

    Parameters
    ----------
    specs : sequence of RuleSpec
        ``settings.selection.rules``.
    known_models : collection of str or None
        Model names that exist; None skips the check (the ``aenode select`` tester).
    prefix : str
        Key path of the list, for messages.

    Returns
    -------
    list of Rule
        In the order given.

    Raises
    ------
    ConfigError
        One line per problem, each naming its key path
        (``selection.rules[0].series.all[1].regex: bad regular expression ...``).
    """
    errors = _Errors()
    rules: list[Rule] = []
    names: set[str] = set()
    for i, spec in enumerate(specs):
        path = f"{prefix}[{i}]"
        if spec.name in names:
            errors.add(f"{path}.name", f"duplicate rule name {spec.name!r}")
        names.add(spec.name)
        if known_models is not None:
            for j, model in enumerate(spec.models):
                if model not in known_models:
                    known = ", ".join(sorted(known_models)) or "none"
                    errors.add(f"{path}.models[{j}]", f"unknown model {model!r} (known: {known})")
        if (spec.series is None) == (spec.roles is None):
            errors.add(path, "give either 'series' (one condition tree) or 'roles'")
            continue
        if spec.series is not None:
            cond = _compile(spec.series, f"{path}.series", errors)
            if cond is not None:
                rules.append(Rule(spec.name, tuple(spec.models), series=cond))
            continue
        assert spec.roles is not None
        if not spec.roles:
            errors.add(f"{path}.roles", "no roles given")
            continue
        roles: dict[str, Condition] = {}
        for role, role_spec in spec.roles.items():
            if not role:
                errors.add(f"{path}.roles", "empty role name")
                continue
            cond = _compile(role_spec, f"{path}.roles.{role}", errors)
            if cond is not None:
                roles[role] = cond
        if len(roles) == len(spec.roles):
            rules.append(Rule(spec.name, tuple(spec.models), roles=roles))
    if errors.lines:
        raise ConfigError("\n".join(errors.lines))
    return rules


def evaluate(rule: Rule, header: Dataset, instance_count: int) -> Decision:
    """Whether one series satisfies a rule (a study rule: which role it fills).

    Parameters
    ----------
    rule : Rule
        A compiled rule.
    header : pydicom.Dataset
        One instance's header (any instance of the series; Pixel Data not needed).
    instance_count : int
        Instances in the series.

    Returns
    -------
    Decision
        ``matched`` and, when not, the first failing condition as ``reason``
        (for a study rule, one reason per role).
    """
    if rule.series is not None:
        reason = rule.series.check(header, instance_count)
        return Decision(matched=reason is None, reason=reason or "")
    reasons = []
    for role, cond in rule.roles.items():
        reason = cond.check(header, instance_count)
        if reason is None:
            return Decision(matched=True, role=role)
        reasons.append(f"role {role}: {reason}")
    return Decision(matched=False, reason="; ".join(reasons))


def match_series(
    rules: Sequence[Rule], header: Dataset, count: int
) -> list[tuple[Rule, str | None]]:
    """Every rule (and study role) a series satisfies, not only the first.

    Parameters
    ----------
    rules : sequence of Rule
        Compiled rules.
    header : pydicom.Dataset
        One instance's header.
    count : int
        Instances in the series.

    Returns
    -------
    list of (Rule, str or None)
        The rule and the role it fills (None for a series rule); a series that fills
        several roles of one study rule appears once per role.
    """
    out: list[tuple[Rule, str | None]] = []
    for rule in rules:
        if rule.series is not None:
            if rule.series.check(header, count) is None:
                out.append((rule, None))
            continue
        for role, cond in rule.roles.items():
            if cond.check(header, count) is None:
                out.append((rule, role))
    return out
