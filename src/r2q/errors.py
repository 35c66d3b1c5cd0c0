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
