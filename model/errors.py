"""The project's one user-facing error type, and the trainer's name for it.

It lives here, in a module with no imports, because both packages need it and `model/` must not
import `datagen/`; `datagen.errors` re-exports it. (The design card fixes the top-level folders, so
there is no separate top-level package for it.)
"""
from __future__ import annotations


class VisinstructError(Exception):
    """A failure the user can act on: what happened, and what to do about it."""

    def __init__(self, what: str, hint: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.what}; {self.hint}" if self.hint else self.what


class TrainError(VisinstructError):
    """A model/training failure the user can act on (what happened; what to do)."""
