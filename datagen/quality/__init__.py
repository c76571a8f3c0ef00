"""Sample quality: checks with reason codes, CHAIR hallucination, near-duplicates, stats, review, export."""
from __future__ import annotations

from datagen.quality.checks import CHECKS, REASON_CODES, QualityChecker, SampleReport, SampleView
from datagen.quality.config import QualityConfig, load_config
from datagen.quality.gate import check_file, make_checker
from datagen.quality.objects import ChairCounter, ObjectMatcher, default_matcher

__all__ = [
    "CHECKS", "REASON_CODES", "ChairCounter", "ObjectMatcher", "QualityChecker", "QualityConfig", "SampleReport",
    "SampleView", "check_file", "default_matcher", "load_config", "make_checker",
]
