"""`r2q demo`: the paper's three findings on the built-in imdb-sentiment task (see pipeline.py for the stages)."""

from .pipeline import PROFILES, DemoConfig, run

__all__ = ["DemoConfig", "PROFILES", "run"]
