"""What the demo's stages and findings share: JSONL files, JSON-safe values, length percentiles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]



def percentiles(xs) -> dict[str, float]:
    """The 10th, 25th, 50th, 75th and 90th percentiles and the mean of a length distribution."""
    a = np.asarray(xs, dtype=float)
    if not len(a):
        return {}
    q = np.percentile(a, [10, 25, 50, 75, 90])
    return {"p10": float(q[0]), "p25": float(q[1]), "p50": float(q[2]), "p75": float(q[3]), "p90": float(q[4]),
            "mean": float(a.mean())}
