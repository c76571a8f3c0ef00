"""The one user-facing error type of visinstruct (defined in visinstruct.errors, shared with model/ and train/)."""
from __future__ import annotations

from visinstruct.errors import VisinstructError

__all__ = ["VisinstructError"]
