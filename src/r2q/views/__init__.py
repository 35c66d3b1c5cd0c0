"""Views of a `r2q.credit.CreditReport`: terminal heatmap (terminal.py), self-contained HTML (html.py) and a
PNG figure (plots.py). They share one diverging colour scale centred at 0, defined here:

    a = min(|r| / vmax, 1),   colour(r) = (1 - a) * WHITE + a * (BLUE if r > 0 else RED)

with vmax = max |r_t| over the tokens shown, so the largest reward of the page gets the full colour.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

NEGATIVE = (178, 24, 43)  # red: the token lowers the reward
POSITIVE = (33, 102, 172)  # blue: the token raises it
NEUTRAL = (255, 255, 255)


def vmax_of(rewards: Iterable[Iterable[float]]) -> float:
    """The half-width of the colour scale: the largest |r_t|, or 1 when every reward is 0."""
    m = max((abs(r) for row in rewards for r in row), default=0.0)
    return m if m > 0 else 1.0


def reward_rgb(r: float, vmax: float) -> tuple[int, int, int]:
    """Diverging colour of a reward: white at 0, red for negative, blue for positive, full at |r| >= vmax."""
    a = min(abs(r) / vmax, 1.0) if vmax > 0 else 0.0
    end = POSITIVE if r > 0 else NEGATIVE
    return tuple(round(n + (e - n) * a) for n, e in zip(NEUTRAL, end))  # type: ignore[return-value]


def css_rgb(c: tuple[int, int, int]) -> str:
    """A colour as CSS and rich write it: rgb(r,g,b)."""
    return f"rgb({c[0]},{c[1]},{c[2]})"


def text_rgb(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white text, whichever reads better on `bg` (relative luminance)."""
    lum = 0.2126 * bg[0] + 0.7152 * bg[1] + 0.0722 * bg[2]
    return (0, 0, 0) if lum > 140 else (255, 255, 255)


def _escaped(ch: str) -> str:
    """A character written out as Python would: '\\xNN' below 256, else '\\uNNNN'."""
    return f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"


_BIDI = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def visible_text(text: str) -> str:
    """A prompt's text as a page shows it: lines and tabs kept, control and bidirectional-override characters
    written out ('\\u202e'), so that none can hide or reorder what is shown around it."""
    return "".join(_escaped(ch) if ch not in "\n\t" and (ch in _BIDI or unicodedata.category(ch) == "Cc") else ch
                   for ch in text)


def display_piece(piece: str) -> str:
    """A token's text made visible and inert: newline -> '↵', tab -> '→', other control characters -> '\\xNN',
    an empty piece (the first bytes of a multi-byte character) -> '▯'."""
    if piece == "":
        return "▯"
    out = []
    for ch in piece:
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("→")
        elif ch == "\r":
            out.append("␍")
        elif unicodedata.category(ch) in ("Cc", "Cf") and ch != " ":
            out.append(_escaped(ch))
        else:
            out.append(ch)
    return "".join(out)


def step_line(item, digits: int = 3) -> str:
    """A completion's step rewards as one line: "turns: assistant +0.120  user -0.030 ..." for a conversation,
    "steps: +0.120  -0.030 ..." for delimiter steps; "" for a single step."""
    if len(item.step_rewards) <= 1:
        return ""
    if item.step_roles:
        return "turns: " + "  ".join(f"{r} {s:+.{digits}f}" for r, s in zip(item.step_roles, item.step_rewards))
    return "steps: " + "  ".join(f"{s:+.{digits}f}" for s in item.step_rewards)
