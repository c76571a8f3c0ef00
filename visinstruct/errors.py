"""The one user-facing error type of visinstruct."""
from __future__ import annotations


class VisinstructError(Exception):
    """A failure the user can act on: what happened, and what to do about it."""

    def __init__(self, what: str, hint: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.what}; {self.hint}" if self.hint else self.what
