"""Errors meant for the user: one clear sentence, printed by the CLI without a traceback; and notes, one line
each on stderr, for what the user should know but is not an error (rows skipped, a checkpoint passed over)."""

import math
import numbers
import sys


def first_line(e: BaseException) -> str:
    """An exception's first non-blank line of text (its type name if it has none): for one-line messages."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def note(msg: str) -> None:
    """Tell the user something on one stderr line, prefixed `r2q:` (stdout stays for results)."""
    print(f"r2q: {msg}", file=sys.stderr, flush=True)


class UserError(ValueError):
    """A problem with the user's input (files, options, data, a Python argument's value). The CLI prints it and exits
    2; in Python it is a ValueError, as a bad argument is."""


class UserTypeError(UserError, TypeError):
    """A Python argument of the wrong type (a path where a loaded model or tokenizer goes, a dict for a config): a
    UserError to the CLI, a TypeError to Python."""


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
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy's ints too
        raise UserTypeError(f"{what} must be a positive integer{unit}; got {value!r}")
    if value < 1:
        raise UserError(f"{what} must be a positive integer{unit}; got {value!r}")


def check_seed(seed, what: str = "seed") -> None:
    """A seed torch's generators take: an int in [0, 2**31 - 1]."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserTypeError(f"{what} must be an integer in [0, {2**31 - 1}]; got {type(seed).__name__} {seed!r}")
    if not 0 <= seed <= 2**31 - 1:
        raise UserError(f"{what} must be in [0, {2**31 - 1}]; got {seed}")


def check_beta(beta, what: str = "beta", zero_ok: bool = False) -> None:
    """beta scales every implicit reward: a positive finite number (a real number of any kind: int, float, numpy's).
    zero_ok for a weight that may switch its term off (guided decoding's alpha)."""
    if type(beta) is float and (0 <= beta if zero_ok else 0 < beta) and beta < math.inf:
        return  # the common case, fast (search checks beta at every scored token)
    if getattr(beta, "ndim", None) == 0 and hasattr(beta, "item"):  # a 0-d tensor or array holding the number
        beta = beta.item()
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise UserTypeError(f"{what} must be a {'non-negative' if zero_ok else 'positive'} finite number; got "
                            f"{type(beta).__name__} {beta!r}")
    if not math.isfinite(beta) or beta < 0 or (beta == 0 and not zero_ok):
        raise UserError(f"{what} must be a {'non-negative' if zero_ok else 'positive'} finite number; got {beta!r}")
