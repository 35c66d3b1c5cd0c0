"""Options of `r2q demo` (the CLI is generated from them), apart from the pipeline so that the command line
builds and checks them without loading torch. r2q.demo and r2q.demo.pipeline re-export `DemoConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_options, option
from ..errors import UserError
from .profile import PROFILES


@dataclass
class DemoConfig:
    out: str = option("r2q-demo", "Output directory (stages cached here)")
    profile: str = option("quick", "quick (minutes on a laptop CPU) or full (better fidelity)",
                          choices=tuple(PROFILES))
    seeds: str = option("", "Comma-separated seeds of the per-seed stages (default: the profile's, quick 0,1,2)",
                        shown="the profile's")
    workers: int = option(0, "Processes running stages side by side, each with cores / workers threads (0: as many "
                             "as cores, at most 4)", ge=0, le=64, shown="cores, at most 4")
    quiet: bool = option(False, "No progress bars inside stages")

    def __post_init__(self):
        check_options(self)
        parse_seeds(self.seeds)


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); '' -> (); each a distinct integer >= 0."""
    if not text.strip():
        return ()
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, like 0,1,2; got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must be distinct integers >= 0; got {text!r}")
    return seeds
