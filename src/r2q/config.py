"""Config dataclass fields that carry their CLI help text and their valid range (the CLI is generated from them).

A config class calls `check_options(self)` in `__post_init__`, so a bad value fails with one line naming the
option before anything is loaded, whether it came from the command line or from Python.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any

from .errors import UserError

INT_MAX = 2**31 - 1  # no count, length or seed r2q takes is larger; bigger values are typos


def option(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, choices: tuple[str, ...] | None = None, shown: str | None = None,
           positional: bool = False) -> Any:
    """A dataclass field with a default, the help line `r2q` shows for its --option and its valid values:
    ge / gt / le bound a number (ints are also at most INT_MAX, floats finite), choices lists the strings.
    shown: what --help prints as the default, where the value itself would mislead. positional: a command-line
    argument, not an --option (required when its default is "")."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "choices": choices, "shown": shown, "positional": positional}
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(cfg: Any) -> None:
    """Raise UserError for the first field whose value lies outside its declared range."""
    for f in dataclasses.fields(cfg):
        problem = _problem(getattr(cfg, f.name), f.metadata)
        if problem:
            raise UserError(f"{flag(f.name)} {problem}")


def check_prompt_fits(max_length: int, max_prompt_length: int) -> None:
    """--max-prompt-length must leave room for a completion within --max-length (train, sft, credit)."""
    if max_prompt_length >= max_length:
        raise UserError(f"--max-prompt-length ({max_prompt_length}) must be less than --max-length "
                        f"({max_length}), to leave room for the completion")


def _problem(v: Any, meta: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str):
        choices = meta.get("choices")
        if choices and v not in choices:
            return f"must be one of {', '.join(choices)}; got {v!r}"
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return f"must be a finite number; got {v}"
    if isinstance(v, int) and abs(v) > INT_MAX:
        return f"must be at most {INT_MAX:,} in size; got {v}"
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if ge is not None and v < ge:
        return f"must be at least {ge:g}; got {v:g}"
    if gt is not None and v <= gt:
        return f"must be greater than {gt:g}; got {v:g}"
    if le is not None and v > le:
        return f"must be at most {le:g}; got {v:g}"
    return None
