"""The Recipe model: a named chain of passes plus the session to run the result with."""

from __future__ import annotations

from pydantic import BaseModel, Field

from bladeflow.core.contract import PassRecord, SessionConfig


class Recipe(BaseModel):
    """A named chain of passes and the session configuration to run the result with."""

    name: str
    passes: list[PassRecord] = Field(default_factory=list)
    session: SessionConfig = Field(default_factory=SessionConfig)
