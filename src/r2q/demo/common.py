"""What the demo's stages and findings share: JSONL files, JSON-safe values, the sequence-length cap."""

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


def max_len(p: dict, tokens: int) -> int:
    """Tokens of a prompt (up to twice the prompt length) and `tokens` completion tokens, with room to spare."""
    return 2 * p["prompt_tokens"] + tokens + 8
