"""The report directory of `r2q theory`: new, empty or an earlier theory report, which is rewritten; anything else
is refused before the checks run, so that no one's summary.json or report.html is replaced. No torch."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError, few
from ..paths import check_out_dir

FILES = ("summary.json", "report.html")


def is_theory_summary(path: Path) -> bool:
    """Whether `path` is the summary.json a theory run writes (see report.run)."""
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(s, dict) and {"seed", "quick", "passed", "checks"} <= s.keys() and isinstance(s["checks"], dict)


def check_theory_out(out: str | os.PathLike, figures: Iterable[str]) -> Path:
    """--out of `r2q theory`: absent, empty, an earlier theory report (its summary.json is a theory summary), or
    what a run killed while writing left (some of its `figures` PNGs, temp files of its writes). Else a UserError:
    the run would replace the summary.json, report.html and PNGs there."""
    p = check_out_dir(out)
    if not p.is_dir() or is_theory_summary(p / "summary.json"):
        return p
    pngs = {f"{k}.png" for k in figures}
    names = "|".join(re.escape(n) for n in (*FILES, *sorted(pngs)))
    temp = re.compile(rf"\.({names})\.[0-9]+-.*\.tmp")  # write_atomic's, of a writer killed mid-write
    held = sorted(e.name for e in p.iterdir() if e.name != ".lock" and not temp.fullmatch(e.name))
    if any(n not in pngs for n in held):
        raise UserError(f"--out {p} is not empty and is not an earlier theory report ({few(held)}); the checks write "
                        "summary.json, report.html and PNGs there: choose a new or empty directory, or an earlier "
                        "theory report's")
    return p
