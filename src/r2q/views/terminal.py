"""Terminal heatmap of token rewards (rich): each token's background is its reward on the diverging scale of
`r2q.views` (red < 0 < blue, white at 0). Token text goes into rich `Text` objects, never through markup,
and control characters are made visible, so model output cannot style or move the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..credit import CompletionCredit, CreditReport, PairCredit, completions_of
from . import css_rgb, display_piece, reward_rgb, step_line, text_rgb, vmax_of


def heat_text(item: CompletionCredit, vmax: float) -> Text:
    """The completion as one Text, each token on its reward colour; a newline token also breaks the line."""
    out = Text()
    for piece, r in zip(item.tokens, item.rewards):
        bg = reward_rgb(r, vmax)
        out.append(display_piece(piece), style=f"{css_rgb(text_rgb(bg))} on {css_rgb(bg)}")
        if "\n" in piece:
            out.append("\n")
    return out


def legend(vmax: float, width: int = 21) -> Text:
    """A colour bar from -vmax to +vmax."""
    out = Text(f"{-vmax:+.3g} ")
    for i in range(width):
        out.append(" ", style=f"on {css_rgb(reward_rgb(-vmax + 2 * vmax * i / (width - 1), vmax))}")
    out.append(f" {vmax:+.3g}   reward beta*log pi/pi_ref (red lowers, blue raises)")
    return out


def _line(label: str, item: CompletionCredit, vmax: float) -> Text:
    head = Text(f"{label} R={item.reward:+.4f}  ", style="bold")
    body = heat_text(item, vmax)
    steps = step_line(item)
    return Text.assemble(head, body, "\n  " + steps if steps else "")


def _prompt(prompt: str, limit: int = 240) -> Text:
    shown = prompt if len(prompt) <= limit else "…" + prompt[-limit:]
    return Text.assemble(("prompt ", "bold dim"), (display_piece(shown), "dim"))


def summary_table(report: CreditReport) -> Table:
    t = Table(title="summary", show_header=False)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in report.summary.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    t.add_row("beta", f"{report.beta:g}")
    t.add_row("reference", report.ref_source)
    return t


def top_table(report: CreditReport, k: int = 10) -> Table:
    """Tokens with the largest positive and negative mean reward, side by side."""
    t = Table(title="tokens with the largest mean reward")
    for col in ("token", "mean r", "n", "token", "mean r", "n"):
        t.add_column(col, justify="right" if col != "token" else "left")
    pos, neg = report.top_positive[:k], report.top_negative[:k]
    for i in range(max(len(pos), len(neg))):
        cells: list[str | Text] = []
        for side in (pos, neg):
            if i < len(side):
                s = side[i]
                cells += [Text(repr(display_piece(s.token))), f"{s.mean_reward:+.4f}", str(s.count)]
            else:
                cells += ["", "", ""]
        t.add_row(*cells)
    return t


def render_terminal(report: CreditReport, console: Console | None = None, max_items: int = 5) -> None:
    """Print the first max_items pairs (or completions) as heatmaps, then the summary and top-token tables."""
    console = console or Console()
    items = report.entries()[:max_items]
    vmax = vmax_of(c.rewards for x in items for c in completions_of(x))
    for x in items:
        if isinstance(x, PairCredit):
            mark = "ranked right" if x.correct else "ranked WRONG"
            console.print(Text(f"pair (row {x.row})  margin {x.margin:+.4f}  loss {x.loss:.4f}  {mark}",
                               style="bold"))
            console.print(_prompt(x.prompt))
            console.print(_line("chosen  ", x.chosen, vmax))
            console.print(_line("rejected", x.rejected, vmax))
        else:
            console.print(Text(f"completion (row {x.row})", style="bold"))
            console.print(_prompt(x.prompt))
            console.print(_line("", x, vmax))
        console.print()
    total = len(report.entries())
    if 0 < max_items < total:
        console.print(Text(f"... {total - max_items} more not shown", style="dim"))
    if items:
        console.print(legend(vmax))
    console.print(summary_table(report))
    if report.top_positive or report.top_negative:
        console.print(top_table(report))
