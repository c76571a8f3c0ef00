"""The trainer's user-facing error: the project's VisinstructError, under a trainer name."""
from __future__ import annotations

from visinstruct.errors import VisinstructError


class TrainError(VisinstructError):
    """A model/training failure the user can act on (what happened; what to do)."""
