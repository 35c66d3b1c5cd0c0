"""The demo's output directory: which directories are the demo's own (it reuses their cached stages) and which it
refuses, before any compute, because they hold someone else's files. No torch: the check answers at once."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError, few
from ..paths import check_out_dir, write_atomic

# written into --out when a demo takes it, before any stage: a run killed in its first stage (no stage.json yet)
# still leaves a directory the next run knows as its own
MARKER = ".r2q-demo"


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _stage_record(path: Path) -> dict | None:
    """The record a demo stage leaves (stages.StageRecord), or None for any other file."""
    rec = _json(path)
    ok = isinstance(rec, dict) and {"key", "seconds", "result", "provenance"} <= rec.keys() \
        and isinstance(rec["provenance"], dict)
    return rec if ok else None


def is_demo_dir(out: Path) -> bool:
    """Whether `out` holds an earlier demo run: its marker, a demo's summary.json, a shared stage's record
    (OUT/<stage>/stage.json) or a per-seed stage's (OUT/seed-<s>/<stage>/stage.json). A per-seed stage's record
    directly under `out` (out is a demo's seed-<s> directory) does not count."""
    if (out / MARKER).is_file():
        return True
    summary = _json(out / "summary.json")
    if isinstance(summary, dict) and {"profile", "seeds", "shared_stages", "per_seed"} <= summary.keys():
        return True
    for p in out.glob("*/stage.json"):
        rec = _stage_record(p)
        if rec is not None and rec["provenance"].get("seed") is None:
            return True
    return any(_stage_record(p) is not None for p in out.glob("seed-*/*/stage.json"))


def check_demo_out(out: str | os.PathLike) -> Path:
    """--out of the demo: absent, empty (a lock file of another command aside) or an earlier demo run, whose
    stages are reused. A directory holding anything else is refused in one line: the demo writes stage
    directories, summary.json and report.html there and would mix with, or replace, what it holds."""
    p = check_out_dir(out)
    if not p.is_dir():
        return p
    held = sorted(e.name for e in p.iterdir() if e.name != ".lock")
    if held and not is_demo_dir(p):
        raise UserError(f"--out {p} is not empty and holds no earlier demo run ({few(held)}); the demo writes its "
                        "stages, summary.json and report.html there: choose a new or empty directory, or an earlier "
                        "demo's")
    return p


def mark(out: Path) -> None:
    """Claim `out` as a demo directory (see MARKER); called with the run's lock held."""
    if not (out / MARKER).is_file():
        write_atomic(out / MARKER, "r2q demo: stages cached here (this file marks the directory as a demo's)\n")
