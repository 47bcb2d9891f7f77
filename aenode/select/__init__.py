"""Selection: which complete series (or studies of several series) feed which models.

``spec`` holds the pydantic rule specs of ``config.yaml``; ``rules`` compiles and evaluates
them; ``studies`` turns complete series into jobs (study roles, timeouts, durable state);
``explain`` is the ``aenode select`` dry-run tester.

Names are resolved lazily, so that :mod:`aenode.config` (which imports ``spec`` and
``rules``) does not load ``studies`` and, through it, the store and the jobs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aenode.select.rules import Decision, Rule, compile_rules, evaluate, match_series
    from aenode.select.spec import ConditionSpec, RuleSpec
    from aenode.select.studies import StudyTracker, role_requirements

__all__ = [
    "ConditionSpec",
    "Decision",
    "Rule",
    "RuleSpec",
    "StudyTracker",
    "compile_rules",
    "evaluate",
    "match_series",
    "role_requirements",
]

_WHERE = {
    "ConditionSpec": "spec",
    "RuleSpec": "spec",
    "Decision": "rules",
    "Rule": "rules",
    "compile_rules": "rules",
    "evaluate": "rules",
    "match_series": "rules",
    "StudyTracker": "studies",
    "role_requirements": "studies",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'aenode.select' has no attribute {name!r}")
    return getattr(importlib.import_module(f"aenode.select.{module}"), name)
