"""Typed settings: one pydantic model per config group, checked after Hydra composes the config."""

from soupbench.settings.base import Bool, Float, Int, Settings, Str, describe, matching, problems, show
from soupbench.settings.space import axis

__all__ = ["Bool", "Float", "Int", "Settings", "Str", "axis", "describe", "matching", "problems", "show"]
