"""A self-contained HTML page of token credit: inline CSS only (no scripts, fonts, images or links to fetch).

Each token is a span on the diverging reward colour of `r2q.views`; hovering shows its exact reward, log pi
and log pi_ref (the `title` tooltip). A pair is a two-column grid, chosen | rejected: the tokens before the
first differing one fill the first row, and both second rows start at the first differing token, so the
place where the completions part is aligned across the columns whatever the wrapping. Every piece of model
or user text goes through `html.escape` (quotes included): a completion with `<script>` shows as text.
"""

from __future__ import annotations

from pathlib import Path

from ..credit import CompletionCredit, CreditReport, PairCredit, completions_of
from ..paths import write_atomic
from . import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    css_rgb,
    display_piece,
    reward_rgb,
    step_line,
    text_rgb,
    visible_text,
    vmax_of,
)
from .report import esc

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
.meta, .note { color: #666; font-size: 0.9em; }
.tok { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; border-radius: 2px;
       padding: 1px 0; line-height: 1.9; border-right: 1px solid #fff; }
.tok:hover { outline: 2px solid #000; }
.first-diff { box-shadow: 0 0 0 2px #f0a000; }
.prompt { color: #555; background: #f4f4f4; padding: 0.4em; white-space: pre-wrap; font-family: ui-monospace,
          Menlo, Consolas, monospace; font-size: 0.9em; }
.item { border-top: 1px solid #ddd; padding: 0.6em 0; }
.grid { display: grid; grid-template-columns: 1fr 1fr; column-gap: 1.5em; }
.grid > div { min-width: 0; overflow-wrap: anywhere; }
.head { font-weight: 600; margin: 0.3em 0; }
.steps { color: #444; font-size: 0.85em; }
.legend { display: flex; align-items: center; gap: 0.5em; margin: 0.5em 0; }
.legend .bar { width: 280px; height: 16px; border: 1px solid #999; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
td.t { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre; }
.ok { color: #1a7f37; } .bad { color: #b3261e; }
"""


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.6f}"


def token_span(item: CompletionCredit, t: int, vmax: float, extra_class: str = "") -> str:
    """One token as a coloured span whose tooltip gives r_t, log pi, log pi_ref, q_t and the token id."""
    r = item.rewards[t]
    bg = reward_rgb(r, vmax)
    ref = item.ref_logps[t] if item.ref_logps is not None else None
    tip = (f"token {t}: {item.tokens[t]!r} (id {item.token_ids[t]})\nreward {_num(r)}\nlog pi {_num(item.logps[t])}"
           f"\nlog pi_ref {_num(ref)}\ncumulative {_num(item.cumulative[t])}")
    cls = "tok" + (f" {extra_class}" if extra_class else "")
    span = (f'<span class="{cls}" style="background:{css_rgb(bg)};color:{css_rgb(text_rgb(bg))}" '
            f'title="{esc(tip)}" data-reward="{r!r}">{esc(display_piece(item.tokens[t]))}</span>')
    return span + ("<br>" if "\n" in item.tokens[t] else "")


def tokens_html(item: CompletionCredit, start: int, stop: int, vmax: float, mark: int | None = None) -> str:
    return "".join(token_span(item, t, vmax, "first-diff" if t == mark else "") for t in range(start, stop))


def _steps(item: CompletionCredit) -> str:
    line = step_line(item, 4)
    return f'<div class="steps">{esc(line)}</div>' if line else ""


def pair_html(p: PairCredit, vmax: float) -> str:
    c, r = p.chosen, p.rejected
    split = p.first_diff if p.first_diff is not None else len(c.tokens)
    verdict = '<span class="ok">ranked right</span>' if p.correct else '<span class="bad">ranked wrong</span>'
    rows = [f'<div class="head">chosen &nbsp; R = {c.reward:+.4f}</div>',
            f'<div class="head">rejected &nbsp; R = {r.reward:+.4f}</div>']
    if split > 0:
        rows += [f'<div class="prefix">{tokens_html(x, 0, split, vmax)}</div>' for x in (c, r)]
    rows += [f'<div class="tail">{tokens_html(x, split, len(x.tokens), vmax, mark=p.first_diff)}</div>'
             for x in (c, r)]
    rows += [f"<div>{_steps(x)}</div>" for x in (c, r)]
    return (f'<section class="item pair"><div class="head">row {p.row} &middot; margin {p.margin:+.4f} &middot; '
            f'loss {p.loss:.4f} &middot; {verdict}</div><div class="prompt">{esc(visible_text(p.prompt))}</div>'
            f'<div class="grid">{"".join(rows)}</div></section>')


def completion_html(c: CompletionCredit, vmax: float) -> str:
    return (f'<section class="item completion"><div class="head">row {c.row} &middot; R = {c.reward:+.4f}</div>'
            f'<div class="prompt">{esc(visible_text(c.prompt))}</div>'
            f'<div>{tokens_html(c, 0, len(c.tokens), vmax)}</div>'
            f"{_steps(c)}</section>")


def legend_html(vmax: float) -> str:
    stops = ", ".join(css_rgb(x) for x in (NEGATIVE, NEUTRAL, POSITIVE))
    return (f'<div class="legend"><span>{-vmax:+.4g}</span><div class="bar" style="background: linear-gradient('
            f'to right, {stops})"></div><span>{vmax:+.4g}</span><span class="note">token reward '
            "&beta; log &pi;/&pi;<sub>ref</sub>: red lowers the sequence reward, blue raises it; "
            "hover a token for its numbers</span></div>")


def summary_html(report: CreditReport) -> str:
    rows = "".join(f'<tr><td class="t">{esc(k)}</td><td>{v:.4f}</td></tr>' if isinstance(v, float)
                   else f'<tr><td class="t">{esc(k)}</td><td>{esc(str(v))}</td></tr>'
                   for k, v in report.summary.items())
    return f"<table class=\"summary\">{rows}</table>"


def top_html(report: CreditReport, k: int = 20) -> str:
    def side(stats):
        return "".join(
            f'<tr><td class="t">{esc(repr(display_piece(s.token)))}</td><td>{s.mean_reward:+.4f}</td>'
            f"<td>{s.count}</td></tr>" for s in stats[:k])

    head = "<tr><th>token</th><th>mean reward</th><th>count</th></tr>"
    return ('<div class="grid top"><div><h3>largest positive mean reward</h3><table class="top">'
            f"{head}{side(report.top_positive)}</table></div><div><h3>largest negative mean reward</h3>"
            f'<table class="top">{head}{side(report.top_negative)}</table></div></div>')


def render_html(report: CreditReport, title: str = "r2q credit", max_items: int = 200) -> str:
    """The whole page as a string: header, legend, summary, top tokens, then the first max_items items."""
    items = report.entries()
    shown = items[:max_items]
    vmax = vmax_of(c.rewards for x in shown for c in completions_of(x))
    meta = " &middot; ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in report.meta.items())
    body = "".join(pair_html(x, vmax) if isinstance(x, PairCredit) else completion_html(x, vmax) for x in shown)
    heading = "Pairs" if report.kind == "pairs" else "Completions"
    more = f'<p class="note">{len(items) - len(shown)} more not shown</p>' if len(items) > len(shown) else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>"
            f'<p class="meta">beta {report.beta:g} &middot; reference {esc(report.ref_source)}'
            f'{" &middot; " + meta if meta else ""}</p>{legend_html(vmax)}<h2>Summary</h2>{summary_html(report)}'
            f"<h2>Tokens the model rewards</h2>{top_html(report)}<h2>{heading}</h2>"
            f"{body}{more}</body></html>\n")


def write_html(report: CreditReport, path: str | Path, **kw) -> Path:
    return write_atomic(path, render_html(report, **kw))
