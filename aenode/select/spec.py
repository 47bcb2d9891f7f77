"""Selection rule specifications as they appear in ``config.yaml`` (pydantic, validated at load).

Placeholder shape; the select stage refines it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RuleSpec"]


class RuleSpec(BaseModel):
    """One selection rule: which series (or study roles) feed which models."""

    model_config = ConfigDict(extra="forbid")

    name: str
    models: list[str] = Field(min_length=1)
    series: dict[str, Any] | None = None
    roles: dict[str, dict[str, Any]] | None = None
