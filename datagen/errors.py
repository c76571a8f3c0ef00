"""The one user-facing error type of visinstruct (defined in model/errors.py, which imports nothing, so
that model/ and train/ share it without importing datagen)."""
from __future__ import annotations

from model.errors import VisinstructError

__all__ = ["VisinstructError"]
