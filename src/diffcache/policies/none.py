"""``policy=none``: the uncached model (the baseline, and the teacher)."""
from __future__ import annotations

from .base import CachePolicy


class NoCache(CachePolicy):
    name = "none"
