"""Options of `r2q demo` (the CLI is generated from them), apart from the pipeline so that the command line
builds and checks them without loading torch. r2q.demo and r2q.demo.pipeline re-export `DemoConfig`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import INT_MAX, check_options, option
from ..errors import UserError
from ..paths import check_nonblank
from .profile import PROFILES, about_profiles


@dataclass
class DemoConfig:
    out: str = option("r2q-demo", "Output directory (stages cached here)")
    profile: str = option("quick", about_profiles(), choices=tuple(PROFILES))
    seeds: str = option("", "Comma-separated seeds of the per-seed stages (default: the profile's, quick 0,1,2)",
                        shown="the profile's")
    workers: int = option(0, "Processes running stages side by side, each with cores / workers threads (0: as many "
                             "as cores, at most 4)", ge=0, le=64, shown="cores, at most 4")
    quiet: bool = option(False, "No progress bars inside stages")

    def __post_init__(self):
        check_options(self)
        check_nonblank(self.out)
        parse_seeds(self.seeds)


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); '' -> () (the profile's seeds); each a distinct integer in [0, INT_MAX], the seeds
    r2q's training and sampling take (a larger one would fail only in the first per-seed stage, after the
    shared stages had run)."""
    if not isinstance(text, str):
        raise UserError(f"--seeds must be a string of comma-separated integers, like '0,1,2'; got "
                        f"{type(text).__name__} {text!r}"[:200])
    if not text.strip():
        return ()
    items = [x.strip() for x in text.split(",")]
    bad = next((x for x in items if not re.fullmatch(r"[+-]?[0-9]+", x)), None)
    if bad is not None:
        what = "an empty item" if not bad else f"{bad[:40]!r} is not one"
        raise UserError(f"--seeds must be comma-separated integers, like 0,1,2; got {text[:80]!r} ({what})")
    # (a number too long for int() is out of range too)
    big = next((x for x in items if len(x.lstrip("+-0")) > 12 or not 0 <= int(x) <= INT_MAX), None)
    if big is not None:
        raise UserError(f"--seeds must be distinct integers >= 0 and at most {INT_MAX:,} (the largest seed r2q's "
                        f"training and sampling take); got {big[:40]}")
    seeds = tuple(int(x) for x in items)
    twice = next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)
    if twice is not None:
        raise UserError(f"--seeds must be distinct integers >= 0; {twice} is given twice in {text[:80]!r}")
    return seeds
