"""The base of every config section: a pydantic model that refuses unknown keys (config.py names the field) and
numbers that are not finite."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
