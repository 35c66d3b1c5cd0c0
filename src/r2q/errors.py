"""Errors meant for the user: one clear sentence, printed by the CLI without a traceback; and notes, one line
each on stderr, for what the user should know but is not an error (rows skipped, a checkpoint passed over)."""

import sys


def first_line(e: BaseException) -> str:
    """An exception's first non-blank line of text (its type name if it has none): for one-line messages."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def note(msg: str) -> None:
    """Tell the user something on one stderr line, prefixed `r2q:` (stdout stays for results)."""
    print(f"r2q: {msg}", file=sys.stderr, flush=True)


class UserError(Exception):
    """A problem with the user's input (files, options, data). The CLI prints it and exits 2."""


def few(names: list[str], n: int = 4) -> str:
    """The first n names, and how many more: for a message about what a directory holds."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def listed(value, what: str) -> list:
    """An API argument that is a list of items (prompts, rows, completions), as a list. A bare string would be read
    as its characters and a mapping as its keys, so both are refused, as is an empty list: one line naming `what`."""
    from collections.abc import Iterable, Mapping

    if isinstance(value, (str, bytes)):
        raise UserError(f"{what} must be a list, not one string: wrap it in a list, [{value[:40]!r}]")
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise UserError(f"{what} must be a list; got {type(value).__name__}")
    out = list(value)
    if not out:
        raise UserError(f"no {what}: the list is empty")
    return out


def check_count(value, what: str, unit: str = "") -> None:
    """A count (a batch size, a number of steps): a positive int, bools and floats refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer{unit}; got {value!r}")


def check_beta(beta) -> None:
    """beta scales every implicit reward: a positive finite number."""
    import math

    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise UserError(f"beta must be a positive finite number; got {beta!r}")
