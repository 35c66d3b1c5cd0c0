"""Options of `r2q theory` (the CLI is generated from them), apart from the checks so that the command line
builds and checks them without loading torch. r2q.theory and r2q.theory.report re-export `TheoryConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_options, option
from ..paths import check_nonblank


@dataclass
class TheoryConfig:
    """Options of `r2q theory`; the CLI is generated from these fields."""

    out: str = option("r2q-theory", "Report directory")
    seed: int = option(0, "Seed of the MDP instance and the sampled data", ge=0)
    quick: bool = option(False, "Smaller checks (about half a minute)")
    quiet: bool = option(False, "No tables while running")

    def __post_init__(self):
        check_options(self)
        check_nonblank(self.out)
