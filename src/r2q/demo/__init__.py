"""`r2q demo`: the paper's three findings on the built-in imdb-sentiment task, in several seeds (see pipeline.py)."""

from .pipeline import DemoConfig, run
from .profile import PROFILES, Profile

__all__ = ["DemoConfig", "PROFILES", "Profile", "run"]
