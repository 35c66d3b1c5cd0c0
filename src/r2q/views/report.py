"""Pieces of self-contained HTML reports: figures as base64 PNG, escaped tables, one page with inline CSS."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from typing import Any


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def png_bytes(fig, dpi: int = 110) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def img(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def cell(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def table(columns: list[str], rows: list[list[Any]], fmt: Callable[[Any], str] = cell) -> str:
    """An escaped HTML table: text cells left-aligned, numbers right (class num); fmt formats each value."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td{' class=num' if _is_num(v) else ''}>{esc(fmt(v))}</td>" for v in r)
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,-apple-system,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right}
img{max-width:100%}.note{color:#555;font-size:.92em}code{background:#f5f5f5;padding:0 .2em}"""


def page(title: str, body: str) -> str:
    """A whole HTML document: no scripts, no external requests."""
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>{body}</body></html>")
